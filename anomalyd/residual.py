"""How a window's pooled residual becomes its score: each band weighed by how the model does on normal sound.

The pooled residual (`tiles.pool_windows`: the reconstruction error averaged over `pool_frames` frames)
is not equally telling in every mel band. Where the model rebuilds normal sound closely (the machine's own
tones and bands), a shift of a few tenths is news; where normal residuals swing widely (a factory's
background at 0 dB SNR, bands the model cannot predict), the same shift is not. So a bundle (format 3)
carries each band's mean and variance of the pooled residual over the training windows, computed by the
exported model as the runtime runs it, and a window's score is the mean over bands and blocks of
(residual - mean)^2 / variance: a diagonal Mahalanobis distance. DCASE 2023's autoencoder baseline uses the
full covariance; from minutes of audio a 128 x 128 covariance mostly models noise (docs/mimii.md).

The statistics come from the training windows, not the validation ones: there are four times as many, and
variances from two validation files were far too tight (docs/mimii.md, row 7a). The threshold, set on
validation windows the model has not seen, absorbs the difference between seen and unseen audio.

A band's variance is floored at VAR_FLOOR times the median band's, so that no band weighs more than 100
times a typical one: a band the model rebuilds almost exactly on training audio (a constant, digital
silence in a band) would otherwise turn a rounding difference into an alarm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

VAR_FLOOR = 0.01  # share of the median band's variance below which no band's variance goes
MIN_VAR = 1e-12  # and an absolute floor, for training audio the model rebuilds exactly in every band


@dataclass(frozen=True)
class ResidualStats:
    """Per-band mean and variance of the pooled residual over the training windows."""

    mean: npt.NDArray[np.float32]  # (n_mels,)
    var: npt.NDArray[np.float32]  # (n_mels,), floored
    n_blocks: int  # pooled residual blocks they were estimated from (windows x blocks per window)

    @classmethod
    def fit(cls, pooled: Iterable[npt.NDArray[np.float32]]) -> ResidualStats:
        """From batches of (n, n_mels, n_blocks) pooled residuals; sums in float64, one batch at a time."""
        count, total, squares = 0, None, None
        for batch in pooled:
            values = np.moveaxis(batch.astype(np.float64), 1, -1).reshape(-1, batch.shape[1])
            total = values.sum(axis=0) if total is None else total + values.sum(axis=0)
            squares = (values**2).sum(axis=0) if squares is None else squares + (values**2).sum(axis=0)
            count += len(values)
        if total is None or squares is None or count < 2:
            raise ValueError(f"residual statistics need at least 2 pooled residual blocks, got {count}")
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0) * count / (count - 1)
        floor = max(VAR_FLOOR * float(np.median(var)), MIN_VAR)
        return cls(mean.astype(np.float32), np.maximum(var, floor).astype(np.float32), count)

    def score(self, pooled: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, n_mels, n_blocks) pooled residuals -> (n,) window scores."""
        z2 = (pooled - self.mean[None, :, None]) ** 2 / self.var[None, :, None]
        return np.asarray(np.mean(z2, axis=(1, 2)), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": [float(v) for v in self.mean],
            "var": [float(v) for v in self.var],
            "n_blocks": self.n_blocks,
        }
