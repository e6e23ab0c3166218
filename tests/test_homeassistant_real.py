"""anomalyd against a real Home Assistant Core through a real Mosquitto: what an ops person gets in HA.

Run with `make test-ha` (it builds the HA virtual environment and sets ANOMALYD_HA_VENV); deselected from
`make test`. One Home Assistant start serves the whole scenario, in the order of the issue's checklist:
devices and entities, the problem sensor's story, the event entity, the mute switch and its duration, a
SIGKILL and a restart, a stream removed from the config, and HA's log."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from anomalyd import __version__
from anomalyd.bundle import load_bundle
from tests.daemon_helpers import DaemonProcess, write_recording
from tests.ha_helpers import VENV_VARIABLE, HomeAssistant, StateRecorder, venv_from_environment
from tests.mqtt_helpers import PASSWORD, USER, Broker, Subscriber, retained

pytestmark = [
    pytest.mark.homeassistant,
    pytest.mark.slow,
    pytest.mark.skipif(
        venv_from_environment() is None,
        reason=f"no Home Assistant: `make test-ha` builds one and names it in {VENV_VARIABLE}",
    ),
]

NODE = "hatest"
FAULTY, STEADY = "bearing", "steady"  # the second stream is the one removed from the config later
AREA = "Hall 2"
# The faulty stream replays 40 s in a loop: a bearing fault from 15 s to 25 s, so every pass opens and
# closes one event, and a restarted daemon has 15 s of normal sound before the next one.
LOOP_SECONDS, ONSET, UNTIL = 40.0, 15.0, 25.0
PREFIX = f"anomalyd_{NODE}"


def stream_entities(stream: str) -> dict[str, dict[str, Any]]:
    """Entity id -> what HA must show for it (the Home Assistant contract's table, per stream)."""
    u = f"{PREFIX}_{stream}".replace("-", "_")
    return {
        f"binary_sensor.{u}_anomaly": {"name": "Anomaly", "device_class": "problem", "category": None},
        f"sensor.{u}_score": {"name": "Anomaly score", "device_class": None, "category": None},
        f"event.{u}_event": {"name": "Anomaly event", "device_class": None, "category": None},
        f"switch.{u}_mute": {"name": "Mute", "device_class": None, "category": "config"},
        f"number.{u}_mute_minutes": {
            "name": "Mute duration",
            "device_class": "duration",
            "category": "config",
        },
        f"sensor.{u}_source": {"name": "Microphone", "device_class": "enum", "category": "diagnostic"},
        f"sensor.{u}_lag": {"name": "Lag", "device_class": "duration", "category": "diagnostic"},
    }


NODE_ENTITIES: dict[str, dict[str, Any]] = {
    f"binary_sensor.{PREFIX}_broker": {"name": "Broker", "device_class": "connectivity", "category": "diagnostic"},
    f"binary_sensor.{PREFIX}_event_log": {"name": "Event log", "device_class": "problem", "category": "diagnostic"},
    f"sensor.{PREFIX}_outbox": {"name": "Outbox backlog", "device_class": None, "category": "diagnostic"},
    f"sensor.{PREFIX}_events_today": {"name": "Events today", "device_class": None, "category": "diagnostic"},
    f"sensor.{PREFIX}_unhealthy": {"name": "Streams needing attention", "device_class": None, "category": "diagnostic"},
}  # fmt: skip

PROBLEM = f"binary_sensor.{PREFIX}_{FAULTY}_anomaly"
EVENT = f"event.{PREFIX}_{FAULTY}_event"
MUTE = f"switch.{PREFIX}_{FAULTY}_mute"
MUTE_MINUTES = f"number.{PREFIX}_{FAULTY}_mute_minutes"


@pytest.fixture(scope="module")
def ha_broker(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[Broker]:
    """One Mosquitto for the module: Home Assistant stays connected to it for the whole scenario."""
    b = Broker(tmp_path_factory.mktemp("ha-broker"), certs)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def home_assistant(tmp_path_factory: pytest.TempPathFactory, ha_broker: Broker) -> Iterator[HomeAssistant]:
    """Home Assistant Core, onboarded, with its MQTT integration on `ha_broker`."""
    venv = venv_from_environment()
    assert venv is not None  # the module is skipped without one
    ha = HomeAssistant(venv, tmp_path_factory.mktemp("ha-config"))
    try:
        began = time.monotonic()
        started = ha.start()
        ha.onboard()
        ha.add_mqtt(ha_broker)
        print(f"\nHome Assistant {ha.version}: API up {started:.1f} s after start (fresh config dir), "
              f"onboarded and MQTT connected after {time.monotonic() - began:.1f} s")  # fmt: skip
        yield ha
    finally:
        ha.stop()


def daemon_config(folder: Path, bundle: Path, broker: Broker, streams: dict[str, dict[str, Any]]) -> Path:
    """A daemon config: node NODE, MQTT to `broker`, replayed streams {name: {path, area?}} in real time."""
    (folder / "mqtt-password").write_text(PASSWORD + "\n")
    lines = [
        f'node = "{NODE}"',
        "[storage]", 'database = "events.db"', "[storage.clips]", 'directory = "clips"',
        "[control]", 'socket = "control.sock"',
        "[mqtt]", "enabled = true", 'host = "127.0.0.1"', f"port = {broker.port}", f'username = "{USER}"',
        'password_file = "mqtt-password"', "retry_initial_seconds = 0.2", "retry_max_seconds = 1.0",
    ]  # fmt: skip
    for name, spec in streams.items():
        lines += ["[[streams]]", f'name = "{name}"', f'bundle = "{bundle}"']
        if spec.get("area"):
            lines.append(f'area = "{spec["area"]}"')
        lines += [
            "[streams.source]",
            'type = "file"',
            f'path = "{spec["path"]}"',
            "realtime = true",
            "loop = true",
        ]
        lines += ["[streams.detector]", "cooldown_seconds = 0.0", "update_seconds = 2.0"]
    path = folder / "anomalyd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_anomalyd_in_a_real_home_assistant(
    home_assistant: HomeAssistant, ha_broker: Broker, bundle_dir: Path, tmp_path: Path
) -> None:
    began = time.monotonic()
    ha = home_assistant
    fault = write_recording(tmp_path / "fault.wav", "bearing", LOOP_SECONDS, onset=ONSET, until=UNTIL)
    normal = write_recording(tmp_path / "normal.wav", "normal", LOOP_SECONDS)
    both: dict[str, dict[str, Any]] = {FAULTY: {"path": fault, "area": AREA}, STEADY: {"path": normal}}
    config = daemon_config(tmp_path, bundle_dir, ha_broker, both)
    expected = {**stream_entities(FAULTY), **stream_entities(STEADY), **NODE_ENTITIES}
    recorder = ha.record_states(PREFIX)
    daemon = DaemonProcess(config)
    try:
        took = ha.wait_for(
            up(daemon, lambda: all(available(ha, e) for e in expected)), 120, "entities available"
        )
        print(f"entities available {took:.1f} s after the daemon started")
        check_devices(ha, bundle_dir)
        check_entities(ha, expected)
        event_id = check_problem_story(ha, recorder, tmp_path / "clips")
        check_event_entity(recorder, event_id)
        check_mute(ha, ha_broker)
        daemon = check_kill_and_restart(ha, recorder, daemon, config, expected)
        daemon = check_removed_stream(ha, ha_broker, daemon, config, bundle=bundle_dir, fault=fault)
        complaints = ha.complaints("homeassistant.components.mqtt", "anomalyd")
        print(f"Home Assistant log: {len(complaints)} warnings/errors about MQTT or anomalyd")
        assert complaints == [], "\n".join(complaints)
    except BaseException:
        print(f"daemon log (last run):\n{daemon.log[-4000:]}")
        raise
    finally:
        recorder.close()
        if daemon.process.poll() is None:
            daemon.signal(signal.SIGTERM)
            daemon.wait_exit(30)
    assert "Traceback" not in daemon.log
    print(f"real Home Assistant scenario: {time.monotonic() - began:.0f} s (HA start not included)")


def up(daemon: DaemonProcess, condition: Callable[[], bool]) -> Callable[[], bool]:
    """`condition`, failing at once with the daemon's log if the daemon has exited."""

    def check() -> bool:
        if daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.process.returncode}):\n{daemon.log}")
        return condition()

    return check


