"""A full disk on a real 16 MB tmpfs (mounted as root): alerts still reach a real Mosquitto, every event
row is written once space returns, warnings are rate-limited, and a daemon that cannot even create its
database refuses to start with one clear line."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import DaemonConfig, parse_config
from anomalyd.contract import Topics
from anomalyd.homeassistant import HaStream
from anomalyd.mqtt import LinkState, Publisher
from anomalyd.mutes import Mutes
from anomalyd.outbox import Outbox
from anomalyd.records import AnomalyEvent, ClipJob, ScoreReport, SourceState, SourceStatus, utc_now
from anomalyd.store import StoreWriter, read_events
from tests.daemon_helpers import DaemonProcess, write_recording
from tests.mqtt_helpers import PASSWORD, USER, Broker, Received, Subscriber, validate

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB tmpfs, unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        done = subprocess.run(["umount", str(mount)], check=False, capture_output=True, timeout=30)
        if done.returncode:
            subprocess.run(["umount", "-l", str(mount)], check=True, timeout=30)


def fill(folder: Path) -> Path:
    """A file that takes every free byte of the filesystem."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def event(n: int, kind: str) -> AnomalyEvent:
    started = utc_now()
    return AnomalyEvent(
        event_id=f"{n:032x}", type=kind, node="edge1", stream="fan", started_at=started,
        ended_at=started + dt.timedelta(seconds=2) if kind == "end" else None, start_sample=0, end_sample=1,
        score=0.5, peak_score=0.9, mean_score=0.4, threshold=0.2, mean=0.1, std=0.03, k=3.0, model_id="m-1",
        windows=4, windows_over=3, reason="recovered" if kind == "end" else "", at=started,
    )  # fmt: skip


def config_for(tmp_path: Path, disk: Path, broker: Broker) -> DaemonConfig:
    (tmp_path / "mqtt-password").write_text(PASSWORD + "\n")
    text = (
        f'node = "edge1"\n[storage]\ndatabase = "{disk}/events.db"\n'
        f'[storage.clips]\ndirectory = "{disk}/clips"\nmin_free_mb = 0\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{USER}"\n'
        'password_file = "mqtt-password"\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n'
        '[[streams]]\nname = "fan"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    )
    return parse_config(text, "test", tmp_path)


def produce(store: StoreWriter, n: int, disk: Path) -> None:
    """One event with what comes with it: a start, a score, a health change, an end, its clip."""
    store.put(event(n, "start"))
    store.put(ScoreReport("fan", 0.5, 0.2, utc_now()))
    store.put(
        SourceStatus("edge1", "fan", SourceState.OK if n % 2 else SourceState.CLIPPING, f"n={n}", utc_now())
    )
    store.put(event(n, "end"))
    clip = np.full(16_000, 0.1, dtype=np.float32)  # 1 s: 32 kB
    store.put(ClipJob(f"{n:032x}", "fan", utc_now(), clip, 16_000, disk / "clips"))


def _alert(message: Received) -> tuple[str, str]:
    payload = json.loads(message.payload)
    return payload["event_id"], payload["type"]


def test_a_full_disk_loses_no_alert_and_no_event_row(
    tmp_path: Path, small_disk: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tmp_path, small_disk, broker)
    watcher = Subscriber(broker, "anomalyd/edge1/fan/event")
    mutes = Mutes()
    outbox = Outbox(Topics("anomalyd", "edge1"), config.mqtt.outbox_max_messages, mutes)
    caplog.set_level(logging.WARNING, logger="anomalyd")
    store = StoreWriter(config.storage, outbox)
    publisher = Publisher(config.mqtt, node="edge1", streams=[HaStream("fan", "m")], database=config.storage.database,
                          sink=store)  # fmt: skip
    store.start()
    publisher.mark_ready()
    publisher.start()
    states = set()
    try:
        deadline = time.monotonic() + 10
        while publisher.state != LinkState.CONNECTED:
            assert time.monotonic() < deadline, "publisher did not connect"
            time.sleep(0.05)
        n = 0
        for _ in range(10):  # a healthy start
            produce(store, n, small_disk)
            n += 1
            time.sleep(0.1)
        filler = fill(small_disk)
        full_until = time.monotonic() + 15
        while time.monotonic() < full_until:  # 15 s of a full disk, events all the while
            produce(store, n, small_disk)
            n += 1
            time.sleep(0.1)
            states.add(store.status().state)
        degraded = store.status()
        filler.unlink()
        for _ in range(10):
            produce(store, n, small_disk)
            n += 1
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while store.status().state != "ok" or store.status().rows_pending or store.status().messages_pending:
            assert time.monotonic() < deadline, store.status().detail
            time.sleep(0.1)
        # At least once: copies may come twice, so wait for every distinct alert, not for 2n messages.
        deadline = time.monotonic() + 30
        while len({_alert(m) for m in watcher.on("/event")}) < 2 * n:
            assert time.monotonic() < deadline, f"{len(watcher.on('/event'))} messages, not every alert"
            time.sleep(0.05)
        received = watcher.on("/event")
    finally:
        publisher.stop()
        store.stop(5.0)
        watcher.close()

    assert "degraded" in states
    assert degraded.state == "degraded"
    assert "full" in degraded.detail
    assert degraded.clips_skipped > 0  # clips are the first thing given up
    ids = [_alert(m) for m in received]
    expected = [(f"{i:032x}", t) for i in range(n) for t in ("start", "end")]
    assert sorted(set(ids)) == sorted(expected)  # every alert reached the subscriber (at least once)
    assert sorted(set(ids), key=ids.index) == expected  # first copies in the order they were made
    for m in received:
        validate(m)
    rows = read_events(config.storage.database)
    assert [(r["event_id"], r["state"]) for r in rows] == [(f"{i:032x}", "closed") for i in range(n)]
    conn = sqlite3.connect(config.storage.database)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    statuses = conn.execute("SELECT count(*) FROM source_status").fetchone()[0]
    assert statuses == n
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 6, lines  # warned once a minute, not per item (there were hundreds)
    assert any("cannot be written" in line and "full" in line for line in lines)
    print(f"full disk for 15 s: {n} events, all delivered ({len(ids) - len(set(ids))} sent twice) and written; "
          f"{len(lines)} warning line(s); {degraded.clips_skipped} clip(s) skipped")  # fmt: skip


def test_the_daemon_refuses_to_start_on_a_full_disk_with_one_clear_line(
    bundle_dir: Path, tmp_path: Path, small_disk: Path
) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 5.0)
    config = tmp_path / "d.toml"
    config.write_text(
        f'[storage]\ndatabase = "{small_disk}/events.db"\n[storage.clips]\ndirectory = "{small_disk}/clips"\n'
        f'[[streams]]\nname = "fan"\nbundle = "{bundle_dir}"\n[streams.source]\ntype = "file"\n'
        f'path = "{recording}"\n'
    )
    fill(small_disk)
    daemon = DaemonProcess(config)
    code = daemon.wait_exit(60)
    log = daemon.log
    assert code != 0
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert "cannot start" in errors[0]
    assert f"{small_disk}/events.db" in errors[0]
    assert "database or disk is full" in errors[0]
