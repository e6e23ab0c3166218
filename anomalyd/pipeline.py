"""The pipeline: sources -> one worker (features, batched ONNX Runtime, detectors) -> the store's writer.

Capture callbacks and file readers only enqueue. The worker thread owns every stream's state; it takes
what is queued, turns audio into windows, scores the windows of all streams in batches (one ONNX Runtime
call per model per batch), runs each stream's detector, and hands events, status changes and clips to
the store's writer thread. Reconfiguration swaps streams inside the worker, between two batches.

Stopping is bounded whatever the backlog: once asked to stop, the worker processes queued audio for at
most `STOP_DRAIN_S`, discards (and counts) the rest, scores the windows it already holds, closes every
open event with reason `shutdown` and exits; nothing is scored after that.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from anomalyd.config import DaemonConfig, FileSource, MicSource, StreamConfig
from anomalyd.errors import AnomalydError
from anomalyd.records import (
    AlarmState,
    AnomalyEvent,
    ClipJob,
    ScoreReport,
    SourceState,
    SourceStatus,
    utc_now,
)
from anomalyd.sources.base import AudioBlock, SourceMessage, SourceNotice
from anomalyd.sources.make import make_source
from anomalyd.sources.mic import DeviceCapture, MicIO, PortAudioHost
from anomalyd.stream import Model, Output, StreamRuntime
from anomalyd.streaming import Step, Tile, Window
from anomalyd.tap import AudioTap, StreamSource
from anomalyd.tiles import reconstruct_into, score_windows

logger = logging.getLogger(__name__)

QUEUE_BLOCKS = 2000  # audio blocks waiting for the worker (200 s of one stream at 0.1 s blocks)
STOP_DRAIN_S = 0.5  # at shutdown, queued audio is still processed for at most this long


class EventSink(Protocol):
    def put(self, item: AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState) -> None: ...


class Source(Protocol):
    def start(self) -> None: ...
    def request_stop(self) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...


@dataclass(frozen=True)
class _Swap:
    """Worker-thread instruction: end `remove` streams, then add `add` streams."""

    remove: list[str]
    add: list[StreamRuntime]
    done: threading.Event


@dataclass(frozen=True)
class _Restate:
    """Worker-thread instruction: state every stream's alarm state (and known source health) again."""

    done: threading.Event


def source_key(stream: StreamConfig) -> str:
    """Streams with equal keys share one source (a device opened once)."""
    source = stream.source
    if isinstance(source, MicSource):
        return f"mic:{source.device!r}@{source.sample_rate}/{source.block_seconds}"
    return f"file:{stream.name}"


