"""The worker's inbox: what sources hand over, taken by the worker all at once.

Nothing that hands audio over ever waits here. A capture callback's block is dropped (and counted by the
caller) with `max_blocks` audio blocks waiting. A replayed file's block is refused (`offer`) while its
stream has `stream_blocks` waiting (or the inbox `max_blocks`): the file reader (anomalyd/sources/file.py)
keeps it and offers it again once the worker has taken everything, which it learns from `on_room`. (Readers
that each waited here, a thread per file, handed the interpreter to one another for every block: with
hundreds of files that cost more than reading them.) Source notices and control items are never refused:
they are few, and losing one would leave a stream's state untrue.

`coalesce` then merges each stream's consecutive blocks, so that a backlog costs one step per stream and
not one per block.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from anomalyd.sources.base import AudioBlock, SourceMessage, SourceNotice

Control = TypeVar("Control")


def _nothing() -> None:
    pass


# A merged step holds at most this much audio (one longer block stays whole): a stream's clip keeps this
# much audio beyond an event's lead-in, since an event can start that far back in the step that finds it.
# 2 s rather than 1: a step's fixed work (Python objects, calls, a log-mel call) is then spread over twice
# the audio, 7-14 % more streams per core with fast replays (docs/benchmarks.md), for 64 KB more of
# clip look-back per stream at 16 kHz.
MAX_MERGED_SECONDS = 2.0


class Inbox(Generic[Control]):
    def __init__(self, max_blocks: int, stream_blocks: int, on_room: Callable[[], None] = _nothing) -> None:
        """`on_room`: called (outside the lock) when the worker has taken blocks that `offer` had refused
        room to; it must not wait."""
        self.max_blocks = max_blocks
        self.stream_blocks = stream_blocks
        self.on_room = on_room
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the worker waits here for anything
        self._refused = False  # an offer was refused since the last take
        self._items: list[SourceMessage | Control] = []
        self._blocks = 0
        self._per_stream: Counter[str] = Counter()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put_nowait(self, message: SourceMessage) -> bool:
        """Never waits; False (the block is not kept) when `max_blocks` audio blocks are waiting."""
        return self._put(message, replay=False)

    def offer(self, message: SourceMessage) -> bool:
        """Never waits; False (the block is not kept) while the stream has `stream_blocks` (or the inbox
        `max_blocks`) audio blocks waiting. `on_room` is called once the worker has taken them."""
        return self._put(message, replay=True)

    def _put(self, message: SourceMessage, replay: bool) -> bool:
        with self._lock:
            if isinstance(message, AudioBlock):
                fits = self._room_for(message) if replay else self._blocks < self.max_blocks
                if not fits:
                    self._refused = self._refused or replay
                    return False
                self._count(message)
            self._items.append(message)
            self._ready.notify()
            return True

    def put_control(self, item: Control) -> None:
        with self._lock:
            self._items.append(item)
            self._ready.notify()

    def take(self, timeout: float) -> list[SourceMessage | Control]:
        """Everything waiting, oldest first, once there is something or `timeout` has passed ([])."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._ready.wait(left)
            items, self._items = self._items, []
            self._blocks = 0
            self._per_stream.clear()
            refused, self._refused = self._refused, False
        if refused:
            self.on_room()
        return items

    def take_merged(self, timeout: float) -> list[Merged | SourceNotice | Control]:
        """`take`, each stream's consecutive blocks merged (`coalesce`)."""
        return coalesce(self.take(timeout))

    def _room_for(self, block: AudioBlock) -> bool:
        return self._per_stream[block.stream] < self.stream_blocks and self._blocks < self.max_blocks

    def _count(self, block: AudioBlock) -> None:
        self._blocks += 1
        self._per_stream[block.stream] += 1


@dataclass(frozen=True)
class Merged:
    """Consecutive audio blocks of one stream at one rate, as one."""

    block: AudioBlock
    blocks: int  # how many were merged


def coalesce(items: list[SourceMessage | Control]) -> list[Merged | SourceNotice | Control]:
    """Each stream's consecutive audio blocks (at one rate, at most MAX_MERGED_SECONDS) merged into one, at
    the place of the first. What a stream's blocks are merged across is only other streams' audio: a
    stream's notice, or any control item, ends every merge that it follows."""
    runs: list[list[AudioBlock] | SourceNotice | Control] = []
    open_runs: dict[str, list[AudioBlock]] = {}
    for item in items:
        if isinstance(item, AudioBlock):
            run = open_runs.get(item.stream)
            if run is not None and run[0].rate == item.rate and _fits(run, item):
                run.append(item)
                continue
            open_runs[item.stream] = [item]
            runs.append(open_runs[item.stream])
        elif isinstance(item, SourceNotice):
            open_runs.pop(item.stream, None)
            runs.append(item)
        else:
            open_runs.clear()
            runs.append(item)
    return [_merge(run) if isinstance(run, list) else run for run in runs]


def _fits(run: list[AudioBlock], block: AudioBlock) -> bool:
    samples = sum(len(b.samples) for b in run) + len(block.samples)
    return samples <= MAX_MERGED_SECONDS * block.rate


def _merge(run: list[AudioBlock]) -> Merged:
    first = run[0]
    if len(run) == 1:
        return Merged(first, 1)
    samples = np.concatenate([b.samples for b in run])
    # The first block's arrival: a window the merge completes is timed from the earliest audio in it.
    return Merged(AudioBlock(first.stream, samples, first.rate, first.received), len(run))
