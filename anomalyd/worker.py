"""One worker thread: its share of the streams, from queued audio to events.

Capture callbacks and file readers only enqueue (anomalyd/inbox.py). The worker owns its streams' state;
it takes everything queued at once, turns audio into tiles and windows, reconstructs the tiles of all its
streams in batches (one ONNX Runtime call per model per batch), scores the windows, runs each stream's
detector, and hands events, status changes and clips to the store's writer thread. Reconfiguration swaps
streams inside the worker, between two takes.

Stopping is bounded whatever the backlog: once asked to stop, the worker processes queued audio for at
most `STOP_DRAIN_S`, discards (and counts) the rest, scores the windows it already holds, closes every
open event with reason `shutdown` and exits; nothing is scored after that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from anomalyd.holdback import HOLD_SECONDS, Holdback
from anomalyd.inbox import Inbox, Merged
from anomalyd.latency import LatencyRecord
from anomalyd.records import (
    AlarmState,
    AnomalyEvent,
    ClipJob,
    ScoreReport,
    SourceState,
    SourceStatus,
    utc_now,
)
from anomalyd.sources.base import AudioBlock, SourceNotice
from anomalyd.stream import Output, StreamRuntime
from anomalyd.streaming import Step, Tile, Window
from anomalyd.tap import AudioTap
from anomalyd.tiles import reconstruct_into, score_windows

logger = logging.getLogger(__name__)

QUEUE_BLOCKS = 2000  # audio blocks waiting for a worker (200 s of one stream at 0.1 s blocks)
STREAM_BLOCKS = 2  # a replayed file's blocks waiting for the worker (1 s each when taken as fast as it can)
STOP_DRAIN_S = 0.5  # at shutdown, queued audio is still processed for at most this long
# A window waits at most about this long, while the rest of a take is processed, for its batch to be
# scored: batches stay large when audio comes in backlogs, and a score follows its audio within
# milliseconds when it comes in real time.
SCORE_WITHIN_S = 0.002


class EventSink(Protocol):
    def put(self, item: AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState) -> None: ...


@dataclass(frozen=True)
class Swap:
    """Worker-thread instruction: end `remove` streams, then add `add` streams."""

    remove: list[str]
    add: list[StreamRuntime]
    done: threading.Event


@dataclass(frozen=True)
class Restate:
    """Worker-thread instruction: state every stream's alarm state (and known source health) again."""

    done: threading.Event


