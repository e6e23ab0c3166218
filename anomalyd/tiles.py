"""Each frame reconstructed once: windows scored from the residuals of the tiles they are made of.

Windows of 64 frames start every 16 frames, so a model that reconstructs each window anew (bundle formats
1-3) pushes every frame through the autoencoder four times. From format 4 the model's input is a *tile*:
`tile_frames` consecutive frames (16, one hop), tiles following one another without overlap from the
stream's first frame. Each tile is levelled, normalised and reconstructed once; a window's pooled residual
is then the mean of its tiles' residuals over each `pool_frames` block, as if the window had been
reconstructed in one piece. A window is whole tiles (tile_frames divides n_frames and hop_frames), so the
tile that completes a window completes with it: the score costs no wait.

Why tiles and not the model run over one continuous strip of frames: the autoencoder's output at a frame
depends on input up to about 28 frames (0.9 s) to either side, so a strip could score a window only that
much after it ended, or else needs a causal model. A tile's edges are zero-padded, as a window's always
were, and training sees exactly the tiles scoring sees (docs/mimii.md compares the two on real audio).

For formats 1-3 the same code runs with the window itself as the one tile: `WindowGeometry.model_frames`
is n_frames, and tiles start every hop_frames.

A tile's residual is kept as its means over blocks of `block_frames(geometry)` frames, the largest size
that both a tile and a pool block are whole numbers of; a window's pooled residual is the mean of the
blocks that make each of its pool blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from anomalyd.inference import Autoencoder
from anomalyd.residual import ResidualStats
from anomalyd.streaming import Tile, Window
from anomalyd.windows import Normalisation, WindowGeometry


def block_frames(geometry: WindowGeometry) -> int:
    return math.gcd(geometry.model_frames, geometry.pool_frames)


def tile_residuals(
    tiles: npt.NDArray[np.float32], reconstructions: npt.NDArray[np.float32], geometry: WindowGeometry
) -> npt.NDArray[np.float32]:
    """(n, n_mels, model_frames) inputs and reconstructions -> (n, n_mels, model_frames // block) block
    means of the residual."""
    n, n_mels, frames = tiles.shape
    assert reconstructions.shape == tiles.shape, (reconstructions.shape, tiles.shape)
    block = block_frames(geometry)
    # Not warned about: a broken model's non-finite output is refused (a file) or counted (a stream) later.
    with np.errstate(over="ignore", invalid="ignore"):
        residual = (reconstructions - tiles).reshape(n, n_mels, frames // block, block)
        return np.asarray(residual.mean(axis=3), dtype=np.float32)


def pool_windows(blocks: npt.NDArray[np.float32], geometry: WindowGeometry) -> npt.NDArray[np.float32]:
    """(n, n_mels, n_frames // block) block means of windows -> (n, n_mels, n_frames // pool_frames)."""
    n, n_mels, n_blocks = blocks.shape
    per_pool = geometry.pool_frames // block_frames(geometry)
    pooled = blocks.reshape(n, n_mels, n_blocks // per_pool, per_pool).mean(axis=3)
    return np.asarray(pooled, dtype=np.float32)


def window_blocks(
    tile_blocks: npt.NDArray[np.float32], first_tiles: npt.NDArray[np.int64], geometry: WindowGeometry
) -> npt.NDArray[np.float32]:
    """The block means of the windows starting at the given tiles (indices into `tile_blocks`):
    (n_tiles, n_mels, b) -> (n_windows, n_mels, tiles_per_window * b)."""
    index = first_tiles[:, None] + np.arange(geometry.tiles_per_window)  # (n_windows, tiles_per_window)
    chosen = tile_blocks[index]  # (n_windows, tiles_per_window, n_mels, b)
    n, t, n_mels, b = chosen.shape
    return np.ascontiguousarray(chosen.transpose(0, 2, 1, 3)).reshape(n, n_mels, t * b)


def score_pooled(pooled: npt.NDArray[np.float32], residual: ResidualStats | None) -> npt.NDArray[np.float32]:
    """(n, n_mels, n_pool_blocks) pooled residuals -> (n,) window scores.

    With the bundle's residual statistics (format 3 on): the mean over bands and blocks of the pooled
    residual's squared distance from its training mean, in units of its training variance
    (anomalyd/residual.py). Without (formats 1 and 2): the mean over bands and blocks of its square.
    """
    if residual is not None:
        return residual.score(pooled)
    return np.asarray(np.mean(pooled**2, axis=(1, 2)), dtype=np.float32)


class TileStore:
    """One stream's reconstructed tiles that a window still to be scored is made of."""

    def __init__(self, geometry: WindowGeometry) -> None:
        self.geometry = geometry
        self._blocks: dict[int, npt.NDArray[np.float32]] = {}  # tile index -> (n_mels, b)

    def __len__(self) -> int:
        """Tiles held."""
        return len(self._blocks)

    def add(self, index: int, blocks: npt.NDArray[np.float32]) -> None:
        self._blocks[index] = blocks

    def window(self, window: int) -> npt.NDArray[np.float32]:
        """(n_mels, n_frames // block) block means of window `window`; forgets the tiles no later window
        needs. Every tile of the window must have been added."""
        g = self.geometry
        first = g.first_tile(window)
        parts = [self._blocks[first + i] for i in range(g.tiles_per_window)]
        for index in [i for i in self._blocks if i < g.first_tile(window + 1)]:
            del self._blocks[index]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def clear(self) -> None:
        self._blocks.clear()


def reconstruct_into(
    autoencoder: Autoencoder,
    geometry: WindowGeometry,
    normalisation: Normalisation,
    tiles: Sequence[tuple[TileStore, Tile]],
    batch: int,
) -> None:
    """Level and normalise the tiles and reconstruct them, `batch` per ONNX Runtime call; keep each one's
    residual in its store."""
    for start in range(0, len(tiles), batch):
        chunk = tiles[start : start + batch]
        values = normalisation.apply(np.stack([tile.values for _, tile in chunk]))
        blocks = tile_residuals(values, autoencoder.reconstruct(values), geometry)
        for (store, tile), tile_blocks in zip(chunk, blocks, strict=True):
            store.add(tile.index, tile_blocks)


def score_windows(
    geometry: WindowGeometry, residual: ResidualStats | None, windows: Sequence[tuple[TileStore, Window]]
) -> npt.NDArray[np.float32]:
    """The scores of windows whose tiles are all in their stores, in one vectorised step."""
    if not windows:
        return np.empty(0, dtype=np.float32)
    blocks = np.stack([store.window(window.index) for store, window in windows])
    # Overflow is not warned about here: a score that is not finite is refused or counted by the caller.
    with np.errstate(over="ignore", invalid="ignore"):
        return score_pooled(pool_windows(blocks, geometry), residual)
