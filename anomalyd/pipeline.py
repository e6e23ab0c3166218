"""The pipeline: sources -> workers (features, batched ONNX Runtime, detectors) -> the store's writer.

Each stream belongs to one worker thread (anomalyd/worker.py), which owns its state; the pipeline
routes every source's audio and notices to the stream's worker. Each bundle's cost per stream is measured
when it is loaded (anomalyd/capacity.py); the streams take as many workers as their summed cost needs, up
to one per CPU core (`inference.workers` sets the number), and each new stream goes to the worker with the
least load. ONNX Runtime and numpy's larger steps leave the interpreter free while they run, so workers
share the cores. A box that still cannot keep up says so:
each stream's lag, and the streams lagging, are in the status, the log and MQTT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from threadpoolctl import threadpool_limits

from anomalyd.capacity import stream_load, worker_count
from anomalyd.config import DaemonConfig, FileSource, MicSource, StreamConfig
from anomalyd.errors import AnomalydError
from anomalyd.latency import LatencyRecord
from anomalyd.records import SourceState
from anomalyd.sources.base import SourceMessage
from anomalyd.sources.file import FileReader
from anomalyd.sources.make import make_source
from anomalyd.sources.mic import DeviceCapture, MicIO, PortAudioHost
from anomalyd.stream import Model, StreamRuntime
from anomalyd.tap import AudioTap, StreamSource
from anomalyd.worker import EventSink, Worker

logger = logging.getLogger(__name__)


class Source(Protocol):
    def start(self) -> None: ...
    def request_stop(self) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...


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
        self._workers: list[Worker] = []
        self._placement: dict[str, Worker] = {}  # stream -> its worker; replaced whole, never changed
        self._costs: dict[str, float] = {}  # stream -> cores it takes (anomalyd/capacity.py)
        self._sources: dict[str, Source] = {}
        self._source_members: dict[str, tuple[StreamConfig, ...]] = {}
        self._host = PortAudioHost()
        self._mic_io = mic_io or MicIO()
        self._files = FileReader()  # reads every replayed file
        self._score_interval = score_interval  # seconds between ScoreReports per stream; None: none
        self._stopping = threading.Event()
        self.config: DaemonConfig | None = None
        self.blocks_dropped = 0  # capture blocks lost because a worker could not keep up
        self.events_started: dict[str, int] = defaultdict(int)  # per stream, since the daemon started
        self.tap = AudioTap()  # copies of streams' audio at the model rate for `anomalyd record`
        self.latency = LatencyRecord()  # seconds from a window's last audio arriving to its score

    @property
    def heartbeat(self) -> float:
        """The last sign of progress of the slowest worker (monotonic seconds)."""
        return min((w.heartbeat for w in self._workers), default=time.monotonic())

    @property
    def windows_scored(self) -> int:
        return sum(w.windows_scored for w in self._workers)

    @property
    def blocks_discarded(self) -> int:
        """Queued audio blocks given up at shutdown."""
        return sum(w.blocks_discarded for w in self._workers)

    @property
    def workers(self) -> int:
        return len(self._workers)

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
            members, config.health, capture_sink=self.put_nowait, replay_offer=self.offer,
            files=self._files, host=self._host, io=self._mic_io,
        )  # fmt: skip

    @staticmethod
    def _group(config: DaemonConfig) -> dict[str, tuple[StreamConfig, ...]]:
        groups: dict[str, list[StreamConfig]] = defaultdict(list)
        for stream in config.streams:
            groups[source_key(stream)].append(stream)
        return {key: tuple(members) for key, members in groups.items()}

    # ---- lifecycle -----------------------------------------------------------------------------------

    def _add_workers(self, setting: int, load: float) -> list[Worker]:
        """New workers (not started) up to worker_count(...); a reload never takes one away."""
        new = []
        while len(self._workers) < worker_count(setting, load):
            worker = Worker(
                "worker" if not self._workers else f"worker-{len(self._workers) + 1}", self._sink,
                tap=self.tap, latency=self.latency, events_started=self.events_started,
                stopping=self._stopping, max_batch=self._max_batch, score_interval=self._score_interval,
                on_room=self._files.room,
            )  # fmt: skip
            self._workers.append(worker)
            new.append(worker)
        return new

    def _max_batch(self) -> int:
        return self.config.inference.max_batch if self.config else 64

    def _place(self, names: Iterable[str], kept: dict[str, Worker]) -> dict[str, Worker]:
        """`kept`, plus each of `names` it lacks on the worker with the least load (the summed costs of its
        streams) at that point."""
        placement = dict(kept)
        load: defaultdict[int, float] = defaultdict(float)
        for name, worker in placement.items():
            load[id(worker)] += self._costs[name]
        for name in names:
            if name not in placement:
                worker = min(self._workers, key=lambda w: load[id(w)])
                placement[name] = worker
                load[id(worker)] += self._costs[name]
        return placement

    def _cost(self, config: DaemonConfig, models: dict[Path, Model]) -> float:
        """Each stream's cost noted, for placing it; the streams' summed cost, in cores."""
        self._costs = {s.name: stream_load(models[s.bundle].cost, s) for s in config.streams}
        return sum(self._costs.values())

    def start(self, config: DaemonConfig) -> None:
        """Load all bundles (fatal if any is bad), then start the workers and every source."""
        models = self._models(config)
        # OpenBLAS would otherwise spread each log-mel product over every core and spin waiting between
        # them: for a block's few dozen frames that costs more than the product. The daemon's parallelism
        # is its worker threads and ONNX Runtime's (inference.threads).
        threadpool_limits(limits=1, user_api="blas")
        self.config = config
        load = self._cost(config, models)
        self._add_workers(config.inference.workers, load)
        placement = self._place((s.name for s in config.streams), {})
        self._placement = placement
        for worker in self._workers:
            mine = [s for s in config.streams if placement[s.name] is worker]
            worker.start([self._runtime(s, models[s.bundle], config) for s in mine])
        logger.info(
            "%d stream(s) on %d worker(s); measured load %.2f core(s)",
            len(config.streams),
            len(self._workers),
            load,
        )
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
        running = {r.name: r for r in self.streams()}
        unchanged = {
            s.name
            for s in config.streams
            if old.get(s.name) == s
            and running[s.name].model.bundle.meta.model_id == models[s.bundle].bundle.meta.model_id
            and running[s.name].model.bundle.meta.threshold == models[s.bundle].bundle.meta.threshold
            and config.health == self.config.health
            and config.storage.clips == self.config.storage.clips
        }
        new_groups = self._group(config)
        changes = []
        for key in list(self._sources):
            if self._source_members[key] != new_groups.get(key):
                self._sources.pop(key).stop()
                self._source_members.pop(key)
        remove = [name for name in running if name not in unchanged]
        add = [self._runtime(s, models[s.bundle], config) for s in config.streams if s.name not in unchanged]
        changes += [f"stopped {n}" for n in remove if n not in {r.name for r in add}]
        changes += [f"{'restarted' if r.name in old else 'added'} {r.name}" for r in add]
        # [inference] takes effect at a restart; with workers = 0, more streams still get more workers.
        for worker in self._add_workers(self.config.inference.workers, self._cost(config, models)):
            worker.start([])
        old_placement = self._placement
        # A restarted stream stays with its worker (so that the worker ends it before starting it anew).
        added = {r.name for r in add}
        kept = {n: w for n, w in self._placement.items() if n in unchanged or n in added}
        placement = self._place([r.name for r in add], kept)
        self._placement = placement
        swaps = [
            worker.swap(
                [n for n in remove if old_placement.get(n) is worker],
                [r for r in add if placement[r.name] is worker],
            )
            for worker in self._workers
        ]
        for done in swaps:
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
        for worker in self._workers:
            if not worker.started.done.wait(max(0.0, deadline - time.monotonic())):
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
        self._files.close(min(0.5, max(0.01, (deadline - time.monotonic()) / 4)))
        stopped = [w.join(max(0.1, deadline - time.monotonic())) for w in self._workers]
        if not all(stopped):
            logger.error("%d worker(s) did not stop within %.1f s", stopped.count(False), timeout)
            return False
        if self.blocks_discarded:
            logger.warning("stopping: %d queued audio block(s) discarded unscored", self.blocks_discarded)
        return True

    # ---- input ---------------------------------------------------------------------------------------

    def put_nowait(self, message: SourceMessage) -> None:
        """For capture callbacks: never blocks; a full inbox drops the block and counts it."""
        worker = self._placement.get(message.stream)
        if worker is not None and not worker.inbox.put_nowait(message):
            self.blocks_dropped += 1
            if self.blocks_dropped in (1, 10, 100) or self.blocks_dropped % 1000 == 0:
                logger.warning("worker cannot keep up: %d audio blocks dropped", self.blocks_dropped)

    def offer(self, message: SourceMessage) -> bool:
        """For file replay: never waits; False while the stream's worker has no room for the block (the
        reader keeps it and offers it again: fast replay loses nothing)."""
        worker = self._placement.get(message.stream)
        return worker is None or worker.inbox.offer(message)  # no worker: a stream a reload just removed

    # ---- the streams --------------------------------------------------------------------------------

    def streams(self) -> list[StreamRuntime]:
        return [r for worker in self._workers for r in list(worker.runtimes.values())]

    def describe(self, name: str) -> StreamSource | None:
        """What a recording client is told about a stream (None: no such stream). Any thread."""
        worker = self._placement.get(name)
        runtime = worker.runtimes.get(name) if worker is not None else None
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