def available(ha: HomeAssistant, entity_id: str) -> bool:
    return ha.state(entity_id) not in (None, "unavailable")


def check_devices(ha: HomeAssistant, bundle: Path) -> None:
    """One device for the node, one per stream linked to it, with model id, version and area."""
    devices = {tuple(d["identifiers"][0]): d for d in ha.device_registry() if d["identifiers"]}
    node = devices[("mqtt", PREFIX)]
    assert (node["name"], node["manufacturer"], node["model"], node["sw_version"]) == (
        f"anomalyd {NODE}", "anomalyd", "audio anomaly monitor", __version__)  # fmt: skip
    areas = ha.area_registry()
    model_id = load_bundle(bundle).meta.model_id
    for stream, area in ((FAULTY, AREA), (STEADY, None)):
        device = devices[("mqtt", f"{PREFIX}_{stream}")]
        assert device["name"] == stream
        assert (device["manufacturer"], device["model"]) == ("anomalyd", "machine sound monitor")
        assert (device["model_id"], device["sw_version"]) == (model_id, __version__)
        assert device["via_device_id"] == node["id"]
        assert (areas.get(device["area_id"]) if device["area_id"] else None) == area


def check_entities(ha: HomeAssistant, expected: dict[str, dict[str, Any]]) -> None:
    """Entity ids, unique ids, names, device classes, categories and the per-platform details."""
    registry, states = ha.entity_registry(), ha.states()
    devices = {d["id"]: tuple(d["identifiers"][0])[1] for d in ha.device_registry() if d["identifiers"]}
    ours = {e for e in registry if e.split(".", 1)[1].startswith(PREFIX)}
    assert ours == set(expected)
    print("entities Home Assistant created (entity id, device class, category):")
    for entity_id, want in sorted(expected.items()):
        entry, state = registry[entity_id], states[entity_id]
        object_id = entity_id.split(".", 1)[1]
        assert (entry["platform"], entry["unique_id"]) == ("mqtt", object_id)
        assert entry["original_name"] == want["name"]
        assert entry["entity_category"] == want["category"]
        assert state["attributes"].get("device_class") == want["device_class"], entity_id
        owner = devices[entry["device_id"]]
        assert object_id.startswith(owner + "_")
        assert (owner == PREFIX) == (entity_id in NODE_ENTITIES)
        print(f"  {entity_id:52} {want['device_class'] or '-':12} {want['category'] or '-'}")
    score_id = f"sensor.{PREFIX}_{FAULTY}_score"
    ha.wait_for(lambda: "threshold" in ha.states()[score_id]["attributes"], 30, "a score with its threshold")
    score = ha.states()[score_id]["attributes"]
    assert (score["state_class"], score["icon"]) == ("measurement", "mdi:waveform")
    assert (
        registry[f"sensor.{PREFIX}_{FAULTY}_score"]["options"]["sensor"]["suggested_display_precision"] == 3
    )
    assert {"threshold", "anomalous"} <= set(score)
    assert states[EVENT]["attributes"]["event_types"] == ["start", "update", "end"]
    minutes = states[MUTE_MINUTES]["attributes"]
    assert (minutes["min"], minutes["max"], minutes["unit_of_measurement"]) == (1, 10080, "min")
    assert states[f"sensor.{PREFIX}_{FAULTY}_lag"]["attributes"]["unit_of_measurement"] == "s"
    # Stated at start (mute) and by the first diagnostics message: given a few seconds.
    settled = {
        MUTE: "off",
        f"binary_sensor.{PREFIX}_broker": "on",
        f"binary_sensor.{PREFIX}_event_log": "off",
    }
    ha.wait_for(lambda: all(ha.state(e) == v for e, v in settled.items()), 15, f"states {settled}")


