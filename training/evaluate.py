"""Evaluate a bundle on labelled recordings: AUC, pAUC, and the operating point at its threshold.

    python -m training.evaluate --bundle B --normal DIR --anomaly DIR [--report OUT.html] [--json OUT]
                                [--csv OUT] [--plots DIR]

AUC and pAUC rank files by their clip score (the mean window score). pAUC is the area under the ROC curve
up to a false-positive rate of 0.1, McClish-standardised, exactly as the DCASE 2020-2024 Task 2 evaluators
compute it (`sklearn.metrics.roc_auc_score(..., max_fpr=0.1)`).
TPR and FPR are the daemon's verdict, the one threshold definition (`anomalyd.replay`): the shares of
anomalous and normal files on which the daemon's detector, at the bundle's k and default settings, would
raise an event. Files that cannot be scored are skipped with a warning and counted, never fatal.
Outputs whose folder does not exist are refused before anything is scored; test files that were also
training or validation files (same SHA-256 as listed in model.json) are warned about.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score, roc_curve

from anomalyd.audio import list_audio_files
from anomalyd.bundle import Bundle, load_bundle, sha256_file
from anomalyd.calibrate import Replayer
from anomalyd.config import DetectorConfig, HealthConfig
from anomalyd.errors import AnomalydError, AudioError
from anomalyd.replay import Rule, first_event_seconds
from anomalyd.scoring import ClipScorer, ScoredFile

logger = logging.getLogger("training.evaluate")

MAX_FPR = 0.1  # DCASE Task 2 pAUC range


@dataclass(frozen=True)
class FileScore:
    path: Path
    label: int  # 0 normal, 1 anomaly
    score: float  # clip score: the mean window score, for ranking (AUC)
    event_seconds: float | None = None  # the daemon's verdict: its first event's start; None: no event

    @property
    def anomalous(self) -> bool:
        return self.event_seconds is not None


@dataclass(frozen=True)
class Metrics:
    auc: float
    pauc: float
    tpr: float  # share of anomalous files on which the daemon raises an event
    fpr: float  # share of normal files on which it does
    threshold: float  # the window-score threshold, mean + k * std of validation window scores
    k: float
    n_normal: int
    n_anomaly: int
    n_skipped: int
    model_id: str


def score_folder(scorer: ClipScorer, folder: Path) -> tuple[list[ScoredFile], int]:
    scored, skipped = [], 0
    for path in list_audio_files(folder):
        try:
            scored.append(scorer.stream_file(path))
        except AudioError as exc:
            logger.warning("skipping %s", exc)
            skipped += 1
    return scored, skipped


def compute_metrics(
    scores: list[FileScore], threshold: float, n_skipped: int, model_id: str, k: float = 3.0
) -> Metrics:
    labels = np.array([s.label for s in scores])
    values = np.array([s.score for s in scores])
    n_anomaly, n_normal = int(labels.sum()), int((labels == 0).sum())
    if n_anomaly == 0 or n_normal == 0:
        raise AnomalydError(f"need scored normal and anomalous files, got {n_normal} and {n_anomaly}")
    events = np.array([s.anomalous for s in scores])
    return Metrics(
        auc=float(roc_auc_score(labels, values)),
        pauc=float(roc_auc_score(labels, values, max_fpr=MAX_FPR)),
        tpr=float(events[labels == 1].mean()),
        fpr=float(events[labels == 0].mean()),
        threshold=threshold,
        k=k,
        n_normal=n_normal,
        n_anomaly=n_anomaly,
        n_skipped=n_skipped,
        model_id=model_id,
    )


def write_csv(scores: list[FileScore], threshold: float, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "score", "threshold", "verdict", "event_seconds"])
        for s in scores:
            verdict = "anomaly" if s.anomalous else "normal"
            label = "anomaly" if s.label else "normal"
            event = "" if s.event_seconds is None else f"{s.event_seconds:.2f}"
            writer.writerow([str(s.path), label, f"{s.score:.6f}", f"{threshold:.6f}", verdict, event])


def write_plots(scores: list[FileScore], metrics: Metrics, folder: Path) -> None:
    import matplotlib  # noqa: PLC0415 - plotting is optional and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.label for s in scores])
    values: npt.NDArray[np.float64] = np.array([s.score for s in scores])

    fpr, tpr, _ = roc_curve(labels, values)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {metrics.auc:.3f}, pAUC {metrics.pauc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.axvline(MAX_FPR, linestyle="--", color="grey", linewidth=0.8, label=f"pAUC range (FPR <= {MAX_FPR})")
    ax.scatter([metrics.fpr], [metrics.tpr], color="red", zorder=3, label="daemon verdict at the bundle's k")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {metrics.model_id}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "roc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(values.min(), values.max(), 40).tolist()
    ax.hist(values[labels == 0], bins=bins, alpha=0.6, label=f"normal ({metrics.n_normal})")
    ax.hist(values[labels == 1], bins=bins, alpha=0.6, label=f"anomaly ({metrics.n_anomaly})")
    ax.axvline(
        metrics.threshold, color="red", linestyle="--", label=f"window threshold {metrics.threshold:.4f}"
    )
    ax.set(xlabel="clip score (mean window reconstruction error)", ylabel="files", title="score histogram")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "histogram.png", dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class Evaluation:
    scores: list[FileScore]
    metrics: Metrics
    replayer: Replayer  # every file's window scores, for replaying the detector at other k


def run_evaluation(bundle: Bundle, normal: Path, anomaly: Path) -> Evaluation:
    """Stream every file once; clip scores for the ROC, the daemon's verdict at the bundle's k."""
    scorer = ClipScorer.from_bundle(bundle)
    normal_scored, skipped_n = score_folder(scorer, normal)
    anomaly_scored, skipped_a = score_folder(scorer, anomaly)
    threshold = bundle.meta.threshold
    rule = Rule.for_k(threshold, threshold.k, DetectorConfig(), HealthConfig().silence_dbfs)
    scores = [
        FileScore(Path(f.source), label, f.clip.score, first_event_seconds(f, rule))
        for label, files in ((0, normal_scored), (1, anomaly_scored))
        for f in files
    ]
    metrics = compute_metrics(
        scores, rule.threshold, skipped_n + skipped_a, bundle.meta.model_id, threshold.k
    )
    replayer = Replayer(
        normal_scored, anomaly_scored, threshold.window_scores, rule.detector, rule.silence_dbfs
    )
    return Evaluation(scores, metrics, replayer)


def evaluate(bundle: Bundle, normal: Path, anomaly: Path) -> tuple[list[FileScore], Metrics]:
    evaluation = run_evaluation(bundle, normal, anomaly)
    return evaluation.scores, evaluation.metrics


def check_outputs(outputs: dict[str, Path | None]) -> None:
    """Refuse, before any scoring, an output whose folder does not exist (an hour of scoring lost to a
    typo otherwise)."""
    for option, path in outputs.items():
        if path is not None and not path.absolute().parent.is_dir():
            raise AnomalydError(f"{option} {path}: folder {path.absolute().parent} does not exist")


def training_overlap(bundle: Bundle, scores: list[FileScore]) -> list[str]:
    """Test files whose content the bundle was trained or validated on (by SHA-256 in model.json)."""
    listed = {  # "files" since training splits by time; the two older lists before
        entry.get("sha256"): entry.get("name")
        for key in ("files", "train_files", "val_files")
        for entry in bundle.meta.training.get(key, [])
        if isinstance(entry, dict)
    }
    return [str(s.path) for s in scores if sha256_file(s.path) in listed]


def overlap_warning(files: list[str]) -> str:
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return (
        f"{len(files)} test file(s) were also training or validation files of this bundle (same content): "
        f"{shown}; their scores are optimistic"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--normal", type=Path, required=True, help="folder of normal recordings")
    parser.add_argument("--anomaly", type=Path, required=True, help="folder of anomalous recordings")
    parser.add_argument("--report", type=Path, help="write a self-contained HTML report here")
    parser.add_argument("--json", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--csv", type=Path, help="write per-file scores as CSV here")
    parser.add_argument("--plots", type=Path, help="folder for roc.png, histogram.png and scores.csv")
    args = parser.parse_args(argv)
    try:
        check_outputs(
            {"--report": args.report, "--json": args.json, "--csv": args.csv, "--plots": args.plots}
        )
        bundle = load_bundle(args.bundle)
        evaluation = run_evaluation(bundle, args.normal, args.anomaly)
    except AnomalydError as exc:
        logger.error("%s", exc)
        return 2
    scores, metrics = evaluation.scores, evaluation.metrics
    warnings = []
    overlap = training_overlap(bundle, scores)
    if overlap:
        warnings.append(overlap_warning(overlap))
        logger.warning("%s", warnings[-1])
    print(f"model      {metrics.model_id}")
    print(f"files      {metrics.n_normal} normal, {metrics.n_anomaly} anomalous, {metrics.n_skipped} skipped")
    print(f"AUC        {metrics.auc:.4f}")
    print(f"pAUC       {metrics.pauc:.4f}  (max FPR {MAX_FPR})")
    print(
        f"daemon     window threshold {metrics.threshold:.5f} (k {metrics.k:g}): "
        f"TPR {metrics.tpr:.3f}, FPR {metrics.fpr:.3f} (files with an event)"
    )
    if args.json:
        args.json.write_text(json.dumps(asdict(metrics), indent=2) + "\n")
    if args.csv:
        write_csv(scores, metrics.threshold, args.csv)
    if args.plots:
        write_plots(scores, metrics, args.plots)
        write_csv(scores, metrics.threshold, args.plots / "scores.csv")
    if args.report:
        from training.report import write_report  # noqa: PLC0415 - matplotlib is slow to import

        write_report(args.report, bundle, evaluation, warnings)
        print(f"report     {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
