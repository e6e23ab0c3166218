"""Clip scoring: audio -> log-mel -> windows -> reconstruction errors -> one score and a verdict.

A window's score is its pooled squared reconstruction error (see `anomalyd.windows.window_errors`).
A clip's score is the mean of its window scores (windows every `hop_frames` frames), as in the DCASE
baselines: a fault that lasts the whole clip lifts every window, and one loud transient cannot by itself
flag a clip. The threshold for clips is mean + k * std of the validation clips' scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anomalyd.audio import load_audio
from anomalyd.bundle import Bundle, Threshold
from anomalyd.errors import AudioError
from anomalyd.features import LogMel
from anomalyd.inference import Autoencoder
from anomalyd.windows import Normalisation, WindowGeometry, slice_windows, window_errors


@dataclass(frozen=True)
class ClipScore:
    score: float  # mean of the window scores
    window_errors: npt.NDArray[np.float32]  # (n_windows,)


def aggregate(window_errors: npt.NDArray[np.float32]) -> float:
    """A clip's score from its window scores: their mean."""
    return float(np.mean(window_errors, dtype=np.float64))


class ClipScorer:
    """Scores whole clips; the parts are those of one bundle (or of one being built)."""

    def __init__(
        self,
        logmel: LogMel,
        geometry: WindowGeometry,
        normalisation: Normalisation,
        autoencoder: Autoencoder,
    ) -> None:
        self.logmel = logmel
        self.geometry = geometry
        self.normalisation = normalisation
        self.autoencoder = autoencoder

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int = 1) -> ClipScorer:
        meta = bundle.meta
        return cls(
            LogMel(meta.features, bundle.filterbank),
            meta.window,
            meta.normalisation,
            Autoencoder(bundle.model_path, meta.features.n_mels, meta.window.n_frames, threads),
        )

    @property
    def min_samples(self) -> int:
        """Shortest audio, in samples at the model rate, that holds one whole window."""
        return self.logmel.params.n_samples(self.geometry.n_frames)

    def score_logmel(self, logmel: npt.NDArray[np.float32]) -> ClipScore:
        """Score a (n_mels, n_frames) log-mel of at least one window."""
        windows = slice_windows(logmel, self.geometry.n_frames, self.geometry.hop_frames)
        normalised = self.normalisation.apply(windows)
        errors = window_errors(
            normalised, self.autoencoder.reconstruct(normalised), self.geometry.pool_frames
        )
        return ClipScore(score=aggregate(errors), window_errors=errors)

    def score_samples(self, samples: npt.NDArray[np.float32], source: str = "audio") -> ClipScore:
        if len(samples) < self.min_samples:
            rate = self.logmel.params.sample_rate
            raise AudioError(
                f"{source}: too short to score ({len(samples) / rate:.2f} s, "
                f"one window needs {self.min_samples / rate:.2f} s)"
            )
        return self.score_logmel(self.logmel(samples))

    def score_file(self, path: Path, channel: int = 0) -> ClipScore:
        samples = load_audio(path, self.logmel.params.sample_rate, channel)
        return self.score_samples(samples, source=str(path))


def is_anomalous(score: float, threshold: Threshold) -> bool:
    return score > threshold.value
