"""The `anomalyd` command. Library errors become one clear line on stderr and an exit status."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from anomalyd import __version__
from anomalyd.bundle import load_bundle
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
