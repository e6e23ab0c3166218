"""Fault injection on the real daemon process: dropouts, a dying thread, SIGTERM with a full queue."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from anomalyd.store import read_events
from fixtures.synth import SAMPLE_RATE, render
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_config, write_recording

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _statuses(folder: Path, stream: str) -> list[str]:
    conn = sqlite3.connect(folder / "events.db")
    rows = conn.execute("SELECT state FROM source_status WHERE stream = ? ORDER BY id", [stream]).fetchall()
    return [state for (state,) in rows]


def test_dropouts_and_silent_gaps_open_no_event_and_show_silent_then_ok(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """A microphone that drops to digital silence and back: every edge used to open an anomaly event."""
    audio = render("normal", seed=1, index=4, seconds=60.0)
    gaps = [(8.0, 8.3), (17.25, 19.5), (30.1, 30.15), (41.0, 46.0)]  # 300 ms, 2.25 s, 50 ms, 5 s
    for start, end in gaps:
        audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)] = 0.0
    path = tmp_path / "dropouts.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    config = write_config(tmp_path / "d.toml", bundle_dir, {"mic": {"path": path, "cooldown_seconds": 0}})
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(120) == 0, daemon.log
    assert read_events(tmp_path / "events.db") == []
    states = _statuses(tmp_path, "mic")
    assert states == ["ok", *["silent", "ok"] * len(gaps), "ended"], states


def test_invalid_samples_are_health_and_do_not_hide_a_fault(bundle_dir: Path, tmp_path: Path) -> None:
    """20 samples of 1e20 in a faulty recording used to make every score NaN and hide a 10 s fault."""
    audio = render("bearing", seed=1, index=4, seconds=40.0, onset=10.0, until=30.0).astype(np.float32)
    spikes = np.random.default_rng(0).integers(12 * SAMPLE_RATE, 28 * SAMPLE_RATE, size=20)
    audio[spikes] = 1e20
    audio[spikes[:3] + 5] = np.nan
    path = tmp_path / "spiky.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    config = write_config(tmp_path / "d.toml", bundle_dir, {"mic": {"path": path}})
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(120) == 0, daemon.log
    events = read_events(tmp_path / "events.db")
    assert len(events) >= 1, daemon.log
    assert all(e["peak_score"] == e["peak_score"] for e in events)  # not NaN
    assert "invalid" in _statuses(tmp_path, "mic")


@pytest.mark.parametrize(("target", "calls"), [("worker", 5), ("store", 2), ("source", 0)])
def test_a_thread_that_dies_takes_the_daemon_down_with_status_2(
    bundle_dir: Path, tmp_path: Path, target: str, calls: int
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 30.0)
    streams: dict[str, dict[str, object]] = {
        "fan": {"path": recording, "realtime": True, "loop": True},
        "pump": {"path": recording, "realtime": True, "loop": True},
    }
    config = write_config(tmp_path / "d.toml", bundle_dir, streams)
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fault_run", target, str(calls), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        status = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert status == 2, text
    assert text.count("died unexpectedly; stopping") == 1, text
    assert text.count("Traceback") == 1, text
    assert "injected fault in" in text


def test_sigterm_with_256_fast_streams_and_a_full_queue_stops_cleanly(
    bundle_dir: Path, tmp_path: Path
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "imbalance", 20.0, onset=0.5)
    streams: dict[str, dict[str, object]] = {
        f"s{i:03d}": {"path": recording, "realtime": False, "loop": True, "cooldown_seconds": 0}
        for i in range(256)
    }
    config = write_config(tmp_path / "d.toml", bundle_dir, streams)
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for(lambda: _open_events(tmp_path) >= 20, 240.0, "events open on many streams")
        daemon.signal(signal.SIGTERM)
        status = daemon.wait_exit(30)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    assert status == 0, daemon.log[-3000:]
    assert "worker did not stop" not in daemon.log
    events = read_events(tmp_path / "events.db")
    assert events
    assert all(e["state"] == "closed" for e in events)
    assert {e["end_reason"] for e in events} <= {"shutdown", "recovered"}
    assert "shutdown" in {e["end_reason"] for e in events}
    stopped = [line for line in daemon.log.splitlines() if "stopped in" in line]
    assert stopped, daemon.log[-3000:]
    # The stop is bounded by design (sources told all at once, queued audio discarded at a deadline),
    # whatever the machine's speed: the limit is 5 s.
    assert float(stopped[0].split("stopped in ")[1].split()[0]) < 5.0, stopped
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _open_events(folder: Path) -> int:
    if not (folder / "events.db").exists():
        return 0
    try:
        return sum(1 for e in read_events(folder / "events.db") if e["state"] == "open")
    except Exception:
        return 0
