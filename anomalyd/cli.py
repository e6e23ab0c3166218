"""The `anomalyd` command. Library errors become one clear line on stderr and an exit status.

Every command exits 2 on any error, expected or not: `anomalyd: error: ...` on stderr, the traceback only
with `-v`. `score` exits 0 or 1 only for real verdicts (all normal / some anomalous).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

from anomalyd import __version__
from anomalyd.audio import describe_audio, supported_names
from anomalyd.bundle import load_bundle
from anomalyd.bundle_schema import MAX_K
from anomalyd.config import DEFAULT_CONFIG, DetectorConfig, HealthConfig, config_warnings, load_config
from anomalyd.errors import AnomalydError, ConfigError
from anomalyd.inference import open_autoencoder
from anomalyd.mismatch import MismatchWarnings
from anomalyd.replay import Rule, all_silent, describe_verdict, first_event_seconds
from anomalyd.scoring import ClipScorer

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
    """Score audio files against a bundle and give the daemon's verdict on each: would it raise an event,
    and when. Exit 0 when none would, 1 when any would, 2 on any error."""
    bundle = load_bundle(args.bundle)
    scorer = ClipScorer.from_bundle(bundle, threads=args.threads)
    k = bundle.meta.threshold.k if args.k is None else args.k
    rule = Rule.for_k(bundle.meta.threshold, k, DetectorConfig(), HealthConfig().silence_dbfs)
    status = EXIT_NORMAL
    mismatch = MismatchWarnings(bundle.meta.training_audio)
    for path in args.files:
        try:
            for line in mismatch.check(describe_audio(path, args.channel)):
                warning(line)
            scored = scorer.stream_file(path, channel=args.channel)
        except AnomalydError as exc:
            error(str(exc))
            status = EXIT_ERROR
            continue
        if all_silent(scored, rule.silence_dbfs):
            # Neither normal nor anomalous: a dead channel or a muted input must not pass for either.
            print(f"{path}\tscore=-\tthreshold={rule.threshold:.5f}\tno windows scored\tsilent", flush=True)
            error(f"{path}: digital silence (every window has a stretch below {rule.silence_dbfs:g} dBFS): "
                  "cannot be judged; check the channel and the microphone")  # fmt: skip
            status = EXIT_ERROR
            continue
        event = first_event_seconds(scored, rule)
        verdict = "normal" if event is None else "ANOMALY"
        print(
            f"{path}\tscore={scored.clip.score:.5f}\tthreshold={rule.threshold:.5f}\t"
            f"{describe_verdict(event)}\t{verdict}",
            flush=True,
        )
        if event is not None and status == EXIT_NORMAL:
            status = EXIT_ANOMALY
    return status


def _detector_settings(config_path: Path | None, stream: str | None) -> tuple[DetectorConfig, float]:
    """Detector settings and silence level: the daemon's defaults, or one stream's from a config file."""
    if config_path is None:
        return DetectorConfig(), HealthConfig().silence_dbfs
    config = load_config(config_path)
    names = [s.name for s in config.streams]
    if stream is None and len(names) > 1:
        raise ConfigError(f"{config_path}: several streams ({', '.join(names)}): say which with --stream")
    chosen = [s for s in config.streams if stream is None or s.name == stream]
    if not chosen:
        raise ConfigError(f"{config_path}: no stream {stream!r}; streams: {', '.join(names)}")
    detector = chosen[0].detector
    if detector.k is not None or detector.threshold is not None:
        print(
            f"anomalyd: warning: stream {chosen[0].name} sets its own detector k or threshold, which "
            "overrides the bundle's calibrated k",
            file=sys.stderr,
        )
    return detector, config.health.silence_dbfs


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Choose k for a false-alarm budget by replaying audio through the daemon's detector; record it."""
    from anomalyd import calibrate  # noqa: PLC0415

    budget = calibrate.check_budget(args.false_alarms_per_day)
    detector, silence_dbfs = _detector_settings(args.config, args.stream)
    bundle = load_bundle(args.bundle)
    result = calibrate.calibrate(
        bundle,
        args.normal,
        args.anomaly or [],
        budget,
        detector=detector,
        silence_dbfs=silence_dbfs,
        channel=args.channel,
    )
    for line in calibrate.report_lines(result):
        print(line)
    path = calibrate.write_calibration(result)
    print(f"wrote k = {result.chosen.k:.3f} (was {bundle.meta.threshold.k:g}) and its evidence to {path}")
    return 0


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


def cmd_record(args: argparse.Namespace) -> int:
    from anomalyd.record import RecordOptions, record  # noqa: PLC0415

    options = RecordOptions(args.stream, args.minutes * 60.0, args.out, args.segment_seconds)
    return record(load_config(args.config), args.config, options)


def cmd_events(args: argparse.Namespace) -> int:
    from anomalyd.eventlog import mark_event, show_events  # noqa: PLC0415

    if args.action == "mark":
        return mark_event(args)
    if args.event_id is not None:
        raise AnomalydError(f"events: unexpected argument {args.event_id!r} (did you mean: events mark ID)")
    return show_events(args)


def cmd_bundle_info(args: argparse.Namespace) -> int:
    from anomalyd.bundleinfo import show_info  # noqa: PLC0415

    return show_info(args.bundle, args.json)


