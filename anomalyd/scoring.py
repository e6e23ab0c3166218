"""Clip scoring: audio -> log-mel -> tiles -> reconstruction errors -> window scores -> one score, a verdict.

A window's score comes from its pooled reconstruction error (see `anomalyd.tiles.score_pooled`), its tiles
each reconstructed once (anomalyd/tiles.py).
A clip's score is the mean of its window scores (windows every `hop_frames` frames), as in the DCASE
baselines: a fault that lasts the whole clip lifts every window, and one loud transient cannot by itself
flag a clip. Clip scores rank files (AUC); verdicts come from the daemon's detector replayed over the
window scores (`anomalyd.replay`), the one threshold definition.

Files are scored as a stream (the daemon's own `StreamingWindows`), block by block, so memory does not
grow with a file's length. A window score that is not a finite number is a `ScoreError`: there is no
verdict for that clip, and it is never compared with the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from anomalyd.audio import stream_audio
from anomalyd.bundle import Bundle
from anomalyd.errors import AudioError, ScoreError
from anomalyd.features import LogMel
from anomalyd.inference import Autoencoder, open_autoencoder
from anomalyd.residual import ResidualStats
from anomalyd.streaming import StreamingWindows, Tile, Window
from anomalyd.tiles import (
    TileStore,
    pool_windows,
    reconstruct_into,
    score_pooled,
    score_windows,
    tile_residuals,
    window_blocks,
)
from anomalyd.windows import Normalisation, WindowGeometry, slice_windows

# Log-mel frames computed at once when scoring a file: bounds the FFT's memory, and is large enough that
# the per-call cost of small matrix products does not dominate (31 frames at a time is ~3x slower).
FRAMES_PER_STEP = 256
MAX_BATCH_TILES = 64  # tiles per ONNX Runtime call when scoring a file


@dataclass(frozen=True)
class ClipScore:
    score: float  # mean of the window scores
    window_errors: npt.NDArray[np.float32]  # (n_windows,)


@dataclass(frozen=True)
class ScoredFile:
    """A file streamed as the daemon streams it: each window's score and where it lies, for replays."""

    source: str
    clip: ClipScore
    start_samples: npt.NDArray[np.int64]  # (n_windows,) first sample of each window, at the model rate
    end_samples: npt.NDArray[np.int64]  # (n_windows,) one past its last sample
    quietest_dbfs: npt.NDArray[np.float64]  # (n_windows,) RMS of each window's quietest hop
    n_samples: int  # audio length, at the model rate
    sample_rate: int  # Hz

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate


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
        residual: ResidualStats | None = None,
    ) -> None:
        self.logmel = logmel
        self.geometry = geometry
        self.normalisation = normalisation
        self.autoencoder = autoencoder
        self.residual = residual  # None: a format 1 or 2 bundle, scored by the squared pooled residual

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int = 1) -> ClipScorer:
        meta = bundle.meta
        return cls(
            LogMel(meta.features, bundle.filterbank),
            meta.window,
            meta.normalisation,
            open_autoencoder(bundle, threads),
            meta.residual,
        )

    @property
    def min_samples(self) -> int:
        """Shortest audio, in samples at the model rate, that holds one whole window."""
        return self.logmel.params.n_samples(self.geometry.n_frames)

    def pooled_residuals(self, logmel: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n_mels, n_frames) log-mel -> (n_windows, n_mels, n_pool_blocks) pooled residuals."""
        g = self.geometry
        tiles = self.normalisation.apply(slice_windows(logmel, g.model_frames, g.tile_hop))
        blocks = [
            tile_residuals(batch, self.autoencoder.reconstruct(batch), g)
            for batch in np.array_split(tiles, max(1, -(-len(tiles) // MAX_BATCH_TILES)))
        ]
        firsts = np.array([g.first_tile(w) for w in range(g.n_windows(logmel.shape[1]))], dtype=np.int64)
        return pool_windows(window_blocks(np.concatenate(blocks), firsts, g), g)

    def score_logmel(self, logmel: npt.NDArray[np.float32], source: str = "audio") -> ClipScore:
        """Score a (n_mels, n_frames) log-mel of at least one window."""
        with np.errstate(over="ignore", invalid="ignore"):
            errors = score_pooled(self.pooled_residuals(logmel), self.residual)
        return self._clip_score(errors, source)

    def score_samples(self, samples: npt.NDArray[np.float32], source: str = "audio") -> ClipScore:
        self._check_length(len(samples), source)
        return self.score_logmel(self.logmel(samples), source)

    def score_file(self, path: Path, channel: int = 0) -> ClipScore:
        """Score a file block by block; raises AudioError or ScoreError naming the file."""
        return self.stream_file(path, channel).clip

    def stream_file(self, path: Path, channel: int = 0) -> ScoredFile:
        """Score a file block by block through the daemon's `StreamingWindows`, keeping every window's
        place and level (not its values), so that the daemon's detector can be replayed on it."""
        p = self.logmel.params
        streamer = StreamingWindows(self.logmel, self.geometry)
        store = TileStore(self.geometry)
        errors: list[npt.NDArray[np.float32]] = []
        places: list[tuple[int, int, float]] = []
        tiles: list[tuple[TileStore, Tile]] = []
        windows: list[tuple[TileStore, Window]] = []

        def score_pending() -> None:
            reconstruct_into(self.autoencoder, self.geometry, self.normalisation, tiles, MAX_BATCH_TILES)
            errors.append(score_windows(self.geometry, self.residual, windows))
            places.extend((w.start_sample, w.end_sample, w.quietest_dbfs) for _, w in windows)
            tiles.clear()
            windows.clear()

        blocks = stream_audio(path, p.sample_rate, channel)
        for block in rechunk(blocks, FRAMES_PER_STEP * p.hop_length):
            step = streamer.push(block)
            tiles.extend((store, tile) for tile in step.tiles)
            windows.extend((store, window) for window in step.windows)
            if len(tiles) >= MAX_BATCH_TILES:
                score_pending()
        self._check_length(streamer.samples_in, str(path))
        score_pending()
        starts, ends, quietest = zip(*places, strict=True)
        return ScoredFile(
            source=str(path),
            clip=self._clip_score(np.concatenate(errors), str(path)),
            start_samples=np.asarray(starts, dtype=np.int64),
            end_samples=np.asarray(ends, dtype=np.int64),
            quietest_dbfs=np.asarray(quietest, dtype=np.float64),
            n_samples=streamer.samples_in,
            sample_rate=p.sample_rate,
        )

    def _check_length(self, n_samples: int, source: str) -> None:
        if n_samples < self.min_samples:
            rate = self.logmel.params.sample_rate
            raise AudioError(
                f"{source}: too short to score ({n_samples / rate:.2f} s, "
                f"one window needs {self.min_samples / rate:.2f} s)"
            )

    def _clip_score(self, errors: npt.NDArray[np.float32], source: str) -> ClipScore:
        finite = np.isfinite(errors)
        if not finite.all():
            first = int(np.argmin(finite))
            p = self.logmel.params
            start = first * self.geometry.hop_frames * p.hop_length / p.sample_rate
            raise ScoreError(
                f"{source}: window {first} (from {start:.2f} s) scored {float(errors[first])}, "
                "not a finite number: no verdict"
            )
        with np.errstate(over="ignore"):
            score = aggregate(errors)
        if not math.isfinite(score):
            raise ScoreError(f"{source}: clip score {score} is not a finite number: no verdict")
        return ClipScore(score=score, window_errors=errors)


def rechunk(blocks: Iterable[npt.NDArray[np.float32]], size: int) -> Iterator[npt.NDArray[np.float32]]:
    """The same samples in blocks of exactly `size` (the last one shorter)."""
    held: list[npt.NDArray[np.float32]] = []
    n_held = 0
    for block in blocks:
        held.append(block)
        n_held += len(block)
        if n_held < size:
            continue
        joined = np.concatenate(held)
        whole = len(joined) - len(joined) % size
        yield from (joined[i : i + size] for i in range(0, whole, size))
        held, n_held = [joined[whole:]], len(joined) - whole
    if n_held:
        yield np.concatenate(held)
