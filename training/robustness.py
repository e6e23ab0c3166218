"""Level and rate robustness: a bundle's verdicts on normal clips changed as a plant's capture chain would.

    python -m training.robustness --bundle BUNDLE --normal DIR --anomaly DIR

Conditions, each applied to every normal clip: as recorded; scaled by -6, -3, +3 and +6 dB (clipped at full
scale, as a converter would); sent through a 16 -> 44.1 -> 16 kHz and a 16 -> 48 -> 16 kHz round trip
(soxr, as anomalyd resamples: a 44.1 or 48 kHz microphone against 16 kHz training audio). For each
condition: the share of normal clips on which the daemon's detector raises no event, and AUC and pAUC of
those clips against the unchanged anomalous clips (does the ranking hold).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from anomalyd.audio import list_audio_files, load_audio
from anomalyd.bundle import Bundle, load_bundle
from anomalyd.errors import AnomalydError
from training import evaluate

Transform = Callable[[npt.NDArray[np.float32], int], npt.NDArray[np.float32]]


def _gain(db: float) -> Transform:
    def apply(samples: npt.NDArray[np.float32], rate: int) -> npt.NDArray[np.float32]:
        return np.asarray(np.clip(samples * np.float32(10 ** (db / 20)), -1.0, 1.0), dtype=np.float32)

    return apply


def _round_trip(via: int) -> Transform:
    def apply(samples: npt.NDArray[np.float32], rate: int) -> npt.NDArray[np.float32]:
        up = soxr.resample(samples, rate, via, quality="HQ")
        return np.asarray(soxr.resample(up, via, rate, quality="HQ"), dtype=np.float32)[: len(samples)]

    return apply


CONDITIONS: dict[str, Transform | None] = {
    "as recorded": None,
    "-6 dB": _gain(-6.0),
    "-3 dB": _gain(-3.0),
    "+3 dB": _gain(3.0),
    "+6 dB": _gain(6.0),
    "16 -> 44.1 -> 16 kHz": _round_trip(44_100),
    "16 -> 48 -> 16 kHz": _round_trip(48_000),
}


@dataclass(frozen=True)
class Row:
    condition: str
    quiet_share: float  # normal clips on which the daemon raises no event
    auc: float  # changed normal clips against the unchanged anomalous ones
    pauc: float


def _write_changed(normal: Path, out: Path, transform: Transform, rate: int) -> None:
    out.mkdir(parents=True)
    for path in list_audio_files(normal):
        samples = load_audio(path, rate)
        sf.write(out / f"{path.stem}.wav", transform(samples, rate), rate, subtype="PCM_16")


def robustness(bundle: Bundle, normal: Path, anomaly: Path) -> list[Row]:
    rate = bundle.meta.features.sample_rate
    rows = []
    with tempfile.TemporaryDirectory(prefix="anomalyd-robustness-") as work:
        for i, (name, transform) in enumerate(CONDITIONS.items()):
            folder = normal
            if transform is not None:
                folder = Path(work) / f"condition{i}"
                _write_changed(normal, folder, transform, rate)
            _, metrics = evaluate.evaluate(bundle, folder, anomaly)
            rows.append(Row(name, 1.0 - metrics.fpr, metrics.auc, metrics.pauc))
    return rows


def table(rows_per_bundle: list[list[Row]]) -> str:
    """A Markdown table: each condition's figures as the mean over bundles (seeds), and per bundle."""
    lines = [
        "| normal clips | no event, mean (per seed) | AUC % | pAUC % |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate(CONDITIONS):
        got = [rows[i] for rows in rows_per_bundle]
        quiet = np.array([r.quiet_share for r in got]) * 100
        auc = np.array([r.auc for r in got]) * 100
        pauc = np.array([r.pauc for r in got]) * 100
        lines.append(
            f"| {name} | {quiet.mean():.0f} % ({' / '.join(f'{q:.0f}' for q in quiet)}) "
            f"| {auc.mean():.2f} | {pauc.mean():.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.robustness", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--bundle", type=Path, required=True, action="append", help="bundle (repeatable)")
    parser.add_argument("--normal", type=Path, required=True, help="folder of normal test clips")
    parser.add_argument("--anomaly", type=Path, required=True, help="folder of anomalous test clips")
    args = parser.parse_args(argv)
    try:
        print(table([robustness(load_bundle(b), args.normal, args.anomaly) for b in args.bundle]))
    except AnomalydError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
