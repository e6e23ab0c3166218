"""Audio held back until it completes something: never a score later, nothing lost, fewer worker steps."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import parse_config
from anomalyd.holdback import Holdback
from anomalyd.latency import LatencyRecord
from anomalyd.records import SourceState
from anomalyd.scoring import ClipScorer
from anomalyd.sources.base import AudioBlock, SourceNotice
from anomalyd.stream import Model, StreamRuntime
from anomalyd.streaming import Resampler
from anomalyd.tap import AudioTap
from anomalyd.worker import Worker
from fixtures.synth import render

CONFIG = '[[streams]]\nname = "s"\nbundle = "b"\n[streams.source]\ntype = "mic"\ndevice = "x"\n'


class Collected(list[object]):
    """The worker's sink: what it hands on, kept."""

    def put(self, item: object) -> None:
        self.append(item)


def _runtime(model: Model, tmp_path: Path, trail_seconds: float = 0.0) -> StreamRuntime:
    config = parse_config(CONFIG, "t.toml", tmp_path)
    return StreamRuntime(
        config.streams[0], model, "n", config.health, config.storage.clips, trail_seconds=trail_seconds
    )


def test_held_blocks_come_out_as_one_block_timed_from_the_block_that_follows_them() -> None:
    holdback = Holdback()
    assert holdback.release("a") is None
    for i in range(3):
        holdback.keep(AudioBlock("a", np.full(100, i, np.float32), 16_000, float(i)))
    holdback.keep(AudioBlock("b", np.zeros(50, np.float32), 48_000, 9.0))
    assert (holdback.samples("a"), holdback.rate("a"), holdback.rate("b")) == (300, 16_000, 48_000)
    joined = holdback.release("a", AudioBlock("a", np.full(10, 7, np.float32), 16_000, 5.0))
    assert joined is not None
    np.testing.assert_array_equal(joined.samples, np.repeat(np.float32([0, 1, 2, 7]), [100, 100, 100, 10]))
    assert (joined.rate, joined.received) == (16_000, 5.0)
    assert holdback.streams() == ["b"]
    alone = holdback.release("b")
    assert alone is not None
    assert (alone.received, len(alone.samples)) == (9.0, 50)
    assert (holdback.streams(), holdback.samples("b")) == ([], 0)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [16_000, 48_000, 44_100, 8_000])
@pytest.mark.parametrize("which", ["bundle_dir", "window_bundle_dir"])
def test_audio_said_to_complete_nothing_completes_nothing_and_most_short_blocks_are_held(
    which: str, rate: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`completes_nothing` is never wrong (a score would come late), at the model's rate and through the
    resampler, on blocks of any size; and it holds most 0.1 s blocks, or nothing is gained."""
    model = Model.load(request.getfixturevalue(which), threads=1)
    runtime = _runtime(model, tmp_path)
    rng = np.random.default_rng(rate)
    audio = (0.05 * rng.standard_normal(40 * rate)).astype(np.float32)
    tenth = int(rate * 0.1)
    sizes = [tenth] * 60 + [int(n) for n in rng.integers(1, rate // 2, 60)] + [tenth] * 40
    held, at = 0, 0
    for n in sizes:
        said = runtime.completes_nothing(n, rate)
        out = runtime.feed(AudioBlock("s", audio[at : at + n], rate, 0.0))
        at += n
        if said:
            assert (out.tiles, out.windows) == ([], []), at
        held += said and n == tenth
    assert held >= 0.6 * 100


@pytest.mark.slow
@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_a_worker_fed_capture_blocks_scores_as_offline_in_a_fifth_of_the_steps(
    bundle_dir: Path, tmp_path: Path, rate: int
) -> None:
    """0.1 s blocks, each taken on its own (as a worker keeping up with microphones takes them): the
    scores equal `anomalyd score`'s, every sample is fed by the end of the stream, and the worker takes
    about one step per model input instead of one per block."""
    model = Model.load(bundle_dir, threads=1)
    audio16 = render("bearing", seed=1, index=4, seconds=12.0, onset=4.0)
    audio = Resampler(16_000, rate)(audio16, last=True) if rate != 16_000 else audio16
    offline = (
        ClipScorer.from_bundle(model.bundle)
        .score_samples(Resampler(rate, 16_000)(audio, last=True))
        .window_errors
    )
    runtime = _runtime(model, tmp_path, trail_seconds=60.0)
    stopping = threading.Event()
    worker = Worker(
        "w", Collected(), tap=AudioTap(),
        latency=LatencyRecord(), events_started=defaultdict(int), stopping=stopping,
        max_batch=lambda: 64, score_interval=None, on_room=lambda: None,
    )  # fmt: skip
    worker.start([runtime])
    worker.inbox.put_nowait(SourceNotice("s", SourceState.OK, "test"))
    block = int(0.1 * rate)
    blocks = [audio[i : i + block] for i in range(0, len(audio), block)]
    for samples in blocks:
        deadline = time.monotonic() + 30
        while len(worker.inbox):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        worker.inbox.put_nowait(AudioBlock("s", samples, rate, time.monotonic()))
    worker.inbox.put_nowait(SourceNotice("s", SourceState.ENDED, "end of test"))
    deadline = time.monotonic() + 30
    while runtime.health.state != SourceState.ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopping.set()
    assert worker.join(10.0)
    assert runtime.trail is not None
    streamed = [score for _, score in runtime.trail.since(0.0)]
    assert len(streamed) == len(offline)
    np.testing.assert_allclose(streamed, offline, rtol=1e-4, atol=1e-6)
    assert runtime.windows.samples_in == len(Resampler(rate, 16_000)(audio, last=True))
    inputs = len(audio16) / (model.bundle.meta.window.tile_hop * model.bundle.meta.features.hop_length)
    assert worker.steps <= 1.5 * inputs + 2 < 0.4 * len(blocks)
    assert len(worker.latency) == len(offline)
