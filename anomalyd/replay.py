"""The daemon's verdict on a recording: its own detector replayed over the file's window scores.

This is the one threshold definition: a window is over when its score exceeds mean + k * std of the
bundle's validation *window* scores, and an event opens when the n-of-m rule says so (hold-off and
cooldown included), exactly as `anomalyd.stream.StreamRuntime` decides it live. `anomalyd score`,
`anomalyd calibrate` and `training.evaluate` all ask this module; none has a rule of its own.

Each file is replayed as one stream from its start (a fresh detector), as the daemon replays a file
source. Windows that hold digital silence anywhere are skipped, as the daemon skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.bundle import Threshold
from anomalyd.config import DetectorConfig, HealthConfig
from anomalyd.detector import Detector, Phase, WindowScore
from anomalyd.scoring import ScoredFile


@dataclass(frozen=True)
class Rule:
    """What the daemon decides with: detector settings, silence level, and the window threshold."""

    detector: DetectorConfig
    threshold: float  # window score above which a window is over
    silence_dbfs: float = HealthConfig().silence_dbfs

    @classmethod
    def for_k(cls, threshold: Threshold, k: float, detector: DetectorConfig, silence_dbfs: float) -> Rule:
        return cls(detector, threshold.window_scores.threshold(k), silence_dbfs)


def scored_mask(scored: ScoredFile, silence_dbfs: float) -> npt.NDArray[np.bool_]:
    """Which windows the daemon scores (the others hold digital silence somewhere)."""
    return np.asarray(scored.quietest_dbfs >= silence_dbfs)


def event_starts(scored: ScoredFile, rule: Rule) -> list[int]:
    """Start samples of the events the daemon would open on this file, in order."""
    mask = scored_mask(scored, rule.silence_dbfs)
    errors = scored.clip.window_errors
    if int(np.count_nonzero((errors > rule.threshold) & mask)) < rule.detector.n:
        return []  # the n-of-m rule cannot be met anywhere: no need to step through the windows
    detector = Detector(rule.detector, rule.threshold, scored.sample_rate)
    starts = []
    for index in np.flatnonzero(mask).tolist():
        window = WindowScore(
            index, int(scored.start_samples[index]), int(scored.end_samples[index]), float(errors[index])
        )
        starts += [t.start_sample for t in detector.push(window) if t.phase == Phase.START]
    return starts


def first_event_seconds(scored: ScoredFile, rule: Rule) -> float | None:
    """Seconds from the file's start to the start of the first event it raises; None: no event."""
    starts = event_starts(scored, rule)
    return starts[0] / scored.sample_rate if starts else None


def all_silent(scored: ScoredFile, silence_dbfs: float) -> bool:
    """Every window holds digital silence: the daemon scores none of them, so the file cannot be judged."""
    return not bool(scored_mask(scored, silence_dbfs).any())


def describe_verdict(seconds: float | None) -> str:
    return "no event" if seconds is None else f"event at {seconds:.2f} s"
