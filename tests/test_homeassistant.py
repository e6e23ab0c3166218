"""Home Assistant discovery: the payload contract (every key one Home Assistant documents for its
platform), stable ids, a device per machine, and what a real daemon publishes through a real Mosquitto:
the story of an event, mute switch and duration, and the cleanup of streams removed from the config."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from anomalyd import __version__
from anomalyd.config import ClipsConfig, StorageConfig
from anomalyd.contract import Topics
from anomalyd.homeassistant import HaStream, discovery_messages
from anomalyd.mutes import Mutes
from anomalyd.outbox import Outbox
from anomalyd.records import SourceState
from anomalyd.roster import Roster
from anomalyd.store import StoreWriter
from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from tests.mqtt_helpers import Broker, Subscriber, daemon_mqtt, retained, validate

# Discovery keys Home Assistant documents per platform (the MQTT integration's pages; the same keys as
# its discovery schemas in release 2025.4, plus `default_entity_id`, documented from 2025.10 on). A key
# outside these is dropped silently by some releases and refused by others: never send one.
COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "default_entity_id", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "object_id", "origin",
    "payload_available", "payload_not_available", "qos", "unique_id",
}  # fmt: skip
DOCUMENTED = {
    "binary_sensor": COMMON | {"device_class", "expire_after", "force_update", "off_delay", "payload_off",
                               "payload_on", "state_topic", "value_template"},
    "sensor": COMMON | {"device_class", "expire_after", "force_update", "last_reset_value_template",
                        "options", "state_class", "state_topic", "suggested_display_precision",
                        "unit_of_measurement", "value_template"},
    "event": COMMON | {"device_class", "event_types", "state_topic", "value_template"},
    "switch": COMMON | {"command_template", "command_topic", "device_class", "optimistic", "payload_off",
                        "payload_on", "retain", "state_off", "state_on", "state_topic", "value_template"},
    "number": COMMON | {"command_template", "command_topic", "device_class", "max", "min", "mode",
                        "optimistic", "payload_reset", "retain", "state_topic", "step",
                        "unit_of_measurement", "value_template"},
}  # fmt: skip
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
               "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}  # fmt: skip
ORIGIN_KEYS = {"name", "support_url", "sw_version"}
ENTITY_CATEGORIES = {"config", "diagnostic"}

TOPICS = Topics("anomalyd", "vm")
STREAMS = [HaStream("demo-fan", "fan-2f9a", "Hall 2"), HaStream("pump", "pump-77e1")]


def _configs(streams: list[HaStream] = STREAMS) -> dict[str, dict[str, Any]]:
    out = {}
    for m in discovery_messages(TOPICS, streams, "homeassistant"):
        assert (m.qos, m.retain) == (1, True)
        out[m.topic] = json.loads(m.payload)
    return out


def test_every_discovery_key_is_one_home_assistant_documents() -> None:
    configs = _configs()
    assert configs
    for topic, config in configs.items():
        component = topic.split("/")[1]
        assert set(config) <= DOCUMENTED[component], (topic, sorted(set(config) - DOCUMENTED[component]))
        assert set(config["device"]) <= DEVICE_KEYS, topic
        assert set(config["origin"]) <= ORIGIN_KEYS, topic
        assert config.get("entity_category", "config") in ENTITY_CATEGORIES


def test_entity_ids_are_the_unique_ids_of_before_on_every_home_assistant_version() -> None:
    configs = _configs()
    by_id = {str(c["unique_id"]): (topic, c) for topic, c in configs.items()}
    # The ids anomalyd has always published: existing installations keep these entities and their history.
    for old in ("anomalyd_vm_demo_fan_anomaly", "anomalyd_vm_demo_fan_score", "anomalyd_vm_demo_fan_source"):
        assert old in by_id
    for unique_id, (topic, config) in by_id.items():
        component = topic.split("/")[1]
        assert topic == f"homeassistant/{component}/{unique_id}/config"
        assert config["object_id"] == unique_id  # Home Assistant before 2025.10
        assert config["default_entity_id"] == f"{component}.{unique_id}"  # 2025.10 and later
    assert len(by_id) == len(configs)


def test_one_device_per_machine_linked_to_the_node_device() -> None:
    configs = _configs()
    devices: dict[str, dict[str, object]] = {}
    names: dict[str, set[str]] = {}
    for config in configs.values():
        device = config["device"]
        assert isinstance(device, dict)
        (identifier,) = device["identifiers"]
        devices[identifier] = device
        names.setdefault(identifier, set()).add(str(config["name"]))
    node = devices.pop("anomalyd_vm")
    assert node["name"] == "anomalyd vm"
    assert node["sw_version"] == __version__
    assert devices["anomalyd_vm_demo-fan"] == {
        "identifiers": ["anomalyd_vm_demo-fan"], "name": "demo-fan", "manufacturer": "anomalyd",
        "model": "machine sound monitor", "model_id": "fan-2f9a", "sw_version": __version__,
        "via_device": "anomalyd_vm", "suggested_area": "Hall 2",
    }  # fmt: skip
    assert "suggested_area" not in devices["anomalyd_vm_pump"]  # no area configured: none suggested
    # Short names: Home Assistant puts the device's name in front.
    assert names["anomalyd_vm_pump"] == {
        "Anomaly", "Anomaly score", "Anomaly event", "Mute", "Mute duration", "Microphone", "Lag",
    }  # fmt: skip
    assert names["anomalyd_vm"] == {
        "Broker", "Event log", "Outbox backlog", "Events today", "Streams needing attention",
    }  # fmt: skip


def test_what_each_entity_reads_and_its_category() -> None:
    c = {topic.split("/")[2]: config for topic, config in _configs().items()}
    anomaly = c["anomalyd_vm_pump_anomaly"]
    assert (anomaly["device_class"], anomaly["state_topic"]) == ("problem", "anomalyd/vm/pump/state")
    assert anomaly["json_attributes_topic"] == "anomalyd/vm/pump/last_event"
    assert "entity_category" not in anomaly
    score = c["anomalyd_vm_pump_score"]
    assert (score["suggested_display_precision"], score["state_class"]) == (3, "measurement")
    assert "threshold" in str(score["json_attributes_template"])
    assert score["icon"]
    event = c["anomalyd_vm_pump_event"]
    assert event["event_types"] == ["start", "update", "end"]
    mute = c["anomalyd_vm_pump_mute"]
    assert (mute["entity_category"], mute["command_topic"]) == ("config", "anomalyd/vm/pump/mute/set")
    assert (mute["payload_on"], mute["payload_off"], mute["state_topic"]) == (
        "on",
        "off",
        "anomalyd/vm/pump/mute",
    )
    minutes = c["anomalyd_vm_pump_mute_minutes"]
    assert (minutes["entity_category"], minutes["min"], minutes["max"]) == ("config", 1, 10080)
    assert minutes["command_topic"] == "anomalyd/vm/pump/mute/minutes/set"
    source = c["anomalyd_vm_pump_source"]
    assert (source["entity_category"], source["options"]) == ("diagnostic", [s.value for s in SourceState])
    assert c["anomalyd_vm_pump_lag"]["entity_category"] == "diagnostic"
    for name in ("broker", "event_log", "outbox", "events_today", "unhealthy"):
        assert c[f"anomalyd_vm_{name}"]["entity_category"] == "diagnostic"
        assert c[f"anomalyd_vm_{name}"]["state_topic"] == "anomalyd/vm/diagnostics"
    for config in c.values():
        assert (config["availability_topic"], config["payload_available"]) == ("anomalyd/vm/status", "online")


# ---- a real daemon through a real Mosquitto ------------------------------------------------------------


def _discovered(broker: Broker) -> set[str]:
    """unique_ids of the entities whose discovery config the broker keeps now."""
    return {topic.split("/")[2] for topic, payload in retained(broker, "homeassistant/#").items() if payload}


@pytest.mark.slow
def test_a_daemon_tells_the_event_story_and_obeys_the_mute_switch(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    fault = write_recording(tmp_path / "fault.wav", "bearing", 30.0, onset=3.0, until=14.0)
    normal = write_recording(tmp_path / "normal.wav", "normal", 20.0)
    streams: dict[str, dict[str, object]] = {
        "fan": {"path": fault, "realtime": True, "loop": True, "area": "Hall 2", "cooldown_seconds": 600},
        "pump": {"path": normal, "realtime": True, "loop": True, "mute_minutes": 15},
    }
    config = write_config(tmp_path / "d.toml", bundle_dir, streams, daemon_mqtt(tmp_path, broker, "vm"),
                          clips='base_url = "http://box.local:8080/clips"\npost_roll_seconds = 1.0')  # fmt: skip
    watcher = Subscriber(broker, "anomalyd/#")
    with DaemonProcess(config) as daemon:
        # At start every stream's mute state is stated (retained), with its duration: a switch is right at once.
        mutes = watcher.wait_for("/pump/mute", 1, timeout=30)
        assert json.loads(mutes[-1].payload) | {"at": None} == {
            "stream": "pump", "muted": False, "until": None, "minutes": 15, "at": None, "reason": "restored",
            "refused": None,
        }  # fmt: skip
        assert json.loads(watcher.wait_for("/fan/mute", 1, timeout=10)[-1].payload)["minutes"] == 60

        def ends() -> list[dict[str, Any]]:
            events = [json.loads(m.payload) for m in watcher.on("/fan/event")]
            return [e for e in events if e["type"] == "end"]

        daemon.wait_for(lambda: bool(ends()), 60, "the end of the fault's event")
        end = ends()[0]
        assert (end["reason"], end["clip"]) == ("recovered", f"fan-{_stamp(end)}-{end['event_id'][:8]}.wav")
        assert end["clip_url"] == f"http://box.local:8080/clips/{end['clip']}"
        daemon.wait_for((tmp_path / "clips" / end["clip"]).is_file, 20, "the clip named in the end")
        kept = retained(broker, "anomalyd/vm/fan/last_event")
        assert json.loads(kept["anomalyd/vm/fan/last_event"])["event_id"] == end["event_id"]

        # The switch: "on" mutes for the stream's duration; the number changes that duration.
        commands = Subscriber(broker, "anomalyd/vm/pump/mute")

        def answer(payload: str, leaf: str = "set") -> dict[str, Any]:
            count = len(commands.on("/pump/mute"))
            commands.client.publish(f"anomalyd/vm/pump/mute/{leaf}", payload, qos=1)
            state: dict[str, Any] = json.loads(
                commands.wait_for("/pump/mute", count + 1, timeout=10)[-1].payload
            )
            return state

        try:
            commands.wait_for("/pump/mute", 1, timeout=10)  # the retained state
            assert answer("90", "minutes/set")["minutes"] == 90
            assert answer("on") | {"until": None, "at": None} == {
                "stream": "pump", "muted": True, "until": None, "minutes": 90, "at": None, "reason": "command",
                "refused": None,
            }  # fmt: skip
            refused = answer("0", "minutes/set")  # out of range: nothing changes
            assert (refused["refused"], refused["minutes"], refused["muted"]) == (
                "expected 1 to 10080 minutes",
                90,
                True,
            )
            assert answer("off")["muted"] is False
        finally:
            commands.close()
        for message in watcher.on(""):
            validate(message)
        daemon.stop()
    # The duration set at run time outlives a restart.
    watcher.messages.clear()
    with DaemonProcess(config) as again:
        state = json.loads(watcher.wait_for("/pump/mute", 1, timeout=30)[-1].payload)
        assert (state["minutes"], state["muted"]) == (90, False)
        again.stop()
    watcher.close()


def _stamp(event: dict[str, Any]) -> str:
    return dt.datetime.fromisoformat(event["started_at"]).strftime("%Y%m%dT%H%M%S")


@pytest.mark.slow
def test_streams_removed_from_the_config_leave_home_assistant_on_reload_and_after_a_restart(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    normal = write_recording(tmp_path / "normal.wav", "normal", 20.0)
    spec = {"path": normal, "realtime": True, "loop": True}
    mqtt = daemon_mqtt(tmp_path, broker, "vm")
    config = write_config(tmp_path / "d.toml", bundle_dir, {"fan": spec, "pump": spec, "press": spec}, mqtt)
    pump = _discovered_ids(["pump"]) - _discovered_ids([])  # its own entities, not the node's
    with DaemonProcess(config) as daemon:
        daemon.wait_log("Home Assistant discovery published")
        everything = _wait_discovered(broker, daemon, lambda ids: pump <= ids and len(ids) == 26)
        assert _discovered_ids(["fan", "pump", "press"]) == everything

        write_config(config, bundle_dir, {"fan": spec, "press": spec}, mqtt)
        daemon.signal(signal.SIGHUP)
        _wait_discovered(broker, daemon, lambda ids: not ids & pump)
        assert _discovered(broker) == _discovered_ids(["fan", "press"])
        daemon.stop()

    # Removed while the daemon was stopped: its configs are cleared at the next start.
    write_config(config, bundle_dir, {"fan": spec}, mqtt)
    with DaemonProcess(config) as again:
        _wait_discovered(broker, again, lambda ids: ids == _discovered_ids(["fan"]))
        # And a stream that comes back is discovered again, not cleared by what was remembered.
        write_config(config, bundle_dir, {"fan": spec, "pump": spec}, mqtt)
        again.signal(signal.SIGHUP)
        _wait_discovered(broker, again, lambda ids: ids == _discovered_ids(["fan", "pump"]))
        again.stop()

    # Discovery turned off: everything published before is cleared, and nothing is published again.
    write_config(config, bundle_dir, {"fan": spec}, mqtt + "[mqtt.homeassistant]\nenabled = false\n")
    with DaemonProcess(config) as off:
        _wait_discovered(broker, off, lambda ids: not ids)
        off.wait_log("clearing")
        time.sleep(2.0)  # it would have been sent at once
        assert _discovered(broker) == set()
        assert "discovery published" not in off.log
        off.stop()


def _discovered_ids(streams: list[str]) -> set[str]:
    return {
        m.topic.split("/")[2]
        for m in discovery_messages(
            Topics("anomalyd", "vm"), [HaStream(s, "") for s in streams], "homeassistant"
        )
    }


def _wait_discovered(
    broker: Broker, daemon: DaemonProcess, condition: Callable[[set[str]], bool]
) -> set[str]:
    found: set[str] = set()

    def check() -> bool:
        nonlocal found
        found = _discovered(broker)
        return bool(condition(found))

    daemon.wait_for(check, 30, "the discovery configs expected")
    return found


def test_the_writer_clears_discovery_no_longer_wanted_and_remembers_across_restarts(tmp_path: Path) -> None:
    storage = StorageConfig(database=tmp_path / "events.db", clips=ClipsConfig(directory=tmp_path / "clips"))

    def writer() -> StoreWriter:
        return StoreWriter(storage, Outbox(TOPICS, 10_000, Mutes()))

    def clears(store: StoreWriter) -> list[str]:
        rows = store.db.execute(
            "SELECT topic FROM outbox WHERE kind = 'discovery' AND payload = '' ORDER BY id"
        )
        return [topic for (topic,) in rows.fetchall()]

    fan, pump = "homeassistant/sensor/a_fan/config", "homeassistant/sensor/a_pump/config"
    first = writer()
    first.write(Roster({"fan": 60.0, "pump": 60.0}, (fan, pump)))
    assert clears(first) == []  # nothing published before
    first.write(Roster({"fan": 60.0}, (fan,)))  # a reload without the pump
    assert clears(first) == [pump]
    first.write(Roster({"fan": 60.0}, (fan,)))
    assert clears(first) == [pump]  # cleared once
    first.stop(1.0)

    second = writer()  # a restart: the pump's clearing still waits (no broker yet)
    second.write(Roster({"fan": 60.0, "pump": 60.0}, (fan, pump)))  # and the pump comes back
    assert clears(second) == []  # so the waiting clear must not remove it again
    second.write(Roster({"fan": 60.0}, ()))  # Home Assistant discovery turned off: clear everything
    assert sorted(clears(second)) == [fan, pump]
    second.stop(1.0)
    third = writer()
    third.write(Roster({"fan": 60.0}, ()))
    assert sorted(clears(third)) == [fan, pump]  # the earlier clears still wait; nothing new is remembered
    assert third.db.execute("SELECT count(*) FROM discovery").fetchone() == (0,)
    third.stop(1.0)
