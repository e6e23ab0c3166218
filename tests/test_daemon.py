"""`anomalyd run` as a real process: replayed recordings in, events in a real SQLite file out;
SIGTERM, SIGHUP and systemd's notification socket as systemd would use them."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from anomalyd.store import read_events
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess, write_config, write_recording

pytestmark = pytest.mark.slow

RATE = 16_000
WINDOW_S = (1024 + 63 * 512) / RATE  # one window: 2.08 s


def test_replayed_fault_gives_exactly_one_event_near_its_onset(bundle_dir: Path, tmp_path: Path) -> None:
    onset, until = 15.0, 25.0
    recording = write_recording(tmp_path / "fan.wav", "bearing", 40.0, onset, until)
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": recording}})
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(60) == 0, daemon.log  # replayed files end; the daemon stops by itself
    assert "every source has ended" in daemon.log

    (event,) = read_events(tmp_path / "events.db")
    start_s = event["started_at"]
    assert abs(_sample_time(tmp_path, event["event_id"], "start_sample") - onset) <= WINDOW_S
    assert _sample_time(tmp_path, event["event_id"], "end_sample") >= until
    assert event["state"] == "closed"
    assert event["end_reason"] == "recovered"
    assert event["peak_score"] > event["threshold"]
    duration = dt.datetime.fromisoformat(event["ended_at"]) - dt.datetime.fromisoformat(start_s)
    samples = _sample_time(tmp_path, event["event_id"], "end_sample") - _sample_time(
        tmp_path, event["event_id"], "start_sample"
    )
    assert duration.total_seconds() == pytest.approx(samples, abs=0.002)  # times come from sample counts
    clip, rate = sf.read(event["clip_path"])
    assert rate == RATE
    assert len(clip) / RATE == pytest.approx(samples + 5.0 + 5.0, abs=0.1)  # pre- and post-roll

    shown = subprocess.run(
        [sys.executable, "-m", "anomalyd", "events", "--config", str(config), "--format", "csv"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )  # fmt: skip
    assert event["event_id"] in shown.stdout


def _sample_time(folder: Path, event_id: str, column: str) -> float:
    conn = sqlite3.connect(folder / "events.db")
    (value,) = conn.execute(f"SELECT {column} FROM events WHERE event_id = ?", [event_id]).fetchone()
    return float(value) / RATE


def test_normal_audio_gives_no_event(bundle_dir: Path, tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 60.0)
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": recording}})
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(60) == 0, daemon.log
    assert read_events(tmp_path / "events.db") == []
    conn = sqlite3.connect(tmp_path / "events.db")
    # The first state is always told (no "unknown" for a healthy machine), then the end of the file.
    assert conn.execute("SELECT state FROM source_status").fetchall() == [("ok",), ("ended",)]


def test_sigterm_closes_the_open_event_and_leaves_the_database_consistent(
    bundle_dir: Path, tmp_path: Path
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "imbalance", 120.0, onset=1.0)
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": recording, "realtime": True}})
    daemon = DaemonProcess(config)
    daemon.wait_for(lambda: _open_events(tmp_path) == 1, 30.0, "an open event")
    sent = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0, daemon.log
    assert time.monotonic() - sent < 5.0
    (event,) = read_events(tmp_path / "events.db")
    assert (event["state"], event["end_reason"]) == ("closed", "shutdown")
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _open_events(folder: Path) -> int:
    if not (folder / "events.db").exists():
        return 0
    return sum(1 for e in read_events(folder / "events.db") if e["state"] == "open")


def test_sighup_reloads_refuses_a_bad_config_and_notifies_systemd(bundle_dir: Path, tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 30.0)
    streams: dict[str, dict[str, object]] = {"fan": {"path": recording, "realtime": True, "loop": True}}
    config = write_config(tmp_path / "d.toml", bundle_dir, streams)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(10.0)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    daemon = DaemonProcess(config, env)
    try:
        messages = _receive_until(notify, "READY=1")
        assert any(m.startswith("STATUS=1 stream(s)") for m in messages)
        assert "WATCHDOG=1" in _receive_until(notify, "WATCHDOG=1")

        config.write_text(config.read_text() + "\nbogus_key = 1\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("reload refused, the running configuration stays")
        assert "bogus_key: unknown key" in daemon.log
        assert daemon.process.poll() is None

        streams["fan"]["k"] = 6.0
        write_config(config, bundle_dir, streams)
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("reloaded")
        assert "restarted fan" in daemon.log
        assert "RELOADING=1" in _receive_until(notify, "RELOADING=1")
        # The stream was restarted well before its first 2 s window: any windows scored came after the reload.
        assert _wait_windows_scored(notify, timeout=15.0) > 0

        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.log
        assert "STOPPING=1" in _receive_until(notify, "STOPPING=1")
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        notify.close()


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    messages: list[str] = []
    while wanted not in messages:
        messages += sock.recv(4096).decode().split("\n")
    return messages


def _wait_windows_scored(sock: socket.socket, timeout: float) -> int:
    """The first non-zero count of windows scored in a STATUS= line (sent every 5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in sock.recv(4096).decode().split("\n"):
            if message.startswith("STATUS=") and "windows scored" in message:
                scored = int(message.rsplit(";", 1)[1].split()[0])
                if scored > 0:
                    return scored
    return 0


def test_bad_bundle_at_start_is_a_clear_fatal_error(tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 5.0)
    config = write_config(tmp_path / "d.toml", tmp_path / "nowhere", {"fan": {"path": recording}})
    daemon = DaemonProcess(config)
    assert daemon.wait_exit(30) == 2
    assert "cannot start: stream fan:" in daemon.log
    assert "no such bundle directory" in daemon.log
    assert "Traceback" not in daemon.log
