"""The whole daemon pipeline under load (a benchmark, not a test): sources, streaming features, batched
inference, detectors and the event store, in this process, on replays of one noise recording."""

from __future__ import annotations

import heapq
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyd.bench_replays import replays
from anomalyd.bundle import load_bundle
from anomalyd.config import DaemonConfig, StreamConfig, parse_config
from anomalyd.pipeline import Pipeline, Source
from anomalyd.records import SourceState, utc_now
from anomalyd.sources.base import AudioBlock, SourceNotice
from anomalyd.status import take_snapshot
from anomalyd.store import StoreWriter

LATENCY_WARM_UP_S = 5.0


@dataclass(frozen=True)
class Throughput:
    streams: int
    audio_per_second: float  # seconds of audio per wall-clock second
    audio_per_cpu_second: float  # per CPU-second of this process, all its threads: real-time streams per core


class Microphones:
    """Independent microphones, as far as the pipeline can tell: each stream's blocks of noise arrive every
    `block_seconds` at a phase of its own, and its first block is of a random length (as if it had been
    opened at another moment), through the capture path (never waiting; a full queue drops). One thread
    plays them all. (Replayed files all start together, so their windows all complete in the same
    instant: a burst no plant's unrelated devices produce.)"""

    def __init__(self, pipeline: Pipeline, rate: int, block_seconds: float = 0.1) -> None:
        self._pipeline = pipeline
        self._rate = rate
        self._block = int(rate * block_seconds)
        self._names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microphones", daemon=True)

    def source(self, name: str) -> Source:
        self._names.append(name)
        return _Handle(self)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        rng = np.random.default_rng(2)
        noise = (0.05 * rng.standard_normal(10 * self._rate)).astype(np.float32)
        period = self._block / self._rate
        start = time.monotonic()
        for name in self._names:
            self._pipeline.put_nowait(SourceNotice(name, SourceState.OK, "bench microphone"))
        phases = rng.uniform(0, period, len(self._names))
        first = rng.integers(1, self._rate, len(self._names))  # a first block of up to a second
        due = [(start + float(phase), i, 0) for i, phase in enumerate(phases)]
        heapq.heapify(due)
        while due and not self._stop.is_set():
            at, i, k = heapq.heappop(due)
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            size = int(first[i]) if k == 0 else self._block
            offset = (i * 7919 + k) * self._block % (len(noise) - size)
            block = noise[offset : offset + size]
            self._pipeline.put_nowait(AudioBlock(self._names[i], block, self._rate, time.monotonic()))
            heapq.heappush(due, (at + period, i, k + 1))


class _Handle:
    """One stream's share of the Microphones, as the pipeline sees a source."""

    def __init__(self, microphones: Microphones) -> None:
        self._microphones = microphones

    def start(self) -> None:
        self._microphones.start()

    def request_stop(self) -> None:
        self._microphones.stop()

    def stop(self, timeout: float = 0.0) -> None:
        self._microphones.stop()


class _MicrophonePipeline(Pipeline):
    """The daemon's pipeline with every stream captured by `Microphones`."""

    def __init__(self, sink: StoreWriter, rate: int) -> None:
        super().__init__(sink)
        self.microphones = Microphones(self, rate)

    def _make_source(self, key: str, members: tuple[StreamConfig, ...], config: DaemonConfig) -> Source:
        return self.microphones.source(members[0].name)


def _running(folder: Path, text: str, microphones: bool = False) -> tuple[Pipeline, StoreWriter]:
    config = parse_config(text, "bench", folder)
    # Random noise is far from any machine: every stream raises events; their log lines are not news.
    logging.getLogger("anomalyd").setLevel(logging.CRITICAL)
    store = StoreWriter(config.storage)
    store.start()
    if microphones:
        pipeline: Pipeline = _MicrophonePipeline(
            store, load_bundle(config.streams[0].bundle).meta.features.sample_rate
        )
    else:
        pipeline = Pipeline(store)
    pipeline.start(config)
    return pipeline, store


def seconds_per_stream(streams: int) -> float:
    """Audio per replay: enough in all for a steady figure, at most 600 s of one file."""
    return max(30.0, min(600.0, 4000.0 / streams))


def throughput(bundle: Path, streams: int, seconds: float | None = None) -> Throughput:
    """`streams` replays taken as fast as the pipeline takes them, until all have ended."""
    seconds = seconds or seconds_per_stream(streams)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # A threshold no window reaches: alarms are rare in a plant; detectors and the store run all the same.
        detector = "threshold = 1e9"
        text = replays(folder, bundle, streams, seconds, realtime=False, loop=False, detector=detector)
        started, cpu = time.perf_counter(), time.process_time()
        pipeline, store = _running(folder, text)
        while not pipeline.all_ended():
            time.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        pipeline.stop()
        store.stop(5.0)
    audio = streams * seconds
    return Throughput(streams, audio / elapsed, audio / cpu)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    windows: int  # measured
    streams_per_core: float  # audio seconds per CPU-second of the process over the same time


def latency(bundle: Path, streams: int, seconds: float = 15.0, microphones: bool = True) -> Latency:
    """From the arrival of the audio that completes a window to its score, over `seconds` of `streams`
    real-time microphones (`Microphones`, 0.1 s blocks) after a warm-up; with a threshold no window
    reaches, as in a plant, where alarms are rare; and what the process spent meanwhile.
    `microphones=False`: file replays started together instead, every stream's windows due in the same
    instant."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = replays(folder, bundle, streams, 1.0, realtime=True, loop=True, detector="threshold = 1e9")
        pipeline, store = _running(folder, text, microphones=microphones)
        time.sleep(LATENCY_WARM_UP_S)
        pipeline.latency.clear()
        started, cpu = time.perf_counter(), time.process_time()
        time.sleep(seconds)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        found = pipeline.latency.percentiles([50.0, 99.0])
        measured = len(pipeline.latency)
        pipeline.stop(2.0)
        store.stop(2.0)
    p50, p99 = found or [float("nan")] * 2
    return Latency(p50 * 1e3, p99 * 1e3, measured, streams * elapsed / cpu)


def stop_under_load(bundle: Path, streams: int = 256) -> tuple[float, int]:
    """(seconds, blocks discarded) to stop with `streams` fast replays and a full queue."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline, store = _running(folder, replays(folder, bundle, streams, 10.0, realtime=False, loop=True))
        time.sleep(5.0)
        started = time.perf_counter()
        pipeline.stop(2.0)
        store.stop(2.0)
        return time.perf_counter() - started, pipeline.blocks_discarded


def lag_under_overload(bundle: Path, streams: int, seconds: float = 20.0) -> tuple[float, int]:
    """(largest lag in seconds, streams flagged lagging) after `seconds` of `streams` real-time replays."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = replays(folder, bundle, streams, 30.0, realtime=True, loop=True)
        pipeline, store = _running(folder, text)
        time.sleep(seconds)
        assert pipeline.config is not None
        snapshot = take_snapshot(
            pipeline.streams(), now=utc_now(), max_lag_seconds=pipeline.config.inference.max_lag_seconds,
            windows_scored=pipeline.windows_scored, blocks_dropped=pipeline.blocks_dropped,
            storage=store.status(), mqtt=None,
        )  # fmt: skip
        pipeline.stop(2.0)
        store.stop(2.0)
    lags = [s.lag_seconds for s in snapshot.streams if s.lag_seconds is not None]
    return max(lags, default=0.0), len(snapshot.lagging)