def cmd_bundle_install(args: argparse.Namespace) -> int:
    from anomalyd.bundleinfo import install_bundle  # noqa: PLC0415

    bundle = install_bundle(args.bundle, args.into)
    print(f"installed {bundle.meta.model_id} in {bundle.path}; reload the daemon: systemctl reload anomalyd")
    return 0


def _add_bundle_commands(commands: Any) -> None:
    group = commands.add_parser(
        "bundle", help="describe or install model bundles", description="Describe or install model bundles."
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser(
        "info",
        help="print what a bundle is",
        description="Load a bundle as the daemon would and print its model id, training data, features, "
        "threshold, calibration and origin. Exit status 2 (one line) for a bad bundle.",
    )
    info.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_bundle_info)
    install = actions.add_parser(
        "install",
        help="copy a bundle into the service's model folder, atomically",
        description="Copy BUNDLE to --into (e.g. /var/lib/anomalyd/models/NAME): built beside it, loaded "
        "as the daemon loads it, made readable to the daemon's user (owned by the target folder's owner "
        "when run as root), then swapped in with one rename. Then reload: systemctl reload anomalyd.",
    )
    install.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle folder to install")
    install.add_argument(
        "--into", type=Path, required=True, metavar="DIR/NAME", help="where the daemon's config names it"
    )
    install.set_defaults(func=cmd_bundle_install)


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
        description="Print one line per file: the clip score (mean window score, for ranking), the "
        "window threshold, and the daemon's verdict: whether its detector (n-of-m windows over the "
        "threshold, default settings) would raise an event on this file, and when. Exit status 0 when "
        "no file would raise one, 1 when any would, 2 on any error.",
    )
    score.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    score.add_argument(
        "--channel", type=_channel, default=0, help="channel of multi-channel files (default 0)"
    )
    score.add_argument(
        "--k", type=_k, help="override the bundle's k in window threshold = mean + k * std (0..100)"
    )
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

    calib = commands.add_parser(
        "calibrate",
        help="choose k for a false-alarm budget and record it in the bundle",
        description="Replay normal audio through the daemon's own windows and detector (n-of-m, "
        "hold-off, cooldown), choose the smallest k whose events on it stay within the budget, and "
        "record k with its evidence in the bundle's model.json. With --anomaly, also report detection "
        "rate and delay. AUDIO: WAV/FLAC files or folders of them.",
    )
    calib.add_argument("--bundle", type=Path, required=True, help="model bundle folder (updated in place)")
    calib.add_argument("--normal", type=Path, nargs="+", required=True, metavar="AUDIO", help="normal audio")
    calib.add_argument("--anomaly", type=Path, nargs="+", metavar="AUDIO", help="anomalous audio (optional)")
    calib.add_argument(
        "--false-alarms-per-day", required=True, metavar="X", help="budget: false events a day (> 0)"
    )
    calib.add_argument(
        "--config", type=Path, help="take the detector settings from this daemon config (default: defaults)"
    )
    calib.add_argument("--stream", help="the config's stream whose detector settings to use")
    calib.add_argument(
        "--channel", type=_channel, default=0, help="channel of multi-channel files (default 0)"
    )
    calib.set_defaults(func=cmd_calibrate)

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

    rec = commands.add_parser(
        "record",
        help="record normal audio of a stream for training",
        description="Record a configured stream in fixed-length 16-bit WAV segments at its model's rate, "
        "with recording.json beside them. From the running daemon (over its control socket) while it "
        "keeps monitoring; without one, the stream's source is opened here. Ctrl-C keeps every complete "
        "segment (exit 130).",
    )
    rec.add_argument("--stream", required=True, help="name of a stream in the config")
    rec.add_argument("--minutes", type=_minutes, required=True, help="how long to record (up to 1440)")
    rec.add_argument("--out", type=Path, required=True, help="folder for the segments (created if needed)")
    rec.add_argument(
        "--segment-seconds", type=_segment, default=10, help="length of each segment, 1-3600 s (default 10)"
    )
    rec.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    rec.set_defaults(func=cmd_record)

    events = commands.add_parser(
        "events",
        help="show logged anomaly events, or mark one a false alarm",
        description="Show anomaly events from the event log, oldest first. `anomalyd events mark ID --normal "
        "[--note TEXT]` marks event ID (or a unique prefix of 8+ digits) a false alarm: its clip is copied "
        "into <storage.normal_dir>/<stream>/ (extra normal audio for retraining) and retention keeps it.",
    )
    events.add_argument("action", nargs="?", choices=("mark",), help="mark: mark an event a false alarm")
    events.add_argument("event_id", nargs="?", metavar="ID", help="the event to mark")
    events.add_argument("--normal", action="store_true", help="with mark: the event was normal sound")
    events.add_argument("--note", default="", help="with mark: why (kept in the event log)")
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
    _add_bundle_commands(commands)
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


def _minutes(text: str) -> float:
    value = _number(text, float, 0, 1440, "minutes must be a number above 0, at most 1440 (a day)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: minutes must be above 0")
    return value


def _segment(text: str) -> int:
    return int(_number(text, int, 1, 3600, "segment seconds must be an integer in 1..3600"))


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
