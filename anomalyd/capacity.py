"""How many workers the streams need: each bundle's cost per stream, measured on this machine at load.

A fixed number of streams per worker is wrong both ways: the default model (16-frame int8 tiles) costs a
third of a whole-window float32 model per stream, and a Raspberry-class core is several times slower than
a server's. So when a bundle is loaded, its log-mel and its model are timed here (a few milliseconds of
CPU), and a stream of it counts as that much of a core. The daemon plans a worker for at most
WORKER_SHARE of a core of such load, up to one worker per core (docs/benchmarks.md).

Fewer workers are also cheaper per stream: workers share the interpreter, and two busy ones hand it to
each other at every step, which cost 10-15 % more CPU per second of audio at 512 streams on this
project's 2-core test machine. A worker that falls behind all the same says so: its streams' lag.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np

from anomalyd.features import LogMel
from anomalyd.inference import Autoencoder
from anomalyd.windows import WindowGeometry

# A worker's CPU per second of audio (windows, detectors, health, bookkeeping besides log-mel and model)
# over the parts as timed here: 1.2 for the default model at 128 streams, 1.1 for whole windows in float32
# (make bench, 2026-11-23). The file reader, the store's writer and the main thread are not the workers'.
PIPELINE_FACTOR = 1.25
# A worker is planned for at most this share of a core: the rest absorbs catch-up after an outage, bursts of
# events and clips, and other work on the box.
WORKER_SHARE = 0.5
_BATCH = 16  # model inputs timed together, as the worker batches streams
_ROUNDS = 3  # the fastest of these, after one to warm up


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(step: Callable[[], object]) -> float:
    step()
    best = math.inf
    for _ in range(_ROUNDS):
        started = time.thread_time()
        step()
        best = min(best, time.thread_time() - started)
    return best


def stream_cost(logmel: LogMel, autoencoder: Autoencoder, geometry: WindowGeometry) -> float:
    """Cores that one real-time stream of this model takes: CPU seconds per second of its audio."""
    p = logmel.params
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(p.sample_rate + p.n_fft)).astype(np.float32)
    inputs = rng.standard_normal((_BATCH, p.n_mels, geometry.model_frames)).astype(np.float32)
    features = _cpu_seconds(lambda: logmel(audio))
    per_input = _cpu_seconds(lambda: autoencoder.reconstruct(inputs)) / _BATCH
    inputs_per_second = p.sample_rate / (geometry.tile_hop * p.hop_length)
    return PIPELINE_FACTOR * (features + inputs_per_second * per_input)


def worker_count(setting: int, load: float) -> int:
    """inference.workers, or for 0 enough workers for `load` (cores, the streams' costs summed) at
    WORKER_SHARE each, at least one and at most one per usable core."""
    if setting:
        return setting
    return max(1, min(usable_cores(), math.ceil(load / WORKER_SHARE)))
