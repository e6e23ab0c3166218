"""A broker outage is not a stall: the real daemon keeps pinging systemd's watchdog through it, says so in
STATUS, and delivers again as soon as the broker is back (real Mosquitto, real notification socket)."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from tests.mqtt_helpers import PASSWORD, USER, Broker, Subscriber

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _drain(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every notification received over `seconds`, with its arrival time."""
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        got += [(time.monotonic(), line) for line in data.split("\n")]
    return got


def test_a_broker_outage_longer_than_the_back_off_keeps_the_watchdog_fed(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    recording = write_recording(
        tmp_path / "fan.wav", "imbalance", 60.0, onset=8.0
    )  # the event starts mid-outage
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    mqtt = (
        f'node = "edge1"\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'username = "{USER}"\npassword_file = "pw"\nretry_initial_seconds = 1.0\nretry_max_seconds = 8.0\n'
    )
    config = write_config(
        tmp_path / "d.toml", bundle_dir, {"fan": {"path": recording, "realtime": True}}, mqtt
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "3000000"}
    daemon = DaemonProcess(config, env)
    watcher = Subscriber(broker, "anomalyd/edge1/status")
    try:
        daemon.wait_log("MQTT: connected")
        broker.stop()  # for 22 s: the back-off grows to its 8 s cap
        during = _drain(notify, 22.0)
        broker.start()
        back = time.monotonic()
        # Retained: however late this subscriber comes, it sees what the daemon sent after the outage.
        watcher = Subscriber(broker, "anomalyd/edge1/fan/state")
        daemon.wait_for(lambda: [m.payload for m in watcher.on("/fan/state")] == ["ON"], 30.0,
                        "the alarm raised during the outage")  # fmt: skip
        resumed = time.monotonic() - back
    finally:
        watcher.close()
        if daemon.process.poll() is None:
            daemon.process.kill()
        notify.close()
    pings = [t for t, line in during if line == "WATCHDOG=1"]
    assert len(pings) >= 15, during
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 3.0, f"watchdog starved: {max(gaps):.1f} s between pings (WatchdogSec 3 s)"
    assert "pipeline stalled" not in daemon.log
    statuses = [line for _, line in during if line.startswith("STATUS=")]
    assert any("MQTT disconnected" in s or "MQTT connecting" in s for s in statuses), statuses
    print(
        f"delivery resumed {resumed:.2f} s after the broker returned; longest watchdog gap {max(gaps):.2f} s"
    )


def test_a_notification_listener_that_stops_reading_never_stalls_the_daemon(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """A datagram socket's queue holds a few messages; were the daemon's sends blocking, a listener that
    stops reading would freeze its main loop: no watchdog ping, no STATUS, no stop on SIGTERM."""
    recording = write_recording(tmp_path / "fan.wav", "normal", 30.0)
    config = write_config(
        tmp_path / "d.toml", bundle_dir, {"fan": {"path": recording, "realtime": True, "loop": True}}
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}  # a ping per 0.1 s
    with DaemonProcess(config, env) as daemon:
        assert any(line == "READY=1" for _, line in _drain_until(notify, "READY=1"))
        # Never read again: the queue is full within a second, and every later message is refused.
        daemon.wait_log("sd_notify to", timeout=20.0)
        started = time.monotonic()
        daemon.stop(timeout=10.0)
        assert time.monotonic() - started < 6.0
        assert "failed (1 time(s))" in daemon.log
    notify.close()


def _drain_until(sock: socket.socket, line: str, timeout: float = 30.0) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while not any(text == line for _, text in got):
        assert time.monotonic() < deadline, got
        got += _drain(sock, 0.2)
    return got