def check_problem_story(ha: HomeAssistant, recorder: StateRecorder, clips: Path) -> str:
    """The problem sensor goes on with the event's attributes, then off naming the reason and the clip."""
    on = ha.wait_for(
        lambda: problem_attributes(ha, "on").get("type") in ("start", "update"), 120, "problem on"
    )
    started = problem_attributes(ha, "on")
    event_id = started["event_id"]
    assert re.fullmatch("[0-9a-f]{32}", event_id)
    assert started["peak_score"] > started["threshold"] > 0
    off = ha.wait_for(lambda: problem_attributes(ha, "off").get("type") == "end", 120, "problem off")
    ended = problem_attributes(ha, "off")
    assert ended["event_id"] == event_id
    assert ended["reason"] == "recovered"
    assert ended["peak_score"] >= started["peak_score"]
    assert isinstance(ended["clip"], str)
    clip = Path(ended["clip"]).name
    ha.wait_for(lambda: any(p.name == clip for p in clips.rglob("*")), 30, f"clip {clip} on disk")
    states = [c.state for c in recorder.of(PROBLEM)]
    assert "on" in states
    assert states[-1] == "off"
    print(f"problem sensor on after {on:.1f} s, off {off:.1f} s later, event {event_id[:8]}")
    return str(event_id)


