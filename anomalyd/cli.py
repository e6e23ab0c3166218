"""The `anomalyd` command. Library errors become one clear line on stderr and an exit status.

Every command exits 2 on any error, expected or not: `anomalyd: error: ...` on stderr, the traceback only
with `-v`. `score` exits 0 or 1 only for real verdicts (all normal / some anomalous).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import traceback
from pathlib import Path

from anomalyd import __version__
from anomalyd.audio import describe_audio, supported_names
from anomalyd.bundle import load_bundle
from anomalyd.bundle_schema import MAX_K
from anomalyd.config import DEFAULT_CONFIG, config_warnings, load_config
from anomalyd.errors import AnomalydError
from anomalyd.inference import open_autoencoder
from anomalyd.mismatch import MismatchWarnings
from anomalyd.scoring import ClipScorer, is_anomalous

logger = logging.getLogger("anomalyd")

EXIT_NORMAL = 0
EXIT_ANOMALY = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
MAX_THREADS = 64


def warning(message: str) -> None:
    print(f"anomalyd: warning: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """Each line of `message` as `anomalyd: error: ...` on stderr (config errors list one per line)."""
    for line in message.splitlines() or [""]:
        print(f"anomalyd: error: {line}", file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> int:
    """Score audio files against a bundle: 0 all normal, 1 any anomalous, 2 any error."""
    bundle = load_bundle(args.bundle)
    scorer = ClipScorer.from_bundle(bundle, threads=args.threads)
    threshold = bundle.meta.threshold
    if args.k is not None:
        threshold = dataclasses.replace(threshold, k=args.k)
    status = EXIT_NORMAL
    mismatch = MismatchWarnings(bundle.meta.training_audio)
    for path in args.files:
        try:
            for line in mismatch.check(describe_audio(path, args.channel)):
                warning(line)
            score = scorer.score_file(path, channel=args.channel).score
        except AnomalydError as exc:
            error(str(exc))
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
    """Validate the config and load every bundle it names as the daemon does, ONNX Runtime session
    included; 0 when the daemon would start, errors raise (exit 2)."""
    config = load_config(args.file)
    for path in sorted({s.bundle for s in config.streams}):
        open_autoencoder(load_bundle(path), config.inference.threads)
    for line in config_warnings(config):
        warning(line)
    print(f"{args.file}: ok ({len(config.streams)} stream(s), events in {config.storage.database})")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from anomalyd.sources.mic import input_devices  # noqa: PLC0415 - needs PortAudio

    devices = input_devices()
    if not devices:
        error("no input devices found")
        return EXIT_ERROR
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
    score.add_argument(
        "--channel", type=_channel, default=0, help="channel of multi-channel files (default 0)"
    )
    score.add_argument("--k", type=_k, help="override the bundle's k in threshold = mean + k * std (0..100)")
    score.add_argument("--threads", type=_threads, default=1, help="ONNX Runtime threads (default 1)")
    score.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help=f"audio files ({supported_names()}); a lossy file, or one at a rate the model's training "
        "audio did not have, is scored with one warning per run",
    )
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
        description="Load the config and every bundle it names as the daemon would (ONNX Runtime session "
        "included). Exit status 0 when the daemon would start with this config, 2 otherwise.",
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


def _number(text: str, kind: type[int] | type[float], low: float, high: float, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # False for NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return value


def _channel(text: str) -> int:
    return int(_number(text, int, 0, 65_535, "a channel is an integer, 0 or more"))


def _k(text: str) -> float:
    return _number(text, float, 0, MAX_K, f"k must be a number in 0..{MAX_K:g}")


def _threads(text: str) -> int:
    return int(_number(text, int, 1, MAX_THREADS, f"threads must be an integer in 1..{MAX_THREADS}"))


def main(argv: list[str] | None = None) -> int:
    """Run one command; any failure is exit 2 with one line (argparse's usage errors are 2 as well)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except AnomalydError as exc:
        _report(str(exc), args.verbose)
    except Exception as exc:
        # A bug, not a verdict: still one line and exit 2, so that no crash ever reads as "anomalous".
        _report(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}", args.verbose)
    return EXIT_ERROR


def _report(message: str, verbose: bool) -> None:
    """The error line(s); with -v also the traceback of the exception being handled."""
    error(message)
    if verbose:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
