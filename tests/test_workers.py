"""More than one worker: streams shared out, the same events as one worker, reloads and stops intact."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from anomalyd.capacity import WORKER_SHARE, worker_count
from anomalyd.config import load_config
from anomalyd.features import FeatureParams
from anomalyd.pipeline import Pipeline
from anomalyd.records import SourceState, utc_now
from anomalyd.sources.base import SourceNotice
from anomalyd.store import StoreWriter, read_events
from anomalyd.stream import Model, StreamRuntime
from tests.daemon_helpers import write_config, write_recording


def test_worker_count_is_the_setting_or_one_per_share_of_load_within_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert worker_count(3, 0.01) == 3
    assert worker_count(3, 100.0) == 3
    assert worker_count(0, 0.0) == 1
    assert worker_count(0, 0.01) == 1
    assert worker_count(0, WORKER_SHARE) == 1
    assert worker_count(0, WORKER_SHARE * 1.01) == min(2, cores)
    assert worker_count(0, 1000 * WORKER_SHARE) == cores


def _events(folder: Path, bundle: Path, recordings: dict[str, Path], workers: int) -> set[tuple[object, ...]]:
    """Replay every recording as fast as it goes through a pipeline of `workers` workers; its events."""
    streams: dict[str, dict[str, object]] = {
        name: {"path": str(path), "realtime": False, "loop": False} for name, path in recordings.items()
    }
    config = load_config(
        write_config(folder / "d.toml", bundle, streams, f"[inference]\nworkers = {workers}\n")
    )
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store)
    pipeline.start(config)
    try:
        assert pipeline.workers == workers
        deadline = time.monotonic() + 120
        while not pipeline.all_ended():
            assert time.monotonic() < deadline, "replays did not end"
            time.sleep(0.05)
        assert all(r.health.state == SourceState.ENDED for r in pipeline.streams())
        assert pipeline.windows_scored == sum(r.windows_scored for r in pipeline.streams()) > 0
        assert len(pipeline.latency) == pipeline.windows_scored
    finally:
        assert pipeline.stop(5.0)
        store.stop(5.0)
    return {
        (e["stream"], e["windows"], e["windows_over"], round(e["peak_score"], 2), e["state"], e["end_reason"])
        for e in read_events(folder / "events.db")
    }


@pytest.mark.slow
def test_three_workers_raise_exactly_the_events_one_worker_raises(bundle_dir: Path, tmp_path: Path) -> None:
    recordings = {
        f"{kind}-{i}": write_recording(tmp_path / f"{kind}-{i}.wav", kind, 12.0, 4.0, 9.0, index=i)
        for kind in ("bearing", "imbalance")
        for i in range(3)
    }
    recordings |= {
        f"normal-{i}": write_recording(tmp_path / f"normal-{i}.wav", "normal", 12.0) for i in range(2)
    }
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    one = _events(tmp_path / "one", bundle_dir, recordings, workers=1)
    three = _events(tmp_path / "three", bundle_dir, recordings, workers=3)
    assert three == one
    faulty = {stream for stream, *_ in one}
    assert faulty == {name for name in recordings if not name.startswith("normal")}


@pytest.mark.slow
def test_a_reload_on_several_workers_adds_restarts_and_removes_streams(
    bundle_dir: Path, tmp_path: Path
) -> None:
    normal = write_recording(tmp_path / "normal.wav", "normal", 30.0)
    streams: dict[str, dict[str, object]] = {
        f"s{i}": {"path": str(normal), "realtime": True, "loop": True} for i in range(4)
    }
    path = write_config(tmp_path / "d.toml", bundle_dir, streams, "[inference]\nworkers = 2\n")
    config = load_config(path)
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store)
    pipeline.start(config)
    try:
        assert pipeline.wait_stated(10.0)
        streams.pop("s0")
        streams["s1"]["k"] = 6.0  # restarted
        streams["s9"] = {"path": str(normal), "realtime": True, "loop": True}  # added
        changes = pipeline.reload(
            load_config(write_config(path, bundle_dir, streams, "[inference]\nworkers = 2\n"))
        )
        assert sorted(changes) == ["added s9", "restarted s1", "stopped s0"]
        runtimes = {r.name: r for r in pipeline.streams()}
        assert sorted(runtimes) == ["s1", "s2", "s3", "s9"]
        assert runtimes["s1"].k == 6.0
        deadline = time.monotonic() + 20
        while not all(r.windows_scored > 2 for r in runtimes.values()):
            assert time.monotonic() < deadline, {n: r.windows_scored for n, r in runtimes.items()}
            time.sleep(0.1)
        assert pipeline.describe("s0") is None
        assert pipeline.describe("s9") is not None
    finally:
        assert pipeline.stop(5.0)
        store.stop(5.0)


def test_a_stream_whose_audio_is_never_scored_lags_from_its_first_window_on(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """A stream whose source opened but whose audio the worker never got to used to show no lag at all."""
    config = load_config(write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": "x.wav"}}))
    runtime = StreamRuntime(
        config.streams[0], Model.load(bundle_dir, threads=1), "n", config.health, config.storage.clips
    )
    now = utc_now()
    assert runtime.lag_seconds(now) is None  # nothing opened: a health matter
    runtime.notice(SourceNotice("fan", SourceState.OK, "opened"))
    assert runtime.lag_seconds(utc_now()) == 0.0  # the first window is not due yet
    window = FeatureParams().n_samples(64) / 16_000
    lag = runtime.lag_seconds(utc_now() + dt.timedelta(seconds=20))
    assert lag is not None
    assert 20 - window <= lag < 20 - window + 1
    runtime.notice(SourceNotice("fan", SourceState.LOST, "unplugged"))
    assert runtime.lag_seconds(utc_now() + dt.timedelta(seconds=20)) is None
