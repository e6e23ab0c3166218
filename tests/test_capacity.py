"""How many workers: each bundle's measured cost per stream, and streams placed by load (anomalyd/capacity.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anomalyd import capacity
from anomalyd.config import load_config
from anomalyd.pipeline import Pipeline
from anomalyd.sources.file import FAST_BLOCK_SECONDS
from anomalyd.store import StoreWriter
from anomalyd.stream import Model
from tests.daemon_helpers import write_config, write_recording


def test_a_whole_window_float_model_costs_more_than_a_tile_int8_one(
    bundle_dir: Path, window_bundle_dir: Path
) -> None:
    """Measured, not assumed: the default tiles reconstruct each frame once, whole windows four times."""
    tiles = Model.load(bundle_dir, threads=1).cost
    windows = Model.load(window_bundle_dir, threads=1).cost
    # A worker carries many streams of the small test model.
    assert 0 < tiles.of(2.0, live=False) < capacity.WORKER_SHARE / 10
    # Per second of audio (the step's share is the log-mel's, alike for both); 2.5-3 times when measured
    # alone, less under a busy CI machine's noise.
    assert windows.audio > 1.5 * tiles.audio
    # The same model's capture stream (its inputs scored as they come, steps about twice a second) costs
    # more than its fast replay (a step every 2 s, inputs batched with other streams').
    assert tiles.of(0.1, live=True) > tiles.of(2.0, live=False) > 0


def _pipeline(tmp_path: Path, bundles: dict[str, Path]) -> tuple[Pipeline, StoreWriter]:
    normal = write_recording(tmp_path / "normal.wav", "normal", 30.0)
    streams: dict[str, dict[str, object]] = {
        name: {"path": str(normal), "realtime": True, "loop": True} for name in bundles
    }
    first = next(iter(bundles.values()))
    path = write_config(tmp_path / "d.toml", first, streams)
    text = path.read_text()
    for name, bundle in bundles.items():  # each stream its own bundle
        text = text.replace(f'name = "{name}"\nbundle = "{first}"', f'name = "{name}"\nbundle = "{bundle}"')
    # Steps of 2 s: the models' own costs, not the steps', tell the streams apart.
    text = text.replace("loop = true", "loop = true\nblock_seconds = 2.0")
    path.write_text(text)
    config = load_config(path)
    assert [s.bundle for s in config.streams] == list(bundles.values())
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store)
    pipeline.start(config)
    return pipeline, store


def test_streams_take_the_workers_their_load_needs_and_each_goes_where_the_load_is_least(
    bundle_dir: Path, window_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a worker planned for a whole-window stream's cost, one whole-window stream and two tile streams
    (each under half of it) take two workers; the costly stream is alone on its worker, the cheap ones
    together."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable cores")
    monkeypatch.setattr(
        capacity, "WORKER_SHARE", Model.load(window_bundle_dir, threads=1).cost.of(2.0, live=True)
    )
    bundles = {"w": window_bundle_dir, "t1": bundle_dir, "t2": bundle_dir}
    pipeline, store = _pipeline(tmp_path, bundles)
    try:
        assert pipeline.workers >= 2  # two on two cores; a third where the tiles' measured cost allows it
        placement = pipeline._placement
        assert placement["w"] not in (placement["t1"], placement["t2"])
        if pipeline.workers == 2:
            assert placement["t1"] is placement["t2"]
    finally:
        assert pipeline.stop(5.0)
        store.stop(5.0)


def test_a_light_load_keeps_one_worker(bundle_dir: Path, tmp_path: Path) -> None:
    pipeline, store = _pipeline(tmp_path, {f"s{i}": bundle_dir for i in range(6)})
    try:
        assert pipeline.workers == 1
    finally:
        assert pipeline.stop(5.0)
        store.stop(5.0)


def test_a_capture_stream_s_small_steps_count_for_more_than_a_fast_replay_s(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """Steps about twice a second, and inputs scored a few at a time: 128 capture streams of 0.1 s blocks
    cost about three times what 128 fast replays of the same model cost per second of audio
    (docs/benchmarks.md), and 512 of them on one worker fell behind."""
    streams: dict[str, dict[str, object]] = {
        "live": {"path": "a.wav", "realtime": True},
        "fast": {"path": "a.wav", "realtime": False},
    }
    live, fast = load_config(write_config(tmp_path / "d.toml", bundle_dir, streams)).streams
    assert capacity.block_seconds(live) == 0.1
    assert capacity.block_seconds(fast) == FAST_BLOCK_SECONDS
    cost = Model.load(bundle_dir, threads=1).cost
    assert capacity.stream_load(cost, live) > 2 * capacity.stream_load(cost, fast)