class Worker:
    def __init__(
        self,
        name: str,
        sink: EventSink,
        *,
        tap: AudioTap,
        latency: LatencyRecord,
        events_started: dict[str, int],
        stopping: threading.Event,
        max_batch: Callable[[], int],
        score_interval: float | None,
        on_room: Callable[[], None],
    ) -> None:
        """`events_started` and `latency` are shared by all workers; `max_batch` is read at each batch (a
        reload may change it); `score_interval`: seconds between ScoreReports per stream (None: none);
        `on_room`: the inbox's (the file reader's cue)."""
        self._sink = sink
        self.inbox: Inbox[Swap | Restate] = Inbox(QUEUE_BLOCKS, STREAM_BLOCKS, on_room)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.runtimes: dict[str, StreamRuntime] = {}  # changed by this thread only; read by any
        self.started = Restate(threading.Event())
        self.tap = tap
        self.latency = latency
        self.events_started = events_started
        self._stopping = stopping
        self._max_batch = max_batch
        self._score_interval = score_interval
        self._next_report: dict[str, float] = {}
        self._pending_tiles: list[tuple[StreamRuntime, Tile]] = []
        # Windows to score once their tiles are, with when the audio that completed them arrived.
        self._pending: list[tuple[StreamRuntime, Window, float]] = []
        self._pending_since = 0.0  # when the oldest pending window was completed
        self._holdback = Holdback()  # audio that completes nothing yet
        self.heartbeat = time.monotonic()
        self.windows_scored = 0
        self.blocks_discarded = 0  # queued audio given up at shutdown
        self.steps = 0  # audio fed to a stream (a block, blocks merged, or blocks held back and the next)

    def start(self, runtimes: Iterable[StreamRuntime]) -> None:
        self.runtimes = {r.name: r for r in runtimes}
        self.inbox.put_control(self.started)
        self._thread.start()

    def swap(self, remove: list[str], add: list[StreamRuntime]) -> threading.Event:
        """Have the worker end `remove` and take on `add`; the event is set once it has."""
        done = threading.Event()
        self.inbox.put_control(Swap(remove, add, done))
        return done

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end (after `stopping` is set); True if it did."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        stop_deadline: float | None = None
        while stop_deadline is None or time.monotonic() <= stop_deadline:
            self.heartbeat = time.monotonic()
            if stop_deadline is None and self._stopping.is_set():
                stop_deadline = time.monotonic() + STOP_DRAIN_S
            # Everything queued at once: a stream's backlog is one merged step, and a batch spans the
            # streams; scores follow each take, so no stream's audio runs more than a take ahead of them.
            items = self.inbox.take_merged(0.1 if stop_deadline else 0.25)
            if not items:
                if stop_deadline is not None:
                    break
                self._release_all()  # idle: nothing is held back for audio that may not come soon
            for done, item in enumerate(items):
                if stop_deadline is None and self._stopping.is_set():
                    stop_deadline = time.monotonic() + STOP_DRAIN_S
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    self._discard(items[done:])
                    break
                self.heartbeat = time.monotonic()
                self._handle(item)
                if len(self._pending_tiles) >= self._max_batch() or (
                    self._pending and time.monotonic() - self._pending_since > SCORE_WITHIN_S
                ):
                    self._score_pending()
            self._score_pending()
        self._discard(self.inbox.take_merged(0.0))
        self._release_all()
        self._score_pending()
        for runtime in self.runtimes.values():
            self._emit(runtime.finish(reason="shutdown"))

    def _discard(self, items: list[Merged | SourceNotice | Swap | Restate]) -> None:
        """At the stop deadline: audio still queued is given up (counted), never scored later."""
        for item in items:
            if isinstance(item, Merged):
                self.blocks_discarded += item.blocks
            elif isinstance(item, Swap | Restate):
                item.done.set()

    def _handle(self, item: Merged | SourceNotice | Swap | Restate) -> None:
        if isinstance(item, Restate):
            self._restate(self.runtimes.values())
            item.done.set()
            return
        if isinstance(item, Swap):
            for name in item.remove:
                self._release(name)
            self._score_pending()
            for name in item.remove:
                runtime = self.runtimes.pop(name, None)
                if runtime is not None:
                    self._emit(runtime.finish(reason="reconfigured"))
                if name not in {r.name for r in item.add}:
                    self.tap.end(name, "a reload removed the stream")
            for runtime in item.add:
                self.runtimes[runtime.name] = runtime
            self._restate(self.runtimes.values())
            item.done.set()
            return
        if isinstance(item, Merged):
            block = item.block
            runtime = self.runtimes.get(block.stream)
            if runtime is None:
                return  # audio still queued for a stream that was just removed
            if self._holdback.rate(block.stream) not in (None, block.rate):
                self._release(block.stream)
            samples = self._holdback.samples(block.stream) + len(block.samples)
            if samples < HOLD_SECONDS * block.rate and runtime.completes_nothing(samples, block.rate):
                self._holdback.keep(block)
                return
            self._feed(runtime, self._holdback.release(block.stream, block) or block)
            return
        runtime = self.runtimes.get(item.stream)
        if runtime is None:
            return  # a notice still queued for a stream that was just removed
        self._release(item.stream)  # what the source sent before its notice comes first
        if isinstance(item, SourceNotice):
            if item.state != SourceState.OK:
                self._hold(runtime, runtime.drain(), time.monotonic())
                self._score_pending()
            self._emit(runtime.notice(item))
            if self.tap.wants(item.stream):
                self.tap.notice(item.stream, item.state, item.detail)

    def _feed(self, runtime: StreamRuntime, block: AudioBlock) -> None:
        self.steps += 1
        out = runtime.feed(block)
        if out.audio is not None and len(out.audio) and self.tap.wants(block.stream):
            self.tap.audio(block.stream, out.audio, block.rate, runtime.model.rate)
        self._hold(runtime, out, block.received)
        self._emit(out)

    def _release(self, stream: str) -> None:
        """Feed the audio held back for `stream` (anomalyd/holdback.py)."""
        block = self._holdback.release(stream)
        runtime = self.runtimes.get(stream)
        if block is not None and runtime is not None:
            self._feed(runtime, block)

    def _release_all(self) -> None:
        for stream in self._holdback.streams():
            self._release(stream)

    def _restate(self, runtimes: Iterable[StreamRuntime]) -> None:
        """Every stream's alarm state and known source health, again: subscribers that missed a change
        (a crash, a retained message cleared, a reload) see the truth, never a stale `ON` or `unknown`."""
        now = utc_now()
        for runtime in runtimes:
            self._sink.put(AlarmState(runtime.name, runtime.event_open, now))
            if runtime.health.state is not None:
                self._sink.put(SourceStatus(runtime.node, runtime.name, runtime.health.state,
                                            runtime.health.detail, now))  # fmt: skip

    def _hold(self, runtime: StreamRuntime, step: Step | Output, received: float) -> None:
        """Queue a stream's new tiles and windows for the next batch; `received`: when the audio that
        completed them arrived."""
        self._pending_tiles += [(runtime, t) for t in step.tiles]
        if step.windows and not self._pending:
            self._pending_since = time.monotonic()
        self._pending += [(runtime, w, received) for w in step.windows]
        step.tiles, step.windows = [], []

    def _score_pending(self) -> None:
        """Reconstruct all pending tiles (one ONNX Runtime call per model per batch), then score all pending
        windows (one vectorised step per model)."""
        tiles, self._pending_tiles = self._pending_tiles, []
        pending, self._pending = self._pending, []
        tiles_by_model: dict[int, list[tuple[StreamRuntime, Tile]]] = defaultdict(list)
        for runtime, tile in tiles:
            tiles_by_model[id(runtime.model)].append((runtime, tile))
        for held in tiles_by_model.values():
            model = held[0][0].model
            stores = [(r.tiles, t) for r, t in held]
            meta = model.bundle.meta
            reconstruct_into(model.autoencoder, meta.window, meta.normalisation, stores, self._max_batch())
        by_model: dict[int, list[tuple[StreamRuntime, Window, float]]] = defaultdict(list)
        for held_window in pending:
            by_model[id(held_window[0].model)].append(held_window)
        for items in by_model.values():
            meta = items[0][0].model.bundle.meta
            scores = score_windows(meta.window, meta.residual, [(r.tiles, w) for r, w, _ in items])
            for (runtime, window, _), score in zip(items, scores, strict=True):
                self._emit(runtime.scored(window, float(score)))
            self.windows_scored += len(items)
        if pending:
            self.latency.add(time.monotonic() - np.array([received for _, _, received in pending]))
        self._report_scores({runtime.name: runtime for runtime, _, _ in pending})

    def _report_scores(self, runtimes: dict[str, StreamRuntime]) -> None:
        """The latest score of each stream, every score_interval seconds (for dashboards)."""
        if self._score_interval is None:
            return
        now = time.monotonic()
        for name, runtime in runtimes.items():
            if now >= self._next_report.get(name, 0.0) and not np.isnan(runtime.last_score):
                self._next_report[name] = now + self._score_interval
                at = utc_now()
                lag = runtime.lag_seconds(at)
                self._sink.put(ScoreReport(name, runtime.last_score, runtime.threshold, at, lag or 0.0))

    def _emit(self, out: Output) -> None:
        for event in out.events:
            if event.type == "start":
                self.events_started[event.stream] += 1
            log = logger.warning if event.type == "start" else logger.info
            log(
                "stream %s: anomaly %s %s at %s (score %.4f, peak %.4f, threshold %.4f)",
                event.stream, event.type, event.event_id[:8],
                (event.ended_at or event.started_at).isoformat(timespec="milliseconds"),
                event.score, event.peak_score, event.threshold,
            )  # fmt: skip
            self._sink.put(event)
        for status in out.statuses:
            self._sink.put(status)
        for clip in out.clips:
            self._sink.put(clip)
