"""How many workers the streams need: each bundle's cost per stream, measured on this machine at load.

A fixed number of streams per worker is wrong both ways: the default model (16-frame int8 tiles) costs a
third of a whole-window float32 model per stream, and a Raspberry-class core is several times slower than
a server's. So when a bundle is loaded, its log-mel and its model are timed here (a few milliseconds of
CPU), and a stream of it counts as that much of a core, plus a share for each worker step that feeds its
audio (about two a second for a capture stream, its 0.1 s blocks held back until one completes a model
input; one every 2 s for a fast file replay), for each block that waits, and, when live, for each model
input scored on its own within milliseconds rather than in a large batch. The daemon plans a worker for at
most WORKER_SHARE of a core of such load, up to one worker per core (docs/benchmarks.md).

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

# The process's CPU per second of audio over the parts as timed here (single calls, dearer than in the
# worker's batches, which is why this is about 1), and, in units of log-mel's time for a second of audio
# (these are Python- and numpy-call-bound, so they scale alike from box to box): the fixed work of a
# worker step that feeds a stream's audio; of a block that only waits to be fed with the next
# (anomalyd/holdback.py); and of each model input of a live stream (a microphone, a real-time replay),
# scored within milliseconds of its audio in a small batch rather than with many streams' inputs. Fitted
# on this project's 2-core test machine, 2026-11-23, log-mel 0.24 ms and parts 0.59 ms per second of audio
# as timed here: 0.85 ms of CPU per second of audio with fast replays (a step every 2 s); with 128 live
# streams, 1.84 ms with 1 s blocks, 2.22 ms with 0.5 s blocks and 2.8-3.0 ms with 0.1 s blocks.
PIPELINE_FACTOR = 1.0
STEP_FACTOR = 2.2
BLOCK_FACTOR = 0.3
LIVE_FACTOR = 1.6
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
    """What one stream of a model takes of a core: CPU seconds per second of its audio, per worker step
    that feeds it, per block that waits for the next, and per model input when live; and the audio between
    two of its model inputs (its steps come no more often, audio held back in between)."""

    audio: float
    step: float
    block: float
    live_input: float
    input_seconds: float

    def of(self, block_seconds: float, live: bool) -> float:
        """Cores that a stream whose blocks hold `block_seconds` of audio takes."""
        steps = 1.0 / max(block_seconds, self.input_seconds)
        held = 1.0 / block_seconds - steps
        scored_alone = self.live_input / self.input_seconds if live else 0.0
        return self.audio + self.step * steps + self.block * held + scored_alone


def stream_cost(logmel: LogMel, autoencoder: Autoencoder, geometry: WindowGeometry) -> Cost:
    """A stream of this model, timed on this machine."""
    p = logmel.params
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(p.sample_rate + p.n_fft)).astype(np.float32)
    inputs = rng.standard_normal((_BATCH, p.n_mels, geometry.model_frames)).astype(np.float32)
    features = _cpu_seconds(lambda: logmel(audio))
    per_input = _cpu_seconds(lambda: autoencoder.reconstruct(inputs)) / _BATCH
    input_seconds = min(geometry.tile_hop, geometry.hop_frames) * p.hop_length / p.sample_rate
    return Cost(
        audio=PIPELINE_FACTOR * (features + per_input / input_seconds),
        step=STEP_FACTOR * features,
        block=BLOCK_FACTOR * features,
        live_input=LIVE_FACTOR * features,
        input_seconds=input_seconds,
    )


def stream_load(cost: Cost, stream: StreamConfig) -> float:
    """Cores that `stream` takes with a model of `cost`."""
    source = stream.source
    live = not isinstance(source, FileSource) or source.realtime
    return cost.of(block_seconds(stream), live)


def block_seconds(stream: StreamConfig) -> float:
    """Audio in each of the stream's blocks: its source's, or for a file taken as fast as it goes, the
    larger blocks it is then read in."""
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
