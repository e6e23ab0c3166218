"""Windows of log-mel frames, and the normalisation the model was trained with.

A window is `n_frames` consecutive log-mel frames: the unit of a score. The default, 64 frames
(64 x 32 ms = 2.05 s), holds many revolutions of any shaft faster than 30 rpm. Windows start every
`hop_frames` frames; 16 frames (0.51 s) makes the daemon answer within about half a second. By default the
model reconstructs each window whole, so each frame four times; a bundle of format 4 reconstructs tiles of
`tile_frames` (16) frames instead, each frame once, and puts a window's residual together from its four
tiles (anomalyd/tiles.py). Windows and tiles are multiples of 8 frames, so the three stride-2 convolutions
of the autoencoder halve them cleanly (128 x 64 -> 16 x 8).

A window's score is not the plain per-value squared error. The fine structure of broadband machine noise
is random: even a perfect model of the normal sound cannot predict it, and its squared residual buries a
small but steady change of the machine's spectrum (measured on MIMII fan id_00: AUC 0.52 with the plain
error). So the residual is first averaged over blocks of `pool_frames` consecutive frames: the random part
averages away, a systematic one (a new tone, a shifted band, repeating impulses) does not.
`pool_frames = 1` gives the plain mean squared error. The default pools the whole window (64 frames): a
machine's faults that matter to a monitor last longer than a window, and on MIMII fan id_00 the whole-window
mean ranked faults better than 16-frame blocks (docs/mimii.md, ablation).

Before normalisation each model input (a tile; a window before format 4) may be levelled
(`levelling = "window_power"`): its power level, in dB, is subtracted from every value, so the model sees
its spectral shape (how its energy is spread
over bands and frames) and a microphone chain a few dB quieter or louder changes nothing. The level is
10 log10 of the mean power over the input's bands and frames: what a sound level meter would read through
the same filterbank, shifted exactly by any gain. An input is levelled on its own, so a stream needs nothing
from before it and streaming equals offline tile for tile. (Levelling a tile by the power of the whole
window ending with it ranked MIMII's faults no better: docs/mimii.md.) Bundles from before levelling have
`levelling = "none"` and score as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

N_FRAMES = 64  # frames per window, 2.05 s at 16 kHz / hop 512
HOP_FRAMES = 16  # frames between window starts when scoring, 0.51 s
POOL_FRAMES = 64  # frames averaged in the residual before squaring: the whole window


@dataclass(frozen=True)
class WindowGeometry:
    n_frames: int = N_FRAMES  # log-mel frames per window
    hop_frames: int = HOP_FRAMES  # frames between consecutive window starts
    pool_frames: int = POOL_FRAMES  # frames per residual block; divides n_frames
    # Frames per model input (anomalyd/tiles.py, format 4); 0: each window is reconstructed whole.
    tile_frames: int = 0

    def n_windows(self, total_frames: int) -> int:
        """How many whole windows fit in `total_frames` frames."""
        if total_frames < self.n_frames:
            return 0
        return 1 + (total_frames - self.n_frames) // self.hop_frames

    @property
    def model_frames(self) -> int:
        """Frames of one model input: a tile, or a whole window for formats 1-3."""
        return self.tile_frames or self.n_frames

    @property
    def tile_hop(self) -> int:
        """Frames between the starts of consecutive model inputs."""
        return self.tile_frames or self.hop_frames

    @property
    def tiles_per_window(self) -> int:
        return self.n_frames // self.tile_frames if self.tile_frames else 1

    def first_tile(self, window: int) -> int:
        """Index of the first model input that window `window` is made of."""
        return window * self.hop_frames // self.tile_frames if self.tile_frames else window

    def problems(self) -> list[str]:
        """Reasons these sizes cannot work together; empty when they can."""
        if min(self.n_frames, self.hop_frames, self.pool_frames) <= 0 or self.n_frames % self.pool_frames:
            return [f"window sizes must be positive and pool_frames divide n_frames, got {self}"]
        if self.tile_frames < 0 or (
            self.tile_frames and (self.n_frames % self.tile_frames or self.hop_frames % self.tile_frames)
        ):
            return [f"tile_frames must divide n_frames and hop_frames (whole tiles per window), got {self}"]
        return []


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
