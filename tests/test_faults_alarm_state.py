"""What a subscriber sees about a machine is true after SIGKILL, restart and a maintenance mute: the real
daemon process, a real Mosquitto and an independent subscriber (as Home Assistant would be)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from anomalyd.store import read_events
from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from tests.mqtt_helpers import (
    WATCHER,
    WATCHER_PASSWORD,
    Broker,
    Subscriber,
    daemon_mqtt,
    validate,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _retained(broker: Broker, topic: str, count: int = 1) -> list[str]:
    """What a subscriber connecting now is told first: the retained messages under `topic`."""
    later = Subscriber(broker, topic)
    try:
        return [m.payload for m in later.wait_for("", count, timeout=10) if m.retain]
    finally:
        later.close()


def _open(folder: Path) -> list[dict[str, object]]:
    if not (folder / "events.db").exists():
        return []
    return [e for e in read_events(folder / "events.db") if e["state"] == "open"]


def _online_again(watcher: Subscriber) -> bool:
    statuses = [m.payload for m in watcher.on("/edge1/status")]
    return "offline" in statuses and "online" in statuses[statuses.index("offline") :]


def test_sigkill_mid_event_then_restart_ends_it_publicly_and_states_off(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    fault = write_recording(tmp_path / "fault.wav", "imbalance", 120.0, onset=1.0)
    normal = write_recording(tmp_path / "normal.wav", "normal", 60.0)
    mqtt = daemon_mqtt(tmp_path, broker)
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": fault, "realtime": True}}, mqtt)
    watcher = Subscriber(broker, "anomalyd/#")
    first = DaemonProcess(config)
    try:
        first.wait_for(lambda: bool(watcher.on("/fan/state")) and watcher.on("/fan/state")[-1].payload == "ON",
                       60, "state ON")  # fmt: skip
        (opened,) = _open(tmp_path)
        first.signal(signal.SIGKILL)
        first.wait_exit(10)
        assert _retained(broker, "anomalyd/edge1/fan/state") == ["ON"]  # the lie a crash leaves behind

        write_config(config, bundle_dir, {"fan": {"path": normal, "realtime": True, "loop": True}}, mqtt)
        second = DaemonProcess(config)
        try:
            second.wait_for(
                lambda: any(json.loads(m.payload)["type"] == "end" for m in watcher.on("/fan/event")),
                30, "the end of the interrupted event",
            )  # fmt: skip
            (end,) = [
                json.loads(m.payload)
                for m in watcher.on("/fan/event")
                if json.loads(m.payload)["type"] == "end"
            ]
            assert end["event_id"] == opened["event_id"]
            assert (end["reason"], end["replayed"]) == ("interrupted", True)
            second.wait_for(
                lambda: _retained(broker, "anomalyd/edge1/fan/state") == ["OFF"], 30, "retained OFF"
            )
            # Home Assistant shows an entity's last value again when the node comes back `online`: the
            # true state and source health must be there before that, or a stale "Problem" flashes on.
            second.wait_for(lambda: _online_again(watcher), 30, "status online after the kill")
            after_kill = watcher.messages[[m.payload for m in watcher.messages].index("offline") :]
            order = [(m.topic.rsplit("/", 1)[1], m.payload) for m in after_kill]
            online = order.index(("status", "online"))
            assert ("state", "OFF") in order[:online], order
            assert any(leaf == "source" and '"ok"' in payload for leaf, payload in order[:online]), order
            assert ("state", "ON") not in order, order
            second.wait_for(lambda: bool(watcher.on("/fan/source")), 30, "source health")
            assert json.loads(_retained(broker, "anomalyd/edge1/fan/source")[0])["state"] == "ok"
            second.wait_for(lambda: bool(watcher.on("/edge1/diagnostics")), 30, "diagnostics")
            diagnostics = json.loads(watcher.on("/edge1/diagnostics")[-1].payload)
            assert diagnostics["storage"]["state"] == "ok"
            assert diagnostics["streams"]["fan"]["source"] == "ok"
            assert diagnostics["streams"]["fan"]["lagging"] is False
            for m in watcher.messages:
                validate(m)
            second.signal(signal.SIGTERM)
            assert second.wait_exit(10) == 0, second.log
        finally:
            if second.process.poll() is None:
                second.process.kill()
    finally:
        watcher.close()
        if first.process.poll() is None:
            first.process.kill()


def test_a_mute_during_an_open_event_never_swallows_its_end(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    """The maintenance workflow: the alarm is on, the engineer mutes the stream, fixes the machine."""
    fault = write_recording(tmp_path / "fault.wav", "imbalance", 40.0, onset=1.0, until=12.0)
    mqtt = daemon_mqtt(tmp_path, broker)
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": {"path": fault, "realtime": True}}, mqtt)
    watcher = Subscriber(broker, "anomalyd/#")
    daemon = DaemonProcess(config)
    try:
        daemon.wait_for(lambda: [m.payload for m in watcher.on("/fan/state")][-1:] == ["ON"], 60, "state ON")
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", WATCHER, "-P", WATCHER_PASSWORD,
             "-q", "1", "-t", "anomalyd/edge1/fan/mute/set", "-m", "3600"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        daemon.wait_for(
            lambda: any(json.loads(m.payload)["muted"] for m in watcher.on("/fan/mute")), 10, "mute ack"
        )
        daemon.wait_for(
            lambda: [m.payload for m in watcher.on("/fan/state")][-1:] == ["OFF"], 60, "state OFF"
        )
        ends = [
            json.loads(m.payload) for m in watcher.on("/fan/event") if json.loads(m.payload)["type"] == "end"
        ]
        assert len(ends) == 1
        assert ends[0]["reason"] == "recovered"
        scores = len(watcher.on("/fan/score"))
        daemon.wait_for(lambda: len(watcher.on("/fan/score")) > scores, 10, "scores while muted")
        for m in watcher.messages:
            validate(m)
    finally:
        watcher.close()
        if daemon.process.poll() is None:
            daemon.process.kill()
