"""Marking false alarms: `anomalyd events mark ID --normal` on a real event log and clips, the MQTT
`event/mark` command through the publisher's handler and the store's writer, and retention keeping
marked events."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from anomalyd.config import ClipsConfig, MqttConfig, StorageConfig, parse_config
from anomalyd.contract import Topics, load_schema
from anomalyd.control import ControlClient, ControlServer
from anomalyd.database import SCHEMA_VERSION, read_events
from anomalyd.errors import CommandError
from anomalyd.homeassistant import HaStream
from anomalyd.marks import MarkCommand, MarkOp, parse_mark_command
from anomalyd.mqtt import Publisher
from anomalyd.mutes import Mutes
from anomalyd.outbox import Outbox
from anomalyd.records import AnomalyEvent, ClipJob, utc_now
from anomalyd.store import StoreWriter, apply_retention
from tests.conftest import ROOT
from tests.mqtt_helpers import Broker, Subscriber, validate
from tests.test_mqtt import Running, mqtt_config

DAEMON_UID = 65534
TOPICS = Topics("anomalyd", "edge1")
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
WITH_CLIP, NO_CLIP, OPEN = "a1" + "0" * 30, "b2" + "0" * 30, "c3" + "0" * 30


def event(event_id: str, kind: str, started: dt.datetime) -> AnomalyEvent:
    return AnomalyEvent(
        event_id=event_id, type=kind, node="n", stream="fan", started_at=started,
        ended_at=started + dt.timedelta(seconds=30) if kind == "end" else None,
        start_sample=0, end_sample=480_000, score=0.5, peak_score=0.9, mean_score=0.4, threshold=0.2,
        mean=0.1, std=0.03, k=3.0, model_id="m-1", windows=10, windows_over=8,
        reason="recovered" if kind == "end" else "", at=started + dt.timedelta(seconds=31),
    )  # fmt: skip


def event_log(state: Path, outbox: Outbox | None = None) -> StoreWriter:
    """An event log with a closed event with its clip, a closed one without, and an open one."""
    clips = ClipsConfig(directory=state / "clips", min_free_mb=0)
    writer = StoreWriter(StorageConfig(database=state / "events.db", clips=clips), outbox)
    writer.write(event(WITH_CLIP, "end", T0))
    writer.write(ClipJob(WITH_CLIP, "fan", T0, np.zeros(16_000, np.float32), 16_000, clips.directory))
    writer.write(event(NO_CLIP, "end", T0 + dt.timedelta(minutes=1)))
    writer.write(event(OPEN, "start", T0 + dt.timedelta(minutes=2)))
    return writer


def mark(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anomalyd", "events", "mark", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_events_mark_copies_the_clip_and_records_it_and_retention_keeps_the_event(tmp_path: Path) -> None:
    state = tmp_path / "state"  # the daemon's state folder: its user's; root marks from the command line
    writer = event_log(state)
    writer.db.close()
    for path in [state, *state.rglob("*")]:
        os.chown(path, DAEMON_UID, DAEMON_UID)
    database = state / "events.db"

    result = mark(WITH_CLIP[:8], "--normal", "--note", "compressor start-up", "--database", database)
    assert result.returncode == 0, result.stderr
    clip = Path(read_events(database)[0]["clip_path"])
    copy = state / "normal" / "fan" / clip.name
    assert f"its clip joins the normal audio: {copy}" in result.stdout
    assert copy.read_bytes() == clip.read_bytes()
    row = next(r for r in read_events(database) if r["event_id"] == WITH_CLIP)
    assert row["mark_note"] == "compressor start-up"
    assert row["marked_normal_at"] is not None
    # Run as root, nothing it created is root's: the daemon's user keeps writing its folder.
    assert {p.stat().st_uid for p in [state, *state.rglob("*")]} == {DAEMON_UID}

    again = mark(WITH_CLIP, "--normal", "--database", database)
    assert again.returncode == 0
    assert "already marked" in again.stdout
    for args, message in (
        (("deadbeef", "--normal"), "deadbeef: no such event in the event log"),
        ((NO_CLIP, "--normal"), "has no clip"),
        ((OPEN, "--normal"), "still open"),
        ((WITH_CLIP,), "--normal"),
        (("xyz", "--normal"), "8 to 32 hexadecimal digits"),
    ):
        result = mark(*args, "--database", database)
        assert result.returncode == 2, (args, result.stdout)
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr

    # Retention deletes old events (the open one is closed as interrupted by opening the writer), but
    # not a marked event, whatever its age.
    writer = StoreWriter(StorageConfig(database=database, retention_days=1, max_events=1))
    assert apply_retention(writer.db, writer.config, utc_now()) == 2
    assert [r["event_id"] for r in read_events(database)] == [WITH_CLIP]
    assert clip.exists()
    assert writer.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    writer.stop(1.0)


def test_normal_dir_defaults_to_normal_beside_the_database(tmp_path: Path) -> None:
    stream = '[[streams]]\nname = "fan"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    config = parse_config(
        f'[storage]\ndatabase = "/var/lib/anomalyd/events.db"\n{stream}', "x.toml", tmp_path
    )
    assert config.storage.normal_folder == Path("/var/lib/anomalyd/normal")
    config = parse_config(f'[storage]\nnormal_dir = "extra"\n{stream}', "x.toml", tmp_path)
    assert config.storage.normal_folder == tmp_path / "extra"


def test_normal_dir_comes_from_the_config(tmp_path: Path) -> None:
    writer = event_log(tmp_path)
    writer.db.close()
    config = tmp_path / "anomalyd.toml"
    config.write_text(
        '[storage]\ndatabase = "events.db"\nnormal_dir = "extra-normal"\n'
        '[[streams]]\nname = "fan"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'
    )
    result = mark(WITH_CLIP, "--normal", "--config", config)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "extra-normal" / "fan").glob("*.wav"))) == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"x" * 65, "longer than 64"),
        (b"\xff" * 8, "not ASCII"),
        (b"abc", "hexadecimal"),
        (b"1e3", "hexadecimal"),
        (b"0" * 33, "hexadecimal"),
        (b"../../etc", "hexadecimal"),
    ],
)
def test_mark_commands_that_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_mark_command(payload)


def test_mark_commands_that_are_accepted() -> None:
    assert parse_mark_command(f" {WITH_CLIP.upper()}\n".encode()) == WITH_CLIP
    assert parse_mark_command(b"000000a1") == "000000a1"
    assert TOPICS.command_of("anomalyd/edge1/fan/event/mark") == ("fan", "event/mark")
    assert TOPICS.command_of("anomalyd/edge1/fan/mute/set") == ("fan", "mute/set")
    assert TOPICS.command_of("anomalyd/edge1/fan/mute/minutes/set") == ("fan", "mute/minutes/set")
    assert TOPICS.command_of("anomalyd/edge1/fan/event") is None
    assert TOPICS.command_of("anomalyd/edge2/fan/event/mark") is None
    assert TOPICS.command_of("anomalyd/edge1/fan/x/event/mark") is None


def _message(topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic.encode())
    m.payload = payload
    m.retain = retain
    return m


def test_mark_over_mqtt_is_done_by_the_store_writer_and_answered(tmp_path: Path) -> None:
    writer = event_log(tmp_path, Outbox(TOPICS, 10_000, Mutes()))
    writer.db.execute("DELETE FROM outbox")
    writer.start()
    config = MqttConfig(enabled=True)
    publisher = Publisher(
        config, node="edge1", streams=[HaStream("fan", "m")], database=tmp_path / "events.db", sink=writer
    )
    topic = "anomalyd/edge1/fan/event/mark"
    try:
        for payload, retain in ((WITH_CLIP.encode(), False), (WITH_CLIP.encode(), False), (b"nonsense", False),
                                (NO_CLIP.encode(), False), (WITH_CLIP.encode(), True)):  # fmt: skip
            publisher._on_message(None, None, _message(topic, payload, retain))  # type: ignore[arg-type]
        publisher._on_message(None, None, _message("anomalyd/edge1/pump/event/mark", WITH_CLIP.encode()))  # type: ignore[arg-type]
        writer.put(MarkCommand("pump", WITH_CLIP, utc_now()))  # another stream's event, past the handler
        assert writer.flush(10.0)
        rows = writer.db.execute("SELECT topic, payload, retain FROM outbox ORDER BY id").fetchall()
    finally:
        writer.stop(2.0)
    answers = [json.loads(p) for t, p, retain in rows if t.endswith("/marked") and not retain]
    assert len(answers) == 6  # five for fan; none for the unknown stream's topic; one for the record
    for answer in answers:
        jsonschema.validate(answer, load_schema("marked"), format_checker=jsonschema.FormatChecker())
    first, second, garbage, no_clip, retained, other = answers
    assert (first["marked"], first["already"], first["event_id"]) == (True, False, WITH_CLIP)
    assert Path(first["normal_clip"]).parent == tmp_path / "normal" / "fan"
    assert (second["marked"], second["already"]) == (True, True)
    assert "hexadecimal" in garbage["refused"]
    assert "has no clip" in no_clip["refused"]
    assert "retained" in retained["refused"]
    assert "belongs to stream fan, not pump" in other["refused"]
    marked = [r for r in read_events(tmp_path / "events.db") if r["marked_normal_at"]]
    assert [r["event_id"] for r in marked] == [WITH_CLIP]


@pytest.mark.slow
def test_mark_through_a_real_broker(tmp_path: Path, broker: Broker) -> None:
    """A mark command published to Mosquitto reaches the writer and is answered on `marked`."""
    running = Running(mqtt_config(tmp_path, broker))
    watcher = Subscriber(broker, "anomalyd/edge1/fan/marked")
    try:
        running.wait_connected()
        clips = tmp_path / "clips"
        running.store.put(event(WITH_CLIP, "end", T0))
        running.store.put(ClipJob(WITH_CLIP, "fan", T0, np.zeros(16_000, np.float32), 16_000, clips))
        assert running.store.flush(10.0)
        time.sleep(0.5)  # the subscription is made right after the connection
        watcher.client.publish("anomalyd/edge1/fan/event/mark", WITH_CLIP[:8], qos=1)
        answer = watcher.wait_for("/fan/marked", 1, timeout=10)[-1]
    finally:
        running.stop()
        watcher.close()
    validate(answer)
    payload = json.loads(answer.payload)
    assert (payload["marked"], payload["already"], payload["event_id"]) == (True, False, WITH_CLIP)
    assert Path(payload["normal_clip"]).is_file()


def test_mark_over_the_control_channel_is_done_by_the_store_writer(tmp_path: Path) -> None:
    """`anomalyd events mark` against a running daemon: its request, its writer, its answer."""
    writer = event_log(tmp_path, Outbox(TOPICS, 10_000, Mutes()))
    writer.db.execute("DELETE FROM outbox")
    writer.start()
    server = ControlServer(tmp_path / "control.sock", {"mark": MarkOp(writer.put)})
    server.start()
    replies: list[dict[str, Any]] = []
    try:
        for request in ({"op": "mark", "event_id": WITH_CLIP[:8], "note": "door open"},
                        {"op": "mark", "event_id": WITH_CLIP}, {"op": "mark", "event_id": NO_CLIP},
                        {"op": "mark", "event_id": "zz"}, {"op": "mark", "event_id": 5},
                        {"op": "mark", "event_id": WITH_CLIP, "note": "x" * 501}):  # fmt: skip
            client = ControlClient.connect(tmp_path / "control.sock")
            assert client is not None
            client.send(request)
            replies.append(client.receive(15.0) or {})
            client.close()
        assert writer.flush(10.0)
        rows = writer.db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    finally:
        server.stop()
        writer.stop(2.0)
    first, again, no_clip, bad_id, not_text, long_note = replies
    assert (first["ok"], first["already"]) == (True, False)
    assert (first["event_id"], first["stream"]) == (WITH_CLIP, "fan")
    assert Path(first["normal_clip"]).parent == tmp_path / "normal" / "fan"
    assert (again["ok"], again["already"]) == (True, True)
    assert no_clip == {"ok": False, "error": f"event {NO_CLIP}: has no clip (clips off, the disk short, or "
                       "deleted by the clip quota)"}  # fmt: skip
    assert "hexadecimal" in bad_id["error"]
    assert not_text["ok"] is False
    assert "at most 500" in long_note["error"]
    (marked,) = [r for r in read_events(tmp_path / "events.db") if r["marked_normal_at"]]
    assert (marked["event_id"], marked["mark_note"]) == (WITH_CLIP, "door open")
    # MQTT subscribers hear of the marks too; a refused request is its client's alone.
    answers = [json.loads(p) for t, p in rows if t.endswith("/fan/marked")]
    assert [(a["event_id"], a["already"]) for a in answers] == [(WITH_CLIP, False), (WITH_CLIP, True)]
