"""Split normal audio by time: contiguous blocks, each wholly for training or for validation.

Each file's log-mel frames are cut into blocks of `block_frames` (10 s by default); a file shorter than a
block is one block, so a folder of short clips still splits by file, and one long recording splits into
many blocks. A remainder too short to hold a window joins the last block. Consecutive blocks of a file are
`gap_frames` apart so that they share no sample (frames overlap by n_fft - hop samples). A seeded shuffle
then gives `val_fraction` of the blocks (at least 2: a standard deviation needs two) to validation.
Windows are sliced inside blocks only, so no training window holds a sample of a validation block.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from anomalyd.features import FeatureParams
from anomalyd.windows import Normalisation, WindowGeometry

MIN_TRAIN_BLOCKS = 1
MIN_VAL_BLOCKS = 2  # the threshold's standard deviation needs two validation scores
TRAIN, VAL = "T", "V"  # a block's role, as model.json's `training.files[].blocks` spells it


@dataclass(frozen=True)
class Block:
    recording: int  # index into the recordings list
    index: int  # block number within its recording
    start: int  # first frame
    stop: int  # one past the last frame


@dataclass(frozen=True)
class Split:
    train: list[Block]
    val: list[Block]

    def roles(self, recording: int) -> str:
        """One letter per block of a recording, in time order: T training, V validation."""
        val = {b.index for b in self.val if b.recording == recording}
        train = {b.index for b in self.train if b.recording == recording}
        return "".join(VAL if i in val else TRAIN for i in sorted(val | train))


def gap_frames(params: FeatureParams) -> int:
    """Frames skipped between blocks so that no sample is in both: frames overlap by n_fft - hop samples."""
    return max(0, math.ceil(params.n_fft / params.hop_length) - 1)


def block_frames(params: FeatureParams, block_seconds: float) -> int:
    """Log-mel frames in a block of `block_seconds`."""
    return int(block_seconds * params.sample_rate / params.hop_length)


def cut(recording: int, n_frames: int, size: int, gap: int, min_frames: int) -> list[Block]:
    """Blocks of `size` frames every `size + gap` frames; the last absorbs a remainder under `min_frames`."""
    blocks: list[Block] = []
    start = 0
    while n_frames - start >= min_frames:
        stop = start + size
        if n_frames - (stop + gap) < min_frames:  # what would follow cannot hold a window: keep it here
            stop = n_frames
        blocks.append(Block(recording, len(blocks), start, stop))
        start = stop + gap
    return blocks


def too_little(total_seconds: float, n_files: int, n_blocks: int, block_seconds: float, window: float) -> str:
    one_file = (MIN_TRAIN_BLOCKS + MIN_VAL_BLOCKS - 1) * block_seconds + window
    return (
        f"too little normal audio: {total_seconds:.1f} s in {n_files} usable "
        f"file{'' if n_files == 1 else 's'} makes {n_blocks} block{'' if n_blocks == 1 else 's'}; "
        f"training needs {MIN_TRAIN_BLOCKS + MIN_VAL_BLOCKS} ({MIN_TRAIN_BLOCKS} to train on, "
        f"{MIN_VAL_BLOCKS} to validate and set the threshold): at least {one_file:.1f} s in one recording, "
        f"or {MIN_TRAIN_BLOCKS + MIN_VAL_BLOCKS} files of {window:.2f} s or more"
    )


def split_blocks(blocks: list[Block], val_fraction: float, seed: int) -> Split:
    """Seeded choice of whole blocks for validation: `val_fraction` of them, at least 2, never all.

    Blocks come in (recording, time) order; with one block per file this is the split by file.
    """
    n_val = min(len(blocks) - MIN_TRAIN_BLOCKS, max(MIN_VAL_BLOCKS, round(len(blocks) * val_fraction)))
    shuffled = list(blocks)
    random.Random(seed).shuffle(shuffled)
    return Split(sorted(shuffled[n_val:], key=_order), sorted(shuffled[:n_val], key=_order))


def _order(block: Block) -> tuple[int, int]:
    return block.recording, block.index


class WindowSet:
    """Windows sliced inside the given blocks only, levelled and normalised a batch at a time.

    Holds the blocks' frames once (windows overlap 8x at a hop of 8 frames: stacking them all would take
    8x the memory); `take` copies only the windows asked for and prepares them with the runtime's own
    `Normalisation.apply`, so training sees exactly what the daemon will.
    """

    def __init__(
        self, logmels: list[npt.NDArray[np.float32]], n_frames: int, hop_frames: int, norm: Normalisation
    ) -> None:
        geometry = WindowGeometry(n_frames, hop_frames, n_frames, 0)
        starts, offset = [], 0
        for logmel in logmels:
            starts.append(offset + hop_frames * np.arange(geometry.n_windows(logmel.shape[1])))
            offset += logmel.shape[1]
        self.starts: npt.NDArray[np.int64] = np.concatenate(starts).astype(np.int64)  # first frame of each
        self.n_frames = n_frames
        self.norm = norm
        frames = np.concatenate(logmels, axis=1)  # (n_mels, total frames), dB
        self._view = np.lib.stride_tricks.sliding_window_view(frames, n_frames, axis=1)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def numel(self) -> int:
        """Values in all windows together (n_windows * n_mels * n_frames)."""
        return len(self) * int(self._view.shape[0]) * self.n_frames

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """All windows in order, `size` at a time (the last batch may be shorter), as `take` gives them."""
        for start in range(0, len(self), size):
            yield self.take(np.arange(start, min(start + size, len(self))))

    def take(self, index: npt.NDArray[np.int64] | torch.Tensor) -> torch.Tensor:
        """The windows at `index` as a (len(index), 1, n_mels, n_frames) float32 tensor."""
        chosen = self._view[:, self.starts[np.asarray(index)]]  # (n_mels, n, n_frames), a copy
        windows = self.norm.apply(np.ascontiguousarray(chosen.transpose(1, 0, 2)))
        return torch.from_numpy(windows)[:, None]
