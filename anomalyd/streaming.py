"""Streaming features: audio arriving in blocks of any size -> the same tiles and windows as offline scoring.

Frames are computed as soon as their n_fft samples are in (no centre padding), tiles (the model's inputs,
anomalyd/tiles.py) and windows as soon as their frames are in, so that a stream yields, tile for tile and
window for window, what `anomalyd score` computes for the same audio.
Resampling uses soxr's streaming resampler, whose output equals soxr's one-shot resampling.
Sample indices count samples at the model rate since the stream began; they give every window its time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soxr

from anomalyd.features import LogMel
from anomalyd.health import dbfs, sums_of_squares
from anomalyd.windows import WindowGeometry


@dataclass(frozen=True)
class Window:
    index: int  # windows since the stream began
    start_sample: int  # first sample, at the model rate
    end_sample: int  # one past the last sample
    level_dbfs: float  # RMS of the window's audio (its first n_frames * hop samples)
    quietest_dbfs: float  # RMS of its quietest hop of audio: digital silence anywhere in it shows here


@dataclass(frozen=True)
class Tile:
    index: int  # model inputs since the stream began
    # (n_mels, model_frames) log-mel in dB as framed: levelled and normalised with the batch it is
    # reconstructed in (anomalyd/tiles.py), one numpy step for all streams' tiles instead of one per block.
    values: npt.NDArray[np.float32]


@dataclass
class Step:
    """What a block of audio completed, oldest first; a window's tiles come in this step or before."""

    tiles: list[Tile]
    windows: list[Window]


class Resampler:
    """Streaming resampling of (n,) float32 blocks; a pass-through when the rates match."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = (
            None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        )

    def __call__(self, samples: npt.NDArray[np.float32], last: bool = False) -> npt.NDArray[np.float32]:
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.float32)


class StreamingWindows:
    """Turns consecutive (n,) float32 blocks at the model rate into tiles and windows."""

    def __init__(self, logmel: LogMel, geometry: WindowGeometry) -> None:
        self.logmel = logmel
        self.geometry = geometry
        p = logmel.params
        self._samples = np.empty(0, dtype=np.float32)  # not yet framed
        self._frames = np.empty((p.n_mels, 0), dtype=np.float32)  # not yet fully windowed
        self._energy = np.empty(0, dtype=np.float64)  # sum of squares of each frame's first hop samples
        self._first_frame = 0  # absolute index of self._frames[:, 0]
        self._next_window = 0
        self._next_tile = 0
        self.samples_in = 0  # samples received so far

    def samples_wanted(self) -> int:
        """Samples still to come (at the model rate) before the next tile or window is complete."""
        p, g = self.logmel.params, self.geometry
        tile = self._next_tile * g.tile_hop + g.model_frames
        frames = min(tile, self._next_window * g.hop_frames + g.n_frames)
        return max(0, p.n_samples(frames) - self.samples_in)

    def push(self, samples: npt.NDArray[np.float32]) -> Step:
        """Add a block; return the tiles and windows it completes."""
        p, g = self.logmel.params, self.geometry
        step = Step([], [])
        self.samples_in += len(samples)
        self._samples = np.concatenate([self._samples, samples.astype(np.float32, copy=False)])
        n_new = p.n_frames(len(self._samples))
        if n_new == 0:
            return step
        new_frames = self.logmel(self._samples[: p.n_samples(n_new)])
        # Frame k of the buffer starts at k * hop, so the next frame starts n_new * hop samples in.
        new_energy = sums_of_squares(self._samples[: n_new * p.hop_length].reshape(n_new, p.hop_length))
        self._samples = self._samples[n_new * p.hop_length :]
        self._frames = np.concatenate([self._frames, new_frames], axis=1)
        self._energy = np.concatenate([self._energy, new_energy], dtype=np.float64)
        available = self._first_frame + self._frames.shape[1]

        n_tiles = max(0, (available - g.model_frames) // g.tile_hop + 1 - self._next_tile)
        if n_tiles:
            offsets = [(self._next_tile + i) * g.tile_hop - self._first_frame for i in range(n_tiles)]
            values = np.stack([self._frames[:, o : o + g.model_frames] for o in offsets])
            step.tiles = [Tile(self._next_tile + i, values[i]) for i in range(n_tiles)]
            self._next_tile += n_tiles

        while (start_frame := self._next_window * g.hop_frames) + g.n_frames <= available:
            offset = start_frame - self._first_frame
            frame_energy = self._energy[offset : offset + g.n_frames]
            energy = float(frame_energy.sum()) / (g.n_frames * p.hop_length)
            start_sample = start_frame * p.hop_length
            step.windows.append(
                Window(
                    index=self._next_window,
                    start_sample=start_sample,
                    end_sample=start_sample + p.n_samples(g.n_frames),
                    level_dbfs=dbfs(energy),
                    quietest_dbfs=dbfs(float(frame_energy.min()) / p.hop_length),
                )
            )
            self._next_window += 1
        keep = min(self._next_window * g.hop_frames, self._next_tile * g.tile_hop)
        drop = keep - self._first_frame
        if drop > 0:
            self._frames = self._frames[:, drop:]
            self._energy = self._energy[drop:]
            self._first_frame += drop
        return step
