"""The whole daemon pipeline under load (a benchmark, not a test): sources, streaming features, batched
inference, detectors and the event store, in this process, on replays of one noise recording."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from anomalyd.bench_replays import replays
from anomalyd.config import parse_config
from anomalyd.pipeline import Pipeline
from anomalyd.records import utc_now
from anomalyd.status import take_snapshot
from anomalyd.store import StoreWriter

LATENCY_WARM_UP_S = 5.0


@dataclass(frozen=True)
class Throughput:
    streams: int
    audio_per_second: float  # seconds of audio per wall-clock second
    audio_per_cpu_second: float  # per CPU-second of this process, all its threads: real-time streams per core


def _running(folder: Path, text: str) -> tuple[Pipeline, StoreWriter]:
    config = parse_config(text, "bench", folder)
    # Random noise is far from any machine: every stream raises events; their log lines are not news.
    logging.getLogger("anomalyd").setLevel(logging.CRITICAL)
    store = StoreWriter(config.storage)
    store.start()
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
        text = replays(folder, bundle, streams, seconds, realtime=False, loop=False)
        started, cpu = time.perf_counter(), time.process_time()
        pipeline, store = _running(folder, text)
        while not pipeline.all_ended():
            time.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        pipeline.stop()
        store.stop(5.0)
    audio = streams * seconds
    return Throughput(streams, audio / elapsed, audio / cpu)


def latency(bundle: Path, streams: int, seconds: float = 15.0) -> tuple[float, float, int]:
    """(p50, p99 in ms, windows measured): from the arrival of the audio that completes a window to its
    score, over `seconds` of `streams` real-time replays after a warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline, store = _running(folder, replays(folder, bundle, streams, 30.0, realtime=True, loop=True))
        time.sleep(LATENCY_WARM_UP_S)
        pipeline.latency.clear()
        time.sleep(seconds)
        found = pipeline.latency.percentiles([50.0, 99.0])
        measured = len(pipeline.latency)
        pipeline.stop(2.0)
        store.stop(2.0)
    p50, p99 = found or [float("nan")] * 2
    return p50 * 1e3, p99 * 1e3, measured


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