class Pipeline:
    def __init__(
        self, sink: EventSink, mic_io: MicIO | None = None, score_interval: float | None = None
    ) -> None:
        self._sink = sink
        self._queue: queue.Queue[SourceMessage | _Swap | _Restate] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._runtimes: dict[str, StreamRuntime] = {}
        self._sources: dict[str, Source] = {}
        self._source_members: dict[str, tuple[StreamConfig, ...]] = {}
        self._host = PortAudioHost()
        self._mic_io = mic_io or MicIO()
        self._score_interval = score_interval  # seconds between ScoreReports per stream; None: none
        self._next_report: dict[str, float] = {}
        self._stopping = threading.Event()
        self._started = _Restate(threading.Event())
        self._pending_tiles: list[tuple[StreamRuntime, Tile]] = []
        self._pending: list[tuple[StreamRuntime, Window]] = []  # scored once their tiles are
        self.config: DaemonConfig | None = None
        self.heartbeat = time.monotonic()
        self.windows_scored = 0
        self.blocks_dropped = 0  # capture blocks lost because the worker could not keep up
        self.blocks_discarded = 0  # queued audio given up at shutdown
        self.events_started: dict[str, int] = defaultdict(int)  # per stream, since the daemon started
        self.tap = AudioTap()  # copies of streams' audio at the model rate for `anomalyd record`

    # ---- building ----------------------------------------------------------------------------------

    def _models(self, config: DaemonConfig) -> dict[Path, Model]:
        """Load every bundle the config names (once each); raises on the first bad one."""
        models: dict[Path, Model] = {}
        for stream in config.streams:
            if stream.bundle not in models:
                try:
                    models[stream.bundle] = Model.load(stream.bundle, config.inference.threads)
                except AnomalydError as exc:
                    raise AnomalydError(f"stream {stream.name}: {exc}") from exc
        return models

    def _runtime(self, stream: StreamConfig, model: Model, config: DaemonConfig) -> StreamRuntime:
        trail = config.web.history_minutes * 60.0 if config.web.enabled else 0.0
        return StreamRuntime(
            stream, model, config.node_id, config.health, config.storage.clips, trail_seconds=trail
        )

    def _make_source(self, key: str, members: tuple[StreamConfig, ...], config: DaemonConfig) -> Source:
        return make_source(
            members, config.health, capture_sink=self.put_nowait, replay_sink=self.put_blocking,
            host=self._host, io=self._mic_io,
        )  # fmt: skip

    @staticmethod
    def _group(config: DaemonConfig) -> dict[str, tuple[StreamConfig, ...]]:
        groups: dict[str, list[StreamConfig]] = defaultdict(list)
        for stream in config.streams:
            groups[source_key(stream)].append(stream)
        return {key: tuple(members) for key, members in groups.items()}

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, config: DaemonConfig) -> None:
        """Load all bundles (fatal if any is bad), then start the worker and every source."""
        models = self._models(config)
        self.config = config
        self._runtimes = {s.name: self._runtime(s, models[s.bundle], config) for s in config.streams}
        self._queue.put(self._started)
        self._thread.start()
        for key, members in self._group(config).items():
            self._start_source(key, members, config)

    def _start_source(self, key: str, members: tuple[StreamConfig, ...], config: DaemonConfig) -> None:
        source = self._make_source(key, members, config)
        self._sources[key] = source
        self._source_members[key] = members
        source.start()

    def reload(self, config: DaemonConfig) -> list[str]:
        """Apply a new, already validated config; unchanged streams run on untouched. Returns what changed.

        Raises AnomalydError (and changes nothing) when a bundle of the new config cannot be loaded.
        """
        assert self.config is not None
        old = {s.name: s for s in self.config.streams}
        models = self._models(config)  # before touching anything: a bad bundle refuses the whole reload
        # A calibration changes k in model.json but not the model id: the threshold counts as a change.
        unchanged = {
            s.name
            for s in config.streams
            if old.get(s.name) == s
            and self._runtimes[s.name].model.bundle.meta.model_id == models[s.bundle].bundle.meta.model_id
            and self._runtimes[s.name].model.bundle.meta.threshold == models[s.bundle].bundle.meta.threshold
            and config.health == self.config.health
            and config.storage.clips == self.config.storage.clips
        }
        new_groups = self._group(config)
        changes = []
        for key in list(self._sources):
            if self._source_members[key] != new_groups.get(key):
                self._sources.pop(key).stop()
                self._source_members.pop(key)
        remove = [name for name in self._runtimes if name not in unchanged]
        add = [self._runtime(s, models[s.bundle], config) for s in config.streams if s.name not in unchanged]
        changes += [f"stopped {n}" for n in remove if n not in {r.name for r in add}]
        changes += [f"{'restarted' if r.name in old else 'added'} {r.name}" for r in add]
        done = threading.Event()
        self._queue.put(_Swap(remove, add, done))
        done.wait(10.0)
        for key, members in new_groups.items():
            if key not in self._sources:
                self._start_source(key, members, config)
        self.config = config
        return changes

    def wait_stated(self, timeout: float) -> bool:
        """Wait until every stream's alarm state has been stated after start and its source has said how
        it is (opened, lost...), all handed to the sink; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        if not self._started.done.wait(timeout):
            return False
        while any(r.health.state is None for r in self.streams()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop sources, let the worker close open events, and wait for it; True if it stopped."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        # All at once first: hundreds of readers told one by one would keep spinning, and holding the
        # interpreter, until their turn came.
        for source in self._sources.values():
            source.request_stop()
        for source in self._sources.values():
            source.stop(min(0.5, max(0.01, (deadline - time.monotonic()) / 4)))
        if self._thread.is_alive():
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.error("worker did not stop within %.1f s", timeout)
            return False
        if self.blocks_discarded:
            logger.warning("stopping: %d queued audio block(s) discarded unscored", self.blocks_discarded)
        return True

    # ---- input ---------------------------------------------------------------------------------------

    def put_nowait(self, message: SourceMessage) -> None:
        """For capture callbacks: never blocks; a full queue drops the block and counts it."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.blocks_dropped += 1
            if self.blocks_dropped in (1, 10, 100) or self.blocks_dropped % 1000 == 0:
                logger.warning("worker cannot keep up: %d audio blocks dropped", self.blocks_dropped)

    def put_blocking(self, message: SourceMessage) -> None:
        """For file replay: waits while the worker is busy, so that fast replay loses nothing."""
        while not self._stopping.is_set():
            try:
                self._queue.put(message, timeout=0.2)
                return
            except queue.Full:
                continue

    # ---- the worker thread ---------------------------------------------------------------------------

    def streams(self) -> list[StreamRuntime]:
        return list(self._runtimes.values())

    def describe(self, name: str) -> StreamSource | None:
        """What a recording client is told about a stream (None: no such stream). Any thread."""
        runtime = self._runtimes.get(name)
        source = self._sources.get(source_key(runtime.config)) if runtime is not None else None
        if runtime is None or source is None:
            return None
        if isinstance(source, DeviceCapture):
            return StreamSource(name, runtime.model.rate, source.device_name, source.capture_rate)
        assert isinstance(runtime.config.source, FileSource)
        return StreamSource(name, runtime.model.rate, str(runtime.config.source.path), None)

    def all_ended(self) -> bool:
        """Whether every stream's source has reached its end (only replayed files do)."""
        runtimes = self.streams()
        return bool(runtimes) and all(r.health.state == SourceState.ENDED for r in runtimes)

    def _run(self) -> None:
        stop_deadline: float | None = None
        while True:
            self.heartbeat = time.monotonic()
            if stop_deadline is None and self._stopping.is_set():
                stop_deadline = time.monotonic() + STOP_DRAIN_S
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                break
            try:
                item = self._queue.get(timeout=0.1 if stop_deadline else 0.25)
            except queue.Empty:
                if stop_deadline is not None:
                    break
                continue
            self._handle(item)
            # Score once every stream has about a window waiting (or nothing else is queued): batches
            # span the streams, and no stream's audio runs more than a block ahead of its scores.
            if self._queue.empty() or len(self._pending_tiles) >= min(self._max_batch(), len(self._runtimes)):
                self._score_pending()
        self._discard_queued()
        self._score_pending()
        for runtime in self._runtimes.values():
            self._emit(runtime.finish(reason="shutdown"))

    def _discard_queued(self) -> None:
        """At the stop deadline: audio still queued is given up (counted), never scored later."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, AudioBlock):
                self.blocks_discarded += 1
            elif isinstance(item, _Swap):
                item.done.set()

    def _max_batch(self) -> int:
        return self.config.inference.max_batch if self.config else 64

    def _handle(self, item: SourceMessage | _Swap | _Restate) -> None:
        if isinstance(item, _Restate):
            self._restate(self._runtimes.values())
            item.done.set()
            return
        if isinstance(item, _Swap):
            self._score_pending()
            for name in item.remove:
                runtime = self._runtimes.pop(name, None)
                if runtime is not None:
                    self._emit(runtime.finish(reason="reconfigured"))
                if name not in {r.name for r in item.add}:
                    self.tap.end(name, "a reload removed the stream")
            for runtime in item.add:
                self._runtimes[runtime.name] = runtime
            self._restate(self._runtimes.values())
            item.done.set()
            return
        runtime = self._runtimes.get(item.stream)
        if runtime is None:
            return  # audio still queued for a stream that was just removed
        if isinstance(item, AudioBlock):
            out = runtime.feed(item)
            if out.audio is not None and len(out.audio) and self.tap.wants(item.stream):
                self.tap.audio(item.stream, out.audio, item.rate, runtime.model.rate)
            self._hold(runtime, out)
            self._emit(out)
        elif isinstance(item, SourceNotice):
            if item.state != SourceState.OK:
                self._hold(runtime, runtime.drain())
                self._score_pending()
            self._emit(runtime.notice(item))
            if self.tap.wants(item.stream):
                self.tap.notice(item.stream, item.state, item.detail)

    def _restate(self, runtimes: Iterable[StreamRuntime]) -> None:
        """Every stream's alarm state and known source health, again: subscribers that missed a change
        (a crash, a retained message cleared, a reload) see the truth, never a stale `ON` or `unknown`."""
        now = utc_now()
        for runtime in runtimes:
            self._sink.put(AlarmState(runtime.name, runtime.event_open, now))
            if runtime.health.state is not None:
                self._sink.put(SourceStatus(runtime.node, runtime.name, runtime.health.state,
                                            runtime.health.detail, now))  # fmt: skip

    def _hold(self, runtime: StreamRuntime, step: Step | Output) -> None:
        """Queue a stream's new tiles and windows for the next batch."""
        self._pending_tiles += [(runtime, t) for t in step.tiles]
        self._pending += [(runtime, w) for w in step.windows]
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
            reconstruct_into(model.autoencoder, model.bundle.meta.window, stores, self._max_batch())
        by_model: dict[int, list[tuple[StreamRuntime, Window]]] = defaultdict(list)
        for runtime, window in pending:
            by_model[id(runtime.model)].append((runtime, window))
        for items in by_model.values():
            meta = items[0][0].model.bundle.meta
            scores = score_windows(meta.window, meta.residual, [(r.tiles, w) for r, w in items])
            for (runtime, window), score in zip(items, scores, strict=True):
                self._emit(runtime.scored(window, float(score)))
            self.windows_scored += len(items)
        self._report_scores({runtime.name: runtime for runtime, _ in pending})

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
