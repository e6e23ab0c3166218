"""Audio that completes nothing yet, held back to be fed with the audio that follows it.

A capture stream's blocks are short (0.1 s by default) and the default model's inputs start every 16
frames (0.51 s): five blocks in six complete no tile and no window, yet each fed on its own was a worker
step (a log-mel call, health, clip and listener bookkeeping, Python objects), so that a capture stream
cost about five times a fast replay's CPU per second of audio. A block that is sure to complete nothing
(`StreamRuntime.completes_nothing`) therefore waits here and is fed, as one step, with the block that
completes something. No score comes later for it: a window is scored when the audio that completes it
arrives, as before.

What waits is at most HOLD_SECONDS of a stream's audio, so health, clips and live listeners see it at
most that much later. It is fed at once, before anything else of its stream, when the stream's source
reports (lost, ended, opened), when the stream is reconfigured, and when the worker idles or stops.
"""

from __future__ import annotations

import numpy as np

from anomalyd.sources.base import AudioBlock

HOLD_SECONDS = 1.0  # a stream's audio held at most


class Holdback:
    """Each stream's held blocks, oldest first; owned by its worker's thread."""

    def __init__(self) -> None:
        self._held: dict[str, list[AudioBlock]] = {}

    def streams(self) -> list[str]:
        return list(self._held)

    def samples(self, stream: str) -> int:
        return sum(len(b.samples) for b in self._held.get(stream, ()))

    def rate(self, stream: str) -> int | None:
        held = self._held.get(stream)
        return held[0].rate if held else None

    def keep(self, block: AudioBlock) -> None:
        """Hold `block` after its stream's held blocks (at the same rate: `release` them first otherwise)."""
        assert self.rate(block.stream) in (None, block.rate)
        self._held.setdefault(block.stream, []).append(block)

    def release(self, stream: str, then: AudioBlock | None = None) -> AudioBlock | None:
        """The stream's held blocks, followed by `then` (at their rate), as one block; None when there is
        neither. Timed from `then`'s arrival where there is one: the held audio completes nothing, so no
        window completes before `then` arrived."""
        blocks = self._held.pop(stream, [])
        if then is not None:
            blocks.append(then)
        if len(blocks) <= 1:
            return blocks[0] if blocks else None
        samples = np.concatenate([b.samples for b in blocks])
        return AudioBlock(stream, samples, blocks[0].rate, (then or blocks[0]).received)
