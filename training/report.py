"""The evaluation report: one self-contained HTML file an engineer can read and pass on.

Sections: summary (model, files, AUC/pAUC, the daemon's verdict at the bundle's k, warnings); ROC; score
histograms (clip scores and window scores, normal against anomalous, with the window threshold); a k sweep
(false events per hour on the normal audio and detection rate on the anomalous files, through the same
replay of the daemon's detector as `anomalyd calibrate`); per-file scores and verdicts; log-mel images of
the highest-scoring normal and the lowest-scoring anomalous clips, the ones to listen to first.

Images are PNG embedded as base64 data URIs; the file references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_curve

from anomalyd.audio import load_audio
from anomalyd.bundle import Bundle
from anomalyd.bundle_schema import MAX_K
from anomalyd.calibrate import Evidence
from anomalyd.errors import AudioError
from anomalyd.features import LogMel
from anomalyd.replay import describe_verdict, scored_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from training.evaluate import Evaluation

SWEEP_KS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)  # plus the bundle's own k
EXTREME_CLIPS = 3  # log-mel images of this many normal and anomalous clips

STYLE = """
body { font-family: sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.bundle { font-weight: bold; background: #eef; }
td.ANOMALY { color: #b00; font-weight: bold; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5rem 1rem; }
img { max-width: 100%; }
"""


def sweep_ks(bundle_k: float) -> list[float]:
    return sorted(k for k in {*SWEEP_KS, bundle_k} if 0 <= k <= MAX_K)


def k_sweep(evaluation: Evaluation, ks: Sequence[float]) -> list[Evidence]:
    """The daemon's detector replayed at each k: events on the normal audio, detection on the anomalous."""
    return [evaluation.replayer.at_k(k) for k in ks]


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(f'<td class="{html.escape(c)}">{html.escape(c)}</td>' for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _roc(evaluation: Evaluation) -> str:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    m = evaluation.metrics
    labels = np.array([s.label for s in evaluation.scores])
    values = np.array([s.score for s in evaluation.scores])
    fpr, tpr, _ = roc_curve(labels, values)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {m.auc:.3f}, pAUC {m.pauc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.axvline(0.1, linestyle="--", color="grey", linewidth=0.8, label="pAUC range (FPR <= 0.1)")
    ax.scatter([m.fpr], [m.tpr], color="red", zorder=3, label=f"daemon verdict at k = {m.k:g}")
    ax.set(
        xlabel="false positive rate (files)", ylabel="true positive rate (files)", title="ROC of clip scores"
    )
    ax.legend(loc="lower right")
    return _img(_png(fig), "ROC curve")


def _window_scores(evaluation: Evaluation, anomalous: bool) -> npt.NDArray[np.float32]:
    r = evaluation.replayer
    files = r.anomaly if anomalous else r.normal
    if not files:
        return np.empty(0, dtype=np.float32)
    return np.concatenate([f.clip.window_errors[scored_mask(f, r.silence_dbfs)] for f in files])


def _histograms(evaluation: Evaluation) -> str:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    m = evaluation.metrics
    labels = np.array([s.label for s in evaluation.scores])
    clips = np.array([s.score for s in evaluation.scores])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (clips[labels == 0], clips[labels == 1], "clip score (mean window score)", "files"),
        (_window_scores(evaluation, False), _window_scores(evaluation, True), "window score", "windows"),
    )
    for ax, (normal, anomaly, what, unit) in zip(axes, panels, strict=True):
        both = np.concatenate([normal, anomaly, [m.threshold]])
        bins = np.linspace(float(both.min()), float(both.max()), 40).tolist()
        ax.hist(normal, bins=bins, alpha=0.6, label=f"normal ({len(normal)})")
        ax.hist(anomaly, bins=bins, alpha=0.6, label=f"anomalous ({len(anomaly)})")
        ax.axvline(m.threshold, color="red", linestyle="--", label=f"window threshold {m.threshold:.4f}")
        ax.set(xlabel=what, ylabel=unit)
        ax.legend()
    return _img(_png(fig), "score histograms")


def _logmels(bundle: Bundle, evaluation: Evaluation) -> str:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    normal = sorted((s for s in evaluation.scores if s.label == 0), key=lambda s: -s.score)[:EXTREME_CLIPS]
    anomaly = sorted((s for s in evaluation.scores if s.label == 1), key=lambda s: s.score)[:EXTREME_CLIPS]
    chosen = [("highest-scoring normal", s) for s in normal] + [
        ("lowest-scoring anomalous", s) for s in anomaly
    ]
    meta = bundle.meta
    logmel = LogMel(meta.features, bundle.filterbank)
    parts = []
    for title, s in chosen:
        try:
            spectrum = logmel(load_audio(s.path, meta.features.sample_rate))
        except AudioError as exc:
            parts.append(f"<p>{html.escape(str(exc))}</p>")
            continue
        fig, ax = plt.subplots(figsize=(10, 2.6))
        seconds = spectrum.shape[1] * meta.features.hop_length / meta.features.sample_rate
        ax.imshow(
            spectrum, origin="lower", aspect="auto", extent=(0, seconds, 0, spectrum.shape[0]), cmap="magma"
        )
        ax.set(xlabel="seconds", ylabel="mel band", title=f"{title}: {s.path.name} (score {s.score:.4f})")
        if s.event_seconds is not None:
            ax.axvline(s.event_seconds, color="cyan", linestyle="--", label="event start")
            ax.legend(loc="upper right")
        parts.append(_img(_png(fig), f"log-mel of {s.path.name}"))
    return "\n".join(parts)


def _summary(bundle: Bundle, evaluation: Evaluation, warnings: Sequence[str]) -> str:
    m = evaluation.metrics
    t = bundle.meta.threshold
    calibration: dict[str, Any] | None = t.calibration
    if calibration is None:
        calibrated = "not calibrated (default k)"
    else:
        calibrated = (
            f"calibrated {calibration['calibrated_at']} for {calibration['false_alarms_per_day']:g} false "
            f"alarm(s)/day on {calibration['normal_seconds'] / 3600:.2f} h of normal audio"
        )
    rows = [
        ("model", m.model_id),
        ("bundle", str(bundle.path)),
        ("files", f"{m.n_normal} normal, {m.n_anomaly} anomalous, {m.n_skipped} skipped"),
        ("AUC / pAUC (clip scores)", f"{m.auc:.4f} / {m.pauc:.4f} (pAUC: FPR up to 0.1, McClish)"),
        (
            "threshold",
            f"window score {m.threshold:.5f} = {t.window_scores.mean:.5f} + {m.k:g} x "
            f"{t.window_scores.std:.5f}; k {calibrated}",
        ),
        (
            "daemon verdict",
            f"events on {m.tpr:.0%} of anomalous files (TPR), {m.fpr:.0%} of normal files (FPR)",
        ),
    ]
    notes = "".join(f'<p class="warning">{html.escape(w)}</p>' for w in warnings)
    return notes + _table(("", ""), rows)


def _sweep_table(sweep: Sequence[Evidence], bundle_k: float) -> str:
    rows, classes = [], []
    for e in sweep:
        delay = "-" if e.median_delay is None else f"{e.median_delay:.2f}"
        detection = "-" if e.detection_rate is None else f"{e.detection_rate:.0%}"
        rows.append((
            f"{e.k:g}", f"{e.threshold:.5f}", str(e.events), f"{e.events / (e.normal_seconds / 3600):.2f}",
            f"{e.events_per_day_upper95 / 24:.2f}", detection, delay,
        ))  # fmt: skip
        classes.append("bundle" if e.k == bundle_k else "")
    header = ("k", "window threshold", "false events", "false events/hour", "95 % upper bound/hour",
              "detection rate", "median delay (s)")  # fmt: skip
    return _table(header, rows, classes)


def _files_table(evaluation: Evaluation) -> str:
    rows = [
        (str(s.path), "anomalous" if s.label else "normal", f"{s.score:.5f}",
         "ANOMALY" if s.anomalous else "normal", describe_verdict(s.event_seconds))
        for s in sorted(evaluation.scores, key=lambda s: (s.label, -s.score))
    ]  # fmt: skip
    return _table(("file", "label", "clip score", "daemon verdict", "event"), rows)


def render_report(bundle: Bundle, evaluation: Evaluation, warnings: Sequence[str] = ()) -> str:
    """The whole report as one HTML document."""
    import matplotlib  # noqa: PLC0415 - plotting is optional and slow to import

    matplotlib.use("Agg")
    k = evaluation.metrics.k
    sweep = k_sweep(evaluation, sweep_ks(k))
    hours = evaluation.replayer.normal_seconds / 3600
    title = f"Evaluation of {evaluation.metrics.model_id}"
    sections = [
        ("summary", "Summary", _summary(bundle, evaluation, warnings)),
        ("roc", "ROC", _roc(evaluation)),
        ("histograms", "Score histograms", _histograms(evaluation)),
        ("k-sweep", "k sweep",
         f"<p>The daemon's detector (n-of-m, hold-off, cooldown; default settings) replayed over every file "
         f"at each k, each file from its start: false events on the {hours:.2f} h of normal audio, and the "
         f"share of anomalous files with an event. The bundle's k is in bold. "
         f"<code>anomalyd calibrate</code> chooses k from a false-alarm budget the same way.</p>"
         + _sweep_table(sweep, k)),
        ("files", "Per-file scores", _files_table(evaluation)),
        ("logmel", "Log-mel of the clips nearest the boundary", _logmels(bundle, evaluation)),
    ]  # fmt: skip
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(name)}</h2>\n{content}</section>'
                     for sid, name, content in sections)  # fmt: skip
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_report(path: Path, bundle: Bundle, evaluation: Evaluation, warnings: Sequence[str] = ()) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(render_report(bundle, evaluation, warnings), encoding="utf-8")
    tmp.replace(path)