def problem_attributes(ha: HomeAssistant, state: str) -> dict[str, Any]:
    """The problem sensor's attributes when it is in `state`, else {}."""
    found = ha.states().get(PROBLEM)
    return dict(found["attributes"]) if found and found["state"] == state else {}


def check_event_entity(recorder: StateRecorder, event_id: str) -> None:
    """The event entity fired `start` and later `end` for the event (what automations trigger on), with
    the event's id, peak and threshold, and on the end its reason and clip."""
    fired = [c.attributes for c in recorder.of(EVENT) if c.attributes.get("event_type")]
    kinds = [a["event_type"] for a in fired]
    assert "start" in kinds, fired
    assert "end" in kinds[kinds.index("start") :], fired
    assert all(a["event_id"] == event_id and a["peak_score"] > 0 and a["threshold"] > 0 for a in fired), fired
    end = next(a for a in fired if a["event_type"] == "end")
    assert end["reason"] == "recovered", end
    assert str(end["clip"]).endswith(f"-{event_id[:8]}.wav"), end


def check_mute(ha: HomeAssistant, broker: Broker) -> None:
    """The duration number, then the switch: HA's `switch.turn_on` mutes anomalyd for that long, and off
    unmutes; the retained mute topic and the switch agree."""
    topic = f"anomalyd/{NODE}/{FAULTY}/mute"
    ha.call_service("number", "set_value", entity_id=MUTE_MINUTES, value=15)
    ha.wait_for(lambda: float(ha.state(MUTE_MINUTES) or 0) == 15.0, 30, "mute duration 15")
    ha.call_service("switch", "turn_on", entity_id=MUTE)
    ha.wait_for(lambda: ha.state(MUTE) == "on", 30, "the mute switch on")
    state = json.loads(retained(broker, topic)[topic])
    assert (state["muted"], state["minutes"]) == (True, 15)
    left = dt.datetime.fromisoformat(state["until"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=14) < left <= dt.timedelta(minutes=15)
    ha.call_service("switch", "turn_off", entity_id=MUTE)
    ha.wait_for(lambda: ha.state(MUTE) == "off", 30, "the mute switch off")
    assert json.loads(retained(broker, topic)[topic])["muted"] is False
    # A short mute from elsewhere (a shell, Node-RED): the switch shows it, and turns off when it runs out.
    shell = Subscriber(broker, topic)
    try:
        shell.client.publish(f"{topic}/set", "3", qos=1)
        ha.wait_for(lambda: ha.state(MUTE) == "on", 30, "the switch on for a 3 s mute")
        ran_out = ha.wait_for(lambda: ha.state(MUTE) == "off", 30, "the switch off when the mute runs out")
    finally:
        shell.close()
    assert json.loads(retained(broker, topic)[topic])["reason"] == "expired"
    print(f"a 3 s mute: the switch turned off by itself {ran_out:.1f} s after it showed on")


def check_kill_and_restart(
    ha: HomeAssistant,
    recorder: StateRecorder,
    daemon: DaemonProcess,
    config: Path,
    expected: dict[str, dict[str, Any]],
) -> DaemonProcess:
    """SIGKILL with an event open: every entity turns unavailable (the broker's Last Will). The restarted
    daemon ends that event and HA shows the true states: problem off, not the ON from before the kill."""
    ha.wait_for(lambda: ha.state(PROBLEM) == "on", 120, "the next event (problem on)")
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    assert "Traceback" not in daemon.log
    gone = ha.wait_for(lambda: all(ha.state(e) == "unavailable" for e in expected), 30, "all unavailable")
    print(f"SIGKILL: every entity unavailable after {gone:.1f} s")
    restarted = time.monotonic()
    daemon = DaemonProcess(config)
    back = ha.wait_for(up(daemon, lambda: all(available(ha, e) for e in expected)), 120, "entities back")
    print(f"restart: entities available {back:.1f} s after the daemon started")
    for entity_id in (PROBLEM, f"binary_sensor.{PREFIX}_{STEADY}_anomaly"):
        # The recorder hears of changes a moment after HA's state API shows them.
        def seen(entity_id: str = entity_id) -> list[Any]:
            return [c for c in recorder.of(entity_id, since=restarted) if c.state != "unavailable"]

        ha.wait_for(lambda: bool(seen()), 10, f"{entity_id}'s first state after the restart recorded")
        first = seen()[0]
        assert first.state == "off", (entity_id, first)
    assert ha.state(MUTE) == "off"
    assert float(ha.state(MUTE_MINUTES) or 0) == 15.0  # remembered across the restart
    return daemon


def check_removed_stream(
    ha: HomeAssistant, broker: Broker, daemon: DaemonProcess, config: Path, *, bundle: Path, fault: Path
) -> DaemonProcess:
    """STEADY leaves the config: a reload clears its discovery (empty retained payloads), so its entities
    and device leave HA; a restart does not bring them back."""
    gone_ids = set(stream_entities(STEADY))
    daemon_config(config.parent, bundle, broker, {FAULTY: {"path": fault, "area": AREA}})
    daemon.signal(signal.SIGHUP)
    took = ha.wait_for(lambda: not gone_ids & set(ha.states()), 60, f"{STEADY}'s entities to go")
    print(f"reload without {STEADY}: its entities gone from HA {took:.1f} s after SIGHUP")
    assert not gone_ids & set(ha.entity_registry())
    left = [d for d in ha.device_registry() if ["mqtt", f"{PREFIX}_{STEADY}"] in d["identifiers"]]
    assert left == []
    assert not [t for t in retained(broker, "homeassistant/#") if f"_{STEADY}_" in t]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert "Traceback" not in daemon.log
    daemon = DaemonProcess(config)
    ha.wait_for(up(daemon, lambda: available(ha, PROBLEM)), 120, "the faulty stream back")
    time.sleep(3.0)  # discovery went out before `online`; give HA time to (wrongly) recreate anything
    assert not gone_ids & set(ha.states())
    assert not [t for t in retained(broker, "homeassistant/#") if f"_{STEADY}_" in t]
    return daemon
