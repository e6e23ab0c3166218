"""The `anomalyd` command. Library errors become one clear line on stderr and an exit status."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from anomalyd import __version__
from anomalyd.bundle import load_bundle
from anomalyd.config import DEFAULT_CONFIG, load_config
from anomalyd.errors import AnomalydError
from anomalyd.scoring import ClipScorer, is_anomalous

logger = logging.getLogger("anomalyd")

EXIT_NORMAL = 0
EXIT_ANOMALY = 1
EXIT_ERROR = 2


def cmd_score(args: argparse.Namespace) -> int:
    """Score audio files against a bundle: 0 all normal, 1 any anomalous, 2 any error."""
    try:
        bundle = load_bundle(args.bundle)
    except AnomalydError as exc:
        print(f"anomalyd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    scorer = ClipScorer.from_bundle(bundle, threads=args.threads)
    threshold = bundle.meta.threshold
    if args.k is not None:
        threshold = dataclasses.replace(threshold, k=args.k)
    status = EXIT_NORMAL
    for path in args.files:
        try:
            score = scorer.score_file(path, channel=args.channel).score
        except AnomalydError as exc:
            print(f"anomalyd: error: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        anomalous = is_anomalous(score, threshold)
        verdict = "ANOMALY" if anomalous else "normal"
        print(f"{path}\tscore={score:.5f}\tthreshold={threshold.value:.5f}\t{verdict}", flush=True)
        if anomalous and status == EXIT_NORMAL:
            status = EXIT_ANOMALY
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from anomalyd.service import Daemon  # noqa: PLC0415 - keeps `anomalyd score` light

    return Daemon(args.config).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and load every bundle it names; 0 when the daemon would start, else 1."""
    try:
        config = load_config(args.file)
        for bundle in sorted({s.bundle for s in config.streams}):
            load_bundle(bundle)
    except AnomalydError as exc:
        print(f"anomalyd: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(config.streams)} stream(s), events in {config.storage.database})")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from anomalyd.sources.mic import input_devices  # noqa: PLC0415 - needs PortAudio

    devices = input_devices()
    if not devices:
        print("no input devices found", file=sys.stderr)
        return 1
    print(f"{'index':>5}  {'channels':>8}  {'rate':>6}  {'host API':<12}  name")
    for d in devices:
        print(f"{d.index:>5}  {d.channels:>8}  {d.default_rate:>6}  {d.host_api:<12}  {d.name}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from anomalyd.eventlog import show_events  # noqa: PLC0415

    return show_events(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyd",
        description="Audio anomaly detection for machines: score recordings, run the monitor.",
    )
    parser.add_argument("--version", action="version", version=f"anomalyd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score",
        help="score audio files against a model bundle",
        description="Print one line per file: score, threshold, verdict. "
        "Exit status 0 when all files are normal, 1 when any is anomalous, 2 on any error.",
    )
    score.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    score.add_argument("--channel", type=int, default=0, help="channel of multi-channel files (default 0)")
    score.add_argument("--k", type=float, help="override the bundle's k in threshold = mean + k * std")
    score.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    score.add_argument("files", type=Path, nargs="+", metavar="FILE", help="WAV or FLAC files")
    score.set_defaults(func=cmd_score)

    run = commands.add_parser(
        "run",
        help="run the monitoring service",
        description="Listen to the configured streams, score them and log anomaly events until stopped "
        "(SIGTERM/SIGINT); SIGHUP reloads the config.",
    )
    run.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check-config",
        help="validate a config file and the bundles it names",
        description="Exit status 0 when the daemon would start with this config, 1 otherwise.",
    )
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG, metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    devices = commands.add_parser(
        "devices", help="list audio input devices", description="List the input devices PortAudio sees."
    )
    devices.set_defaults(func=cmd_devices)

    events = commands.add_parser(
        "events",
        help="show logged anomaly events",
        description="Show anomaly events from the event log, oldest first.",
    )
    where = events.add_mutually_exclusive_group()
    where.add_argument(
        "--config", type=Path, help=f"take the database from this config (default {DEFAULT_CONFIG})"
    )
    where.add_argument("--database", type=Path, help="event database file")
    events.add_argument("--since", help="only events since: an age (30m, 12h, 7d) or a UTC ISO 8601 time")
    events.add_argument("--stream", help="only this stream")
    events.add_argument("--follow", action="store_true", help="keep printing new and changed events")
    events.add_argument("--format", choices=("table", "csv", "json"), default="table")
    events.set_defaults(func=cmd_events)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
