"""Windows of log-mel frames, and the normalisation the model was trained with.

A window is `n_frames` consecutive log-mel frames: the model's unit of input and of reconstruction error.
The default, 64 frames (64 x 32 ms = 2.05 s), holds many revolutions of any shaft faster than 30 rpm and
is a multiple of 8, so the three stride-2 convolutions of the autoencoder halve it cleanly (128 x 64 ->
16 x 8). Windows start every `hop_frames` frames; 16 frames (0.51 s) makes the daemon answer within about
half a second while each frame is still scored four times.

A window's score is not the plain per-value squared error. The fine structure of broadband machine noise
is random: even a perfect model of the normal sound cannot predict it, and its squared residual buries a
small but steady change of the machine's spectrum (measured on MIMII fan id_00: AUC 0.52 with the plain
error). So the residual is first averaged over blocks of `pool_frames` consecutive frames: the random part
averages away, a systematic one (a new tone, a shifted band, repeating impulses) does not.
`pool_frames = 1` gives the plain mean squared error. The default pools the whole window (64 frames): a
machine's faults that matter to a monitor last longer than a window, and on MIMII fan id_00 the whole-window
mean ranked faults better than 16-frame blocks (docs/mimii.md, ablation).

Before normalisation each window may be levelled (`levelling = "window_power"`): its power level, in dB,
is subtracted from every value, so the model sees the window's spectral shape (how its energy is spread
over bands and frames) and a microphone chain a few dB quieter or louder changes nothing. The level is
10 log10 of the mean power over the window's bands and frames: what a sound level meter would read through
the same filterbank, shifted exactly by any gain. A window is levelled on its own, so a stream needs nothing
from before it and streaming equals offline window for window. Bundles from before levelling have
`levelling = "none"` and score as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.residual import ResidualStats

N_FRAMES = 64  # frames per window, 2.05 s at 16 kHz / hop 512
HOP_FRAMES = 16  # frames between window starts when scoring, 0.51 s
POOL_FRAMES = 64  # frames averaged in the residual before squaring: the whole window


@dataclass(frozen=True)
class WindowGeometry:
    n_frames: int = N_FRAMES  # log-mel frames per window
    hop_frames: int = HOP_FRAMES  # frames between consecutive window starts
    pool_frames: int = POOL_FRAMES  # frames per residual block; divides n_frames

    def n_windows(self, total_frames: int) -> int:
        """How many whole windows fit in `total_frames` frames."""
        if total_frames < self.n_frames:
            return 0
        return 1 + (total_frames - self.n_frames) // self.hop_frames


def pool_residual(
    windows: npt.NDArray[np.float32], reconstructions: npt.NDArray[np.float32], pool_frames: int
) -> npt.NDArray[np.float32]:
    """(n, n_mels, n_frames) inputs and reconstructions -> (n, n_mels, n_frames // pool_frames): the
    reconstruction error averaged over each block of `pool_frames` frames."""
    n, n_mels, n_frames = windows.shape
    assert reconstructions.shape == windows.shape, (reconstructions.shape, windows.shape)
    assert n_frames % pool_frames == 0, (n_frames, pool_frames)
    residual = (reconstructions - windows).reshape(n, n_mels, n_frames // pool_frames, pool_frames)
    return np.asarray(residual.mean(axis=3), dtype=np.float32)


def window_errors(
    windows: npt.NDArray[np.float32],
    reconstructions: npt.NDArray[np.float32],
    pool_frames: int,
    residual: ResidualStats | None = None,
) -> npt.NDArray[np.float32]:
    """(n, n_mels, n_frames) inputs and reconstructions -> (n,) scores.

    With the bundle's residual statistics (format 3): the mean over bands and blocks of the pooled residual's
    squared distance from its training mean, in units of its training variance (anomalyd/residual.py).
    Without (formats 1 and 2): the mean over bands and blocks of the pooled residual squared.
    """
    pooled = pool_residual(windows, reconstructions, pool_frames)
    if residual is not None:
        return residual.score(pooled)
    return np.asarray(np.mean(pooled**2, axis=(1, 2)), dtype=np.float32)


def slice_windows(logmel: npt.NDArray[np.float32], n_frames: int, hop_frames: int) -> npt.NDArray[np.float32]:
    """(n_mels, total_frames) -> (n_windows, n_mels, n_frames), a read-only view with no copy."""
    if logmel.shape[1] < n_frames:
        return np.empty((0, logmel.shape[0], n_frames), dtype=logmel.dtype)
    view = np.lib.stride_tricks.sliding_window_view(logmel, n_frames, axis=1)  # (n_mels, n_win, n_frames)
    return view[:, ::hop_frames].transpose(1, 0, 2)


LEVELLINGS = ("none", "window_power")  # how a window's overall level is removed before normalisation


def window_level_db(windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(n, n_mels, n_frames) log-mel in dB -> (n,) power level in dB: 10 log10 of the mean power."""
    # Relative to each window's loudest value, so that 10**(x/10) neither overflows nor underflows.
    peak = windows.max(axis=(1, 2), keepdims=True)
    power = np.exp((windows - peak) * np.float32(np.log(10.0) / 10.0))  # float32: 10**(x/10), at most 1
    level = 10.0 * np.log10(power.mean(axis=(1, 2), dtype=np.float64)) + peak[:, 0, 0]
    return np.asarray(level, dtype=np.float32)


def level_windows(windows: npt.NDArray[np.float32], levelling: str) -> npt.NDArray[np.float32]:
    """Windows as the model sees them before normalisation: each one's power level subtracted, or as is."""
    if levelling == "none" or len(windows) == 0:
        return windows
    return np.asarray(windows - window_level_db(windows)[:, None, None], dtype=np.float32)


@dataclass(frozen=True)
class Normalisation:
    """Per-mel-band mean and standard deviation (dB) of the training windows, after levelling."""

    mean: npt.NDArray[np.float32]  # (n_mels,)
    std: npt.NDArray[np.float32]  # (n_mels,)
    levelling: str = "none"  # one of LEVELLINGS

    @classmethod
    def fit(
        cls,
        logmels: list[npt.NDArray[np.float32]],
        floor: float = 1e-3,
        levelling: str = "none",
        geometry: WindowGeometry | None = None,
    ) -> Normalisation:
        """Statistics over every value of the windows (of `geometry`) of the given (n_mels, n_frames)
        arrays, levelled first; std floored at `floor` dB. Without levelling, over every frame."""
        if levelling not in LEVELLINGS:
            raise ValueError(f"levelling must be one of {', '.join(LEVELLINGS)}, got {levelling!r}")
        if levelling == "none":
            frames = np.concatenate(logmels, axis=1).astype(np.float64)
            std = np.maximum(frames.std(axis=1), floor)
            return cls(frames.mean(axis=1).astype(np.float32), std.astype(np.float32))
        geometry = geometry or WindowGeometry()
        n_mels = logmels[0].shape[0]
        total, squares, count = np.zeros(n_mels), np.zeros(n_mels), 0
        for logmel in logmels:
            levelled = level_windows(slice_windows(logmel, geometry.n_frames, geometry.hop_frames), levelling)
            values = levelled.transpose(1, 0, 2).reshape(n_mels, -1).astype(np.float64)
            total += values.sum(axis=1)
            squares += (values**2).sum(axis=1)
            count += values.shape[1]
        if count == 0:
            raise ValueError(f"no whole window of {geometry.n_frames} frames to fit the normalisation on")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return cls(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32), levelling)

    def apply(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, n_mels, n_frames) dB -> levelled and normalised float32 of the same shape."""
        levelled = level_windows(windows, self.levelling)
        return ((levelled - self.mean[:, None]) / self.std[:, None]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "levelling": self.levelling}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float32),
            std=np.asarray(data["std"], dtype=np.float32),
            levelling=str(data.get("levelling", "none")),
        )
