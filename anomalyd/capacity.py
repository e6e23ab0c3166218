"""How many workers the streams need: each bundle's cost per stream, measured on this machine at load.

A fixed number of streams per worker is wrong both ways: the default model (16-frame int8 tiles) costs a
third of a whole-window float32 model per stream, and a Raspberry-class core is several times slower than
a server's. So when a bundle is loaded, its log-mel and its model are timed here (a few milliseconds of
CPU), and a stream of it counts as that much of a core, plus a share for each step its source's blocks
make the worker take: a capture stream's 0.1 s blocks are ten steps a second, each with its fixed work
(calls, objects, a short log-mel), where a fast file replay takes one step every 2 s. The daemon plans a
worker for at most WORKER_SHARE of a core of such load, up to one worker per core (docs/benchmarks.md).

Fewer workers are also cheaper per stream: workers share the interpreter, and two busy ones hand it to
each other at every step, which cost 10-15 % more CPU per second of audio at 512 streams on this
project's 2-core test machine. A worker that falls behind all the same says so: its streams' lag.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anomalyd.config import FileSource, StreamConfig
from anomalyd.features import LogMel
from anomalyd.inference import Autoencoder
from anomalyd.sources.file import FAST_BLOCK_SECONDS
from anomalyd.windows import WindowGeometry

# A worker's CPU per second of audio over the parts as timed here (single calls, so dearer than in the
# worker's batches, which is why this is about 1), and the fixed work of one step as a multiple of
# log-mel's time for a second of audio (both Python- and numpy-call-bound, so they scale alike from box to
# box). Fitted on this project's 2-core test machine, 2026-11-23: a worker spent 0.65-0.72 ms of CPU per
# second of audio with 128 fast replays (a step every 2 s) and 3.4 ms with 128 capture streams of 0.1 s
# blocks, for 0.6 ms of parts and 0.2 ms of log-mel as timed here. The file reader, the store's writer and
# the main thread are not the workers'.
PIPELINE_FACTOR = 1.0
STEP_FACTOR = 1.3
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


@dataclass(frozen=True)
class Cost:
    """What one real-time stream of a model takes of a core: CPU seconds per second of its audio, and per
    step the worker takes for it."""

    audio: float
    step: float

    def of(self, block_seconds: float) -> float:
        """Cores that a stream whose steps hold `block_seconds` of audio takes."""
        return self.audio + self.step / block_seconds


def stream_cost(logmel: LogMel, autoencoder: Autoencoder, geometry: WindowGeometry) -> Cost:
    """A stream of this model, timed on this machine."""
    p = logmel.params
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(p.sample_rate + p.n_fft)).astype(np.float32)
    inputs = rng.standard_normal((_BATCH, p.n_mels, geometry.model_frames)).astype(np.float32)
    features = _cpu_seconds(lambda: logmel(audio))
    per_input = _cpu_seconds(lambda: autoencoder.reconstruct(inputs)) / _BATCH
    inputs_per_second = p.sample_rate / (geometry.tile_hop * p.hop_length)
    return Cost(PIPELINE_FACTOR * (features + inputs_per_second * per_input), STEP_FACTOR * features)


def step_seconds(stream: StreamConfig) -> float:
    """Audio in each of the stream's worker steps: its source's blocks, or for a file taken as fast as it
    goes, the larger blocks it is then read in."""
    source = stream.source
    if isinstance(source, FileSource) and not source.realtime:
        return max(source.block_seconds, FAST_BLOCK_SECONDS)
    return source.block_seconds


def worker_count(setting: int, load: float) -> int:
    """inference.workers, or for 0 enough workers for `load` (cores, the streams' costs summed) at
    WORKER_SHARE each, at least one and at most one per usable core."""
    if setting:
        return setting
    return max(1, min(usable_cores(), math.ceil(load / WORKER_SHARE)))
