"""MQTT against a real Mosquitto (password login, TLS) and an independent subscriber: nothing is lost."""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from anomalyd.config import DaemonConfig, parse_config
from anomalyd.contract import Topics
from anomalyd.homeassistant import HaStream
from anomalyd.mqtt import LinkState, Publisher
from anomalyd.records import AnomalyEvent, ScoreReport, SourceState, SourceStatus, utc_now
from anomalyd.store import Mutes, Outbox, StoreWriter, read_events
from tests.daemon_helpers import DaemonProcess, write_config, write_recording
from tests.mqtt_helpers import (
    PASSWORD,
    USER,
    WATCHER,
    WATCHER_PASSWORD,
    Broker,
    Subscriber,
    retained,
    validate,
)

pytestmark = pytest.mark.slow


def mqtt_config(tmp_path: Path, broker: Broker, extra: str = "", password: str = PASSWORD) -> DaemonConfig:
    (tmp_path / "mqtt-password").write_text(password + "\n")
    text = (
        'node = "edge1"\n[storage]\ndatabase = "events.db"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{USER}"\n'
        'password_file = "mqtt-password"\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n'
        f"{extra}\n"
        '[[streams]]\nname = "fan"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    )
    return parse_config(text, "test", tmp_path)


class Running:
    """The store writer with its outbox and the publisher, in this process, as the daemon wires them."""

    def __init__(self, config: DaemonConfig) -> None:
        self.mutes = Mutes()
        self.outbox = Outbox(
            Topics(config.mqtt.prefix, config.node_id), config.mqtt.outbox_max_messages, self.mutes
        )
        self.store = StoreWriter(config.storage, self.outbox)
        self.publisher = Publisher(config.mqtt, node=config.node_id, streams=[HaStream("fan", "m")],
                                   database=config.storage.database, sink=self.store)  # fmt: skip
        self.store.start()
        self.publisher.mark_ready()  # nothing to state first: no pipeline here
        self.publisher.start()

    def wait_connected(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.publisher.state != LinkState.CONNECTED:
            assert time.monotonic() < deadline, "publisher did not connect"
            time.sleep(0.02)

    def stop(self) -> None:
        self.publisher.stop()
        self.store.stop(3.0)


def event(n: int, kind: str = "start") -> AnomalyEvent:
    started = utc_now()
    return AnomalyEvent(
        event_id=f"{n:032x}", type=kind, node="edge1", stream="fan", started_at=started,
        ended_at=started if kind == "end" else None, start_sample=0, end_sample=1, score=0.5, peak_score=0.9,
        mean_score=0.4, threshold=0.2, mean=0.1, std=0.03, k=3.0, model_id="m-1", windows=4, windows_over=3,
        reason="recovered" if kind == "end" else "", at=started,
    )  # fmt: skip


def test_broker_outage_of_30_s_loses_no_event_and_keeps_order(tmp_path: Path, broker: Broker) -> None:
    running = Running(mqtt_config(tmp_path, broker))
    try:
        running.wait_connected()
        broker.stop()
        outage = time.monotonic()
        for n in range(100):
            running.store.put(event(n))
            time.sleep(0.25)
        time.sleep(max(0.0, 30.0 - (time.monotonic() - outage)))
        assert running.publisher.state != LinkState.CONNECTED
        assert running.outbox.dropped["event"] == 0

        broker.allow(WATCHER)  # back, but the daemon may only log in once the watcher listens
        broker.start()
        watcher = Subscriber(broker, "anomalyd/#")
        broker.allow(USER, WATCHER)
        back = time.monotonic()
        received = watcher.wait_for("/event", 100, timeout=30)
        took = time.monotonic() - back
        watcher.close()
    finally:
        running.stop()
    ids = [json.loads(m.payload)["event_id"] for m in received]
    assert ids == [f"{n:032x}" for n in range(100)]  # exactly 100 distinct, in order
    for m in received:
        validate(m)
        assert json.loads(m.payload)["replayed"] is True
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("SELECT count(*) FROM outbox WHERE kind = 'event'").fetchone()[0] == 0
    print(
        f"outage test: 100 events over 30 s of outage, all delivered {took:.2f} s after the broker returned"
    )


def test_tls_with_the_right_ca_and_a_clear_error_with_a_wrong_one(
    tmp_path: Path, broker: Broker, certs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    tls = f'[mqtt.tls]\nenabled = true\nca_file = "{certs["ca"]}"\n'
    good = mqtt_config(tmp_path, broker, tls)
    good = good.model_copy(
        update={"mqtt": good.mqtt.model_copy(update={"host": "localhost", "port": broker.tls_port})}
    )
    running = Running(good)
    try:
        running.wait_connected()
    finally:
        running.stop()

    wrong = good.model_copy(update={"mqtt": good.mqtt.model_copy(update={
        "tls": good.mqtt.tls.model_copy(update={"ca_file": certs["other_ca"]})})})  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="anomalyd.mqtt"):
        running = Running(wrong)
        try:
            time.sleep(1.5)
            assert running.publisher.state != LinkState.CONNECTED
        finally:
            running.stop()
    assert f"TLS certificate of localhost:{broker.tls_port} not trusted" in caplog.text
    assert "check mqtt.tls.ca_file" in caplog.text


def test_discovery_scores_health_and_mute_commands(tmp_path: Path, broker: Broker) -> None:
    watcher = Subscriber(broker, "#")
    running = Running(mqtt_config(tmp_path, broker))
    try:
        running.wait_connected()
        configs = watcher.wait_for("/config", 12, timeout=10)  # the node's 5 entities and the stream's 7
        assert {m.topic for m in configs} >= {
            "homeassistant/binary_sensor/anomalyd_edge1_fan_anomaly/config",
            "homeassistant/sensor/anomalyd_edge1_fan_score/config",
            "homeassistant/sensor/anomalyd_edge1_fan_source/config",
        }
        problem = json.loads(next(m.payload for m in configs if m.topic.endswith("_fan_anomaly/config")))
        assert problem["device_class"] == "problem"
        assert problem["state_topic"] == "anomalyd/edge1/fan/state"
        assert problem["availability_topic"] == "anomalyd/edge1/status"
        late = Subscriber(broker, "homeassistant/#")  # live copies carry no retain flag; late ones do
        assert all(m.retain for m in late.wait_for("/config", 12, timeout=10))
        late.close()
        watcher.client.publish("homeassistant/status", "online", qos=1)  # Home Assistant restarted
        watcher.wait_for("/config", 24, timeout=10)

        running.store.put(
            SourceStatus("edge1", "fan", SourceState.SILENT, "level -90.0 dBFS for 10 s", utc_now())
        )
        running.store.put(ScoreReport("fan", 0.12, 0.2, utc_now()))
        running.store.put(event(1))
        running.store.put(event(1, "end"))
        watcher.wait_for("/fan/event", 2, timeout=10)
        # State is retained: an undelivered ON that an OFF supersedes is not sent at all.
        watcher.wait_for("/fan/state", 1, timeout=10)
        assert watcher.wait_for("/fan/event", 2, timeout=10)[-1].payload.count('"type": "end"') == 1

        watcher.client.publish("anomalyd/edge1/fan/mute/set", "600", qos=1)
        ack = json.loads(watcher.wait_for("/fan/mute", 1, timeout=10)[-1].payload)
        assert ack["muted"] is True
        assert dt.datetime.fromisoformat(ack["until"]) > utc_now() + dt.timedelta(seconds=590)
        running.store.put(event(2))
        running.store.put(event(2, "end"))
        time.sleep(1.0)
        assert len(watcher.on("/fan/event")) == 2  # muted: logged locally, not published
        watcher.client.publish("anomalyd/edge1/fan/mute/set", "off", qos=1)
        watcher.wait_for("/fan/mute", 2, timeout=10)
        running.store.put(event(3))
        events = watcher.wait_for("/fan/event", 3, timeout=10)
        late = Subscriber(broker, "anomalyd/edge1/fan/+")
        retained = {m.topic.rsplit("/", 1)[1]: m for m in late.wait_for("", 3, timeout=10) if m.retain}
        late.close()
    finally:
        running.stop()
        watcher.close()
    assert json.loads(events[-1].payload)["event_id"] == f"{3:032x}"
    assert {e["event_id"] for e in read_events(tmp_path / "events.db")} == {f"{n:032x}" for n in (1, 2, 3)}
    for m in watcher.messages:
        validate(m)
    assert json.loads(retained["source"].payload)["state"] == "silent"
    assert retained["state"].payload == "ON"  # event 3 is still open
    assert json.loads(retained["mute"].payload)["muted"] is False
    assert json.loads(watcher.on("/fan/score")[-1].payload)["score"] == 0.12
    assert watcher.on("/status")[-1].payload == "offline"  # said goodbye on a clean stop


def test_a_full_outbox_drops_scores_first_and_events_last(tmp_path: Path) -> None:
    config = parse_config(
        '[mqtt]\nenabled = true\noutbox_max_messages = 100\n'
        '[[streams]]\nname = "fan"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n', "t", tmp_path
    )  # fmt: skip
    outbox = Outbox(Topics("anomalyd", "edge1"), 100, Mutes())
    store = StoreWriter(config.storage, outbox)  # not started: writes happen here, in order
    for n in range(30):
        store.write(ScoreReport(f"s{n}", 0.1, 0.2, utc_now()))  # 30 streams: 30 scores
    # Updates carry no ON/OFF; each event message also replaces the stream's one retained last_event.
    for n in range(69):
        store.write(event(n, "update"))
    store.write(ScoreReport("s0", 0.3, 0.2, utc_now()))  # replaces the undelivered score of s0
    assert outbox.dropped == {"score": 0, "source": 0, "state": 0, "mute": 0, "discovery": 0, "event": 0}
    for n in range(69, 110):
        store.write(event(n, "update"))
    count = store.db.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall()
    assert dict(count) == {"event": 100}
    # Scores went first, then the retained last_event (each time it came back), then the oldest events.
    assert (outbox.dropped["score"], outbox.dropped["state"], outbox.dropped["event"]) == (30, 11, 10)
    first = store.db.execute("SELECT event_id FROM outbox ORDER BY id LIMIT 1").fetchone()[0]
    assert first == f"{10:032x}"  # the oldest events went, the newest stayed
    assert len(read_events(tmp_path / "events.db")) == 110  # the local log keeps everything
    store.stop(1.0)


def test_daemon_wrong_password_kill_restart_and_last_will(
    bundle_dir: Path, tmp_path: Path, broker: Broker
) -> None:
    """Wrong password: clear error, no crash, events logged. SIGKILL with the backlog undelivered; a restart
    with the right password delivers all of it. SIGKILL again: the retained status turns offline."""
    fault = write_recording(tmp_path / "fault.wav", "imbalance", 20.0, onset=5.0, until=12.0)
    normal = write_recording(tmp_path / "normal.wav", "normal", 60.0)
    (tmp_path / "pw").write_text("wrong-password\n")
    mqtt = (f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{USER}"\n'
            'password_file = "pw"\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n')  # fmt: skip
    streams: dict[str, dict[str, object]] = {"fan": {"path": fault, "loop": True, "cooldown_seconds": 0.0}}
    config = write_config(tmp_path / "d.toml", bundle_dir, streams, 'node = "edge1"\n' + mqtt)
    first = DaemonProcess(config)
    first.wait_log("refused the connection: Not authorized")
    first.wait_for(lambda: _events_in_outbox(tmp_path) >= 6, 60, "events waiting in the outbox")
    first.process.send_signal(signal.SIGKILL)
    first.wait_exit(10)
    assert "Traceback" not in first.log
    assert first.log.count("refused the connection") == 1  # retried many times, said once
    logged = {e["event_id"] for e in read_events(tmp_path / "events.db")}
    waiting = _event_ids_in_outbox(tmp_path)
    assert waiting
    assert waiting <= logged

    watcher = Subscriber(broker, "anomalyd/#")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    write_config(config, bundle_dir, {"fan": {"path": normal, "realtime": True}}, 'node = "edge1"\n' + mqtt)
    second = DaemonProcess(config)
    try:
        second.wait_for(lambda: waiting <= _received_ids(watcher), 30, "the backlog at the subscriber")
        second.wait_for(
            lambda: watcher.on("/status") and watcher.on("/status")[-1].payload == "online", 10, "online"
        )
        assert all(json.loads(m.payload)["replayed"] for m in watcher.on("/event"))
        for m in watcher.messages:
            validate(m)
        second.process.send_signal(signal.SIGKILL)  # no goodbye: the broker must publish the Last Will
        second.wait_exit(10)
        later = Subscriber(broker, "anomalyd/edge1/status")
        retained = later.wait_for("/status", 1, timeout=10)[-1]
        later.close()
    finally:
        watcher.close()
        if second.process.poll() is None:
            second.process.kill()
    assert (retained.payload, retained.retain) == ("offline", True)


def _event_ids_in_outbox(folder: Path) -> set[str]:
    conn = sqlite3.connect(folder / "events.db")
    try:
        return {r[0] for r in conn.execute("SELECT event_id FROM outbox WHERE kind = 'event'")}
    except sqlite3.OperationalError:
        return set()
    finally:
        conn.close()


def _events_in_outbox(folder: Path) -> int:
    return len(_event_ids_in_outbox(folder)) if (folder / "events.db").exists() else 0


def _received_ids(watcher: Subscriber) -> set[str]:
    return {json.loads(m.payload)["event_id"] for m in watcher.on("/event")}


def mosquitto_pub(broker: Broker, *args: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", WATCHER, "-P", WATCHER_PASSWORD,
         "-q", "1", "-t", "anomalyd/edge1/fan/mute/set", *args],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


@pytest.mark.fault
def test_garbage_on_the_command_topic_never_drops_the_link_nor_silences_alerts(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """`mosquitto_pub -r -m inf` used to raise OverflowError in the callback and tear the link down, and,
    retained, again at every reconnect. Now each bad command is refused (acknowledged with the true mute
    state and the reason), one short log line each, and alerts keep flowing."""
    digits = tmp_path / "digits"
    digits.write_bytes(b"9" * 1_000_000)
    watcher = Subscriber(broker, "anomalyd/#")
    with caplog.at_level(logging.INFO, logger="anomalyd"):
        running = Running(mqtt_config(tmp_path, broker))
        try:
            running.wait_connected()
            mosquitto_pub(broker, "-r", "-m", "inf")  # retained, as in the report
            mosquitto_pub(broker, "-f", str(digits))  # 1 MB of digits
            mosquitto_pub(broker, "-m", "1e12")
            mosquitto_pub(broker, "-m", "-0")
            acks = [json.loads(m.payload) for m in watcher.wait_for("/fan/mute", 4, timeout=10)]
            assert [a["refused"] for a in acks] == [
                "expected a number of seconds, 'on' or 'off'", "longer than 32 bytes",
                "expected a number of seconds, 'on' or 'off'", "expected a number of seconds, 'on' or 'off'",
            ]  # fmt: skip
            assert all(a["muted"] is False for a in acks)
            running.store.put(event(1))
            watcher.wait_for("/fan/event", 1, timeout=10)
            assert running.publisher.state == LinkState.CONNECTED
        finally:
            running.stop()

        # A restart: the broker hands the retained `inf` over again, flagged retained: refused as such.
        running = Running(mqtt_config(tmp_path, broker))
        try:
            running.wait_connected()
            ack = json.loads(watcher.wait_for("/fan/mute", 5, timeout=10)[-1].payload)
            assert ack["refused"] == "retained command (publish it without -r)"
            mosquitto_pub(broker, "-m", "600")  # a good command still works
            ack = json.loads(watcher.wait_for("/fan/mute", 6, timeout=10)[-1].payload)
            assert (ack["muted"], ack["refused"]) == (True, None)
            running.store.put(event(1, "end"))  # announced before the mute: its end goes out
            ends = watcher.wait_for("/fan/event", 2, timeout=10)
            assert json.loads(ends[-1].payload)["type"] == "end"
            assert running.publisher.state == LinkState.CONNECTED
        finally:
            running.stop()
            watcher.close()
    for m in watcher.messages:
        validate(m)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("anomalyd")]
    assert sum("MQTT: connected to" in line for line in lines) == 2  # once per run: never dropped
    refusals = [line for line in lines if "refused:" in line]
    assert len(refusals) == 5
    assert all(len(line) < 200 for line in refusals)
    assert not [r for r in caplog.records if r.exc_info or "handler failed" in r.getMessage()]


@pytest.mark.fault
def test_a_broker_outage_longer_than_the_back_off_keeps_the_heartbeat_and_resumes_at_once(
    tmp_path: Path, broker: Broker
) -> None:
    config = mqtt_config(tmp_path, broker)
    config = config.model_copy(update={"mqtt": config.mqtt.model_copy(
        update={"retry_initial_seconds": 0.5, "retry_max_seconds": 15.0})})  # fmt: skip
    # The back-off reaches 15 s during the outage; delivery must not wait for it.
    running = Running(config)
    staleness: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            staleness.append(time.monotonic() - running.publisher.heartbeat)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    try:
        running.wait_connected()
        broker.stop()
        sampler.start()
        time.sleep(5.0)
        running.store.put(event(7))  # queued while the broker is away
        time.sleep(20.0)  # longer than retry_max_seconds
        link = running.publisher.link_status()
        assert link.state != LinkState.CONNECTED
        assert "cannot connect" in link.detail
        broker.start()
        back = time.monotonic()
        watcher = Subscriber(broker, "anomalyd/edge1/fan/state")  # retained: seen however late it subscribes
        try:
            watcher.wait_for("/fan/state", 1, timeout=max(0.1, 5.0 - (time.monotonic() - back)))
            took = time.monotonic() - back
        finally:
            watcher.close()
    finally:
        sampling.set()
        if sampler.is_alive():
            sampler.join(5)
        running.stop()
    assert max(staleness) < 2.0, f"heartbeat {max(staleness):.2f} s old during the outage"
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
    print(f"outage of 25 s: delivery resumed {took:.2f} s after the broker returned; "
          f"heartbeat at most {max(staleness):.2f} s old")  # fmt: skip


def test_diagnostics_are_published_retained_on_change_and_after_a_reconnect(
    tmp_path: Path, broker: Broker
) -> None:
    running = Running(mqtt_config(tmp_path, broker))
    try:
        running.publisher.set_diagnostics('{"storage": "ok"}')
        running.wait_connected()
        watcher = Subscriber(broker, "anomalyd/edge1/diagnostics")
        assert watcher.wait_for("/diagnostics", 1, timeout=10)[-1].payload == '{"storage": "ok"}'
        running.publisher.set_diagnostics('{"storage": "ok"}')  # unchanged: not sent again
        running.publisher.set_diagnostics('{"storage": "degraded"}')
        got = watcher.wait_for("/diagnostics", 2, timeout=10)
        time.sleep(0.5)
        assert [m.payload for m in watcher.on("/diagnostics")] == [
            '{"storage": "ok"}',
            '{"storage": "degraded"}',
        ]
        assert got[-1].payload == '{"storage": "degraded"}'
        # Retained: a subscriber arriving now is told the latest. (Whether the first copy above came
        # flagged retained depends on whether it reached the broker before the watcher subscribed.)
        assert retained(broker, "anomalyd/edge1/diagnostics") == {
            "anomalyd/edge1/diagnostics": '{"storage": "degraded"}'
        }
        watcher.close()
        broker.stop()  # no persistence: the new broker knows nothing until the daemon says it again
        broker.start()
        running.wait_connected(timeout=15)
        # A subscriber that came while the daemon was saying it again would get it live, unflagged: ask
        # the broker what it retains until the daemon's message has reached it.
        deadline = time.monotonic() + 10
        while not (told := retained(broker, "anomalyd/edge1/diagnostics", settle=0.5)):
            assert time.monotonic() < deadline, "the diagnostics were not published again after the reconnect"
    finally:
        running.stop()
    assert told == {"anomalyd/edge1/diagnostics": '{"storage": "degraded"}'}
