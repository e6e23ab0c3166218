"""Mutes: the strict command parser (table and fuzz), what a subscriber is told about events under a mute,
mute expiry and mutes that outlive a restart, through the real store writer and its SQLite outbox."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sqlite3
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from anomalyd.config import ClipsConfig, MqttConfig, StorageConfig
from anomalyd.contract import Topics, load_schema, schema_for
from anomalyd.errors import CommandError
from anomalyd.homeassistant import HaStream
from anomalyd.mqtt import Publisher
from anomalyd.mutes import (
    MAX_COMMAND_BYTES,
    MAX_MUTE_SECONDS,
    MinutesCommand,
    MuteCommand,
    Mutes,
    parse_minutes_command,
    parse_mute_command,
)
from anomalyd.outbox import Outbox
from anomalyd.records import AlarmState, AnomalyEvent, ScoreReport, SourceState, SourceStatus, utc_now
from anomalyd.roster import Roster
from anomalyd.store import StoreWriter

TOPICS = Topics("anomalyd", "edge1")


@pytest.mark.parametrize(
    ("payload", "seconds"),
    [(b"600", 600.0), (b" 3600\n", 3600.0), (b"0", 0.0), (b"0.0", 0.0), (b"off", 0.0), (b"OFF", 0.0),
     (b"1.5", 1.5), (b"604800", 604800.0), (b"0604800", 604800.0), (b"604800.000000000000000", 604800.0),
     (b"on", None), (b" On\n", None)],
)  # fmt: skip
def test_commands_that_are_accepted(payload: bytes, seconds: float | None) -> None:
    assert parse_mute_command(payload) == seconds


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"inf", "expected a number"), (b"nan", "expected a number"), (b"-0", "expected a number"),
     (b"-5", "expected a number"), (b"+5", "expected a number"), (b"1e12", "expected a number"),
     (b"1e3", "expected a number"), (b"0x10", "expected a number"), (b"1_000", "expected a number"),
     (b".5", "expected a number"), (b"5.", "expected a number"), (b"", "empty"), (b"  ", "empty"),
     (b"604800.5", "more than 604800 s"), (b"999999999", "more than 604800 s"),
     (b"9" * 32, "more than 604800 s"), (b"9" * 33, "longer than 32 bytes"), (b"1" * 1_000_000, "longer than"),
     ("٣٠".encode(), "not ASCII"), (b"\xff\xfe", "not ASCII"), (b"6\x0000", "expected a number"),
     (b"unmute", "expected a number"), (b"mute", "expected a number")],
)  # fmt: skip
def test_commands_that_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_mute_command(payload)


@pytest.mark.parametrize(
    ("payload", "minutes"),
    [(b"60", 60.0), (b"90.0", 90.0), (b" 1\n", 1.0), (b"10080", 10080.0), (b"2.5", 2.5)],
)
def test_mute_durations_that_are_accepted(payload: bytes, minutes: float) -> None:
    assert parse_minutes_command(payload) == minutes


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"0", "expected 1 to 10080"), (b"0.5", "expected 1 to 10080"), (b"10081", "expected 1 to 10080"),
     (b"9" * 32, "expected 1 to 10080"), (b"-5", "expected a number"), (b"inf", "expected a number"),
     (b"nan", "expected a number"), (b"1e3", "expected a number"), (b"on", "expected a number"),
     (b"", "empty"), (b"\xff", "not ASCII"), (b"1" * 33, "longer than 32 bytes")],
)  # fmt: skip
def test_mute_durations_that_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_minutes_command(payload)


def test_on_mutes_for_the_stream_duration_and_durations_outlive_a_restart(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    assert writer.outbox is not None
    writer.write(MuteCommand("fan", None, utc_now()))  # no roster yet: no duration known
    refused = json.loads(last(writer, "mute"))
    assert (refused["muted"], refused["minutes"]) == (False, None)
    assert "no mute duration" in refused["refused"]
    writer.write(Roster({"fan": 60.0, "pump": 15.0}))
    stated = {json.loads(p)["stream"]: json.loads(p) for leaf, _, p in outbox_rows(writer) if leaf == "mute"}
    assert (stated["pump"]["minutes"], stated["pump"]["muted"], stated["pump"]["reason"]) == (
        15.0,
        False,
        "restored",
    )
    writer.write(MinutesCommand("fan", 90.0, utc_now()))
    assert json.loads(last(writer, "mute"))["minutes"] == 90.0
    writer.write(MuteCommand("fan", None, utc_now()))
    state = json.loads(last(writer, "mute"))
    assert (state["muted"], state["minutes"], state["refused"]) == (True, 90.0, None)
    until = dt.datetime.fromisoformat(state["until"])
    assert dt.timedelta(minutes=89) < until - utc_now() <= dt.timedelta(minutes=90)
    writer.write(MinutesCommand("fan", 0.0, utc_now(), "expected 1 to 10080 minutes"))
    answer = json.loads(last(writer, "mute"))
    assert (answer["minutes"], answer["muted"], answer["refused"]) == (
        90.0,
        True,
        "expected 1 to 10080 minutes",
    )
    validate_all(writer)
    writer.stop(1.0)

    again = make_writer(tmp_path)
    again.write(Roster({"fan": 60.0, "pump": 15.0}))  # the config's durations: the one set at run time wins
    stated = {json.loads(p)["stream"]: json.loads(p) for leaf, _, p in outbox_rows(again) if leaf == "mute"}
    assert (stated["fan"]["minutes"], stated["fan"]["muted"]) == (90.0, True)
    assert stated["pump"]["minutes"] == 15.0
    again.stop(1.0)


def _check_parse(payload: bytes) -> None:
    try:
        seconds = parse_mute_command(payload)
    except CommandError as exc:
        reason = str(exc)
    else:
        reason = ""
    if reason:
        assert len(reason) <= 80
        assert reason.isascii()
        return
    if seconds is None:  # "on": the stream's mute duration
        assert payload.strip().lower() == b"on"
        return
    assert math.isfinite(seconds)
    assert 0 <= seconds <= MAX_MUTE_SECONDS
    assert len(payload) <= MAX_COMMAND_BYTES


NUMBERISH = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode()),
    st.integers(min_value=-(10**40), max_value=10**40).map(lambda i: str(i).encode()),
    st.decimals(allow_nan=True, allow_infinity=True).map(lambda d: str(d).encode()),
    st.from_regex(rb"\A[ \t]*[-+]?[0-9]{0,40}(\.[0-9]{0,10})?([eE][-+]?[0-9]{1,4})?[ \t\n]*\Z"),
    st.sampled_from([b"inf", b"-inf", b"Infinity", b"nan", b"NaN", b"1e12", b"-0", b"1E400", b"0e0"]),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
)


@seed(7)
@settings(max_examples=400, deadline=None, derandomize=True)
@given(NUMBERISH)
def test_fuzzed_payloads_are_either_in_range_or_refused(payload: bytes) -> None:
    _check_parse(payload)


def storage(tmp_path: Path) -> StorageConfig:
    return StorageConfig(database=tmp_path / "events.db", clips=ClipsConfig(directory=tmp_path / "clips"))


def make_writer(tmp_path: Path) -> StoreWriter:
    return StoreWriter(storage(tmp_path), Outbox(TOPICS, 10_000, Mutes()))


def event(n: int, kind: str, **changes: object) -> AnomalyEvent:
    started = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    fields = dict(
        event_id=f"{n:032x}", type=kind, node="edge1", stream="fan", started_at=started,
        ended_at=started + dt.timedelta(seconds=20) if kind == "end" else None, start_sample=0,
        end_sample=1, score=0.5, peak_score=0.9, mean_score=0.4, threshold=0.2, mean=0.1, std=0.03,
        k=3.0, model_id="m-1", windows=4, windows_over=3, reason="recovered" if kind == "end" else "",
        at=utc_now(),
    )  # fmt: skip
    fields.update(changes)
    return AnomalyEvent(**fields)  # type: ignore[arg-type]


def outbox_rows(writer: StoreWriter) -> list[tuple[str, str, str]]:
    """(leaf, kind, payload) of every waiting message, oldest first."""
    rows = writer.db.execute("SELECT topic, kind, payload FROM outbox ORDER BY id").fetchall()
    return [(topic.rsplit("/", 1)[1], kind, payload) for topic, kind, payload in rows]


def event_types(writer: StoreWriter) -> list[str]:
    return [json.loads(p)["type"] for leaf, _, p in outbox_rows(writer) if leaf == "event"]


def last(writer: StoreWriter, leaf: str) -> str:
    return [p for lf, _, p in outbox_rows(writer) if lf == leaf][-1]


def mute(stream: str, seconds: float, refused: str = "") -> MuteCommand:
    return MuteCommand(stream, seconds, utc_now(), refused)


def validate_all(writer: StoreWriter) -> None:
    for leaf, _, payload in outbox_rows(writer):
        name = schema_for(leaf)
        if name == "state":
            jsonschema.validate(payload, load_schema("state"))
        elif name is not None:
            jsonschema.validate(
                json.loads(payload), load_schema(name), format_checker=jsonschema.FormatChecker()
            )


def test_the_end_of_an_event_announced_before_a_mute_is_always_published(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(event(1, "start"))
    writer.write(mute("fan", 3600))  # maintenance begins while the alarm is on
    writer.write(event(1, "update"))
    writer.write(event(1, "end"))
    assert event_types(writer) == ["start", "update", "end"]
    assert last(writer, "state") == "OFF"
    assert json.loads(last(writer, "mute"))["muted"] is True
    validate_all(writer)
    writer.stop(1.0)


def test_an_event_that_begins_and_ends_inside_a_mute_publishes_nothing(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(mute("fan", 3600))
    writer.write(event(1, "start"))
    writer.write(event(1, "update"))
    writer.write(event(1, "end"))
    writer.write(ScoreReport("fan", 0.9, 0.2, utc_now()))  # scores and health flow while muted
    writer.write(SourceStatus("edge1", "fan", SourceState.CLIPPING, "peaks at full scale", utc_now()))
    assert event_types(writer) == []
    assert [leaf for leaf, _, _ in outbox_rows(writer)] == ["mute", "score", "source"]
    row = writer.db.execute("SELECT state, published FROM events").fetchone()
    assert row == ("closed", 0)  # the local log keeps it
    writer.stop(1.0)


def test_an_event_begun_under_a_mute_is_announced_when_the_mute_is_lifted(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(mute("fan", 3600))
    writer.write(event(1, "start"))
    writer.write(AlarmState("fan", on=True, at=utc_now()))  # a reload restates it: still not announced
    assert last(writer, "state") == "OFF"
    writer.write(mute("fan", 0))  # `off`: the alarm is still on, so the subscriber must learn of it now
    assert event_types(writer) == ["start"]
    assert last(writer, "state") == "ON"
    assert writer.db.execute("SELECT published FROM events").fetchone() == (1,)
    writer.write(event(1, "update"))
    writer.write(event(1, "end"))
    assert event_types(writer) == ["start", "update", "end"]
    assert last(writer, "state") == "OFF"
    validate_all(writer)
    writer.stop(1.0)


def test_an_update_after_a_mute_ran_out_goes_out_as_a_start(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.outbox.mutes.set("fan", utc_now() + dt.timedelta(seconds=0.3))  # type: ignore[union-attr]
    writer.write(event(1, "start"))
    time.sleep(0.4)  # ran out; the writer thread is not running, so nothing has acknowledged it yet
    writer.write(event(1, "update"))
    assert event_types(writer) == ["start"]
    assert last(writer, "state") == "ON"
    writer.stop(1.0)


def test_a_mute_expires_on_time_is_acknowledged_and_announces_open_events(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.start()
    writer.put(mute("fan", 1.0))
    writer.put(event(1, "start"))
    writer.flush(5.0)
    assert event_types(writer) == []
    set_at = time.monotonic()
    deadline = set_at + 10
    while not event_types(writer):
        assert time.monotonic() < deadline, "the expiry was not acknowledged"
        time.sleep(0.05)
    ack = json.loads(last(writer, "mute"))
    assert (ack["muted"], ack["reason"], ack["refused"]) == (False, "expired", None)
    assert event_types(writer) == ["start"]
    assert last(writer, "state") == "ON"
    assert writer.db.execute("SELECT count(*) FROM mutes").fetchone() == (0,)
    writer.stop(2.0)


def test_mutes_outlive_a_restart_and_those_that_ran_out_meanwhile_are_acknowledged(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(mute("fan", 3600))
    writer.write(mute("pump", 0.2))
    writer.stop(1.0)
    time.sleep(0.3)

    again = make_writer(tmp_path)
    assert again.outbox is not None
    now = utc_now()
    until = again.outbox.mutes.until("fan", now)
    assert until is not None
    assert until > now + dt.timedelta(seconds=3500)
    assert again.outbox.mutes.until("pump", now) is None
    acks = {json.loads(p)["stream"]: json.loads(p) for leaf, _, p in outbox_rows(again) if leaf == "mute"}
    assert (acks["fan"]["muted"], acks["fan"]["reason"]) == (True, "restored")
    assert (acks["pump"]["muted"], acks["pump"]["reason"]) == (False, "expired")
    again.write(event(1, "start"))
    assert event_types(again) == []  # still muted after the restart
    assert again.db.execute("SELECT stream FROM mutes").fetchall() == [("fan",)]
    validate_all(again)
    again.stop(1.0)


def test_a_refused_command_restates_the_true_mute_state(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(mute("fan", 600))
    writer.write(mute("fan", 0, refused="expected a number of seconds, 'on' or 'off'"))
    ack = json.loads(last(writer, "mute"))
    assert ack["muted"] is True
    assert ack["refused"] == "expected a number of seconds, 'on' or 'off'"
    writer.write(mute("fan", math.inf))  # a record that skipped the parser is refused all the same
    assert json.loads(last(writer, "mute"))["refused"] == f"expected 0 to {MAX_MUTE_SECONDS} s"
    assert writer.outbox is not None
    assert writer.outbox.mutes.until("fan", utc_now()) is not None
    validate_all(writer)
    writer.stop(1.0)


def test_events_left_open_by_a_crash_are_ended_publicly_at_the_next_start(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    writer.write(event(1, "start"))  # announced
    writer.write(mute("fan", 3600))
    writer.write(event(2, "start", stream="fan"))  # begun under the mute: never announced
    writer.db.execute("DELETE FROM outbox")  # as if the broker had taken everything
    writer.db.conn.close()  # a crash: nothing closed

    again = make_writer(tmp_path)
    ends = [json.loads(p) for leaf, _, p in outbox_rows(again) if leaf == "event"]
    assert [(e["event_id"], e["type"], e["reason"], e["replayed"]) for e in ends] == [
        (f"{1:032x}", "end", "interrupted", True)
    ]
    row = again.db.execute("SELECT updated_at FROM events WHERE event_id = ?", [f"{1:032x}"]).fetchone()
    assert dt.datetime.fromisoformat(ends[0]["ended_at"]) == dt.datetime.fromisoformat(row[0])
    assert last(again, "state") == "OFF"
    assert again.db.execute("SELECT count(*) FROM events WHERE state = 'open'").fetchone() == (0,)
    validate_all(again)
    again.stop(1.0)


def message(topic: bytes, payload: bytes, retain: bool) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic)
    m.payload = payload
    m.retain = retain
    return m


TOPIC = b"anomalyd/edge1/fan/mute/set"
TOPICS_FUZZ = st.one_of(
    st.just(TOPIC),
    st.just(b"anomalyd/edge1/pump/mute/set"),
    st.binary(max_size=80),
    st.text(max_size=80).map(lambda t: f"anomalyd/edge1/{t}/mute/set".encode("utf-8", "surrogatepass")),
)


@pytest.mark.slow
def test_fuzzed_command_messages_through_the_handler_and_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever arrives on the command topic: the handler raises nothing, the writer acknowledges every
    command for a known stream with a valid payload, the mute stays within its range, and the log gets
    a few short lines, not one per message."""
    caplog.set_level(logging.INFO, logger="anomalyd.mqtt")
    writer = make_writer(tmp_path)
    writer.start()
    config = MqttConfig(enabled=True, retry_initial_seconds=0.2, retry_max_seconds=1.0)
    publisher = Publisher(
        config, node="edge1", streams=[HaStream("fan", "m")], database=tmp_path / "events.db", sink=writer
    )
    seen = 0

    @seed(11)
    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(TOPICS_FUZZ, NUMBERISH, st.booleans())
    def run(topic: bytes, payload: bytes, retain: bool) -> None:
        nonlocal seen
        publisher._on_message(None, None, message(topic, payload, retain))  # type: ignore[arg-type]
        seen += 1

    try:
        run()
        assert writer.flush(30.0)
        acks = [json.loads(p) for leaf, _, p in outbox_rows(writer) if leaf == "mute"]
        assert acks
        answers = [a for a in acks if a["reason"] == "command"]  # the others: mutes that ran out
        assert len(answers) == writer.written  # every command for `fan` answered, refused or not
        for ack in acks:
            jsonschema.validate(ack, load_schema("mute"), format_checker=jsonschema.FormatChecker())
            if ack["until"] is not None:
                until = dt.datetime.fromisoformat(ack["until"])
                assert until <= utc_now() + dt.timedelta(seconds=MAX_MUTE_SECONDS)
    finally:
        writer.stop(5.0)
    assert seen == 300
    lines = [r.getMessage() for r in caplog.records if r.name == "anomalyd.mqtt"]
    assert 0 < len(lines) <= 20  # refusals and ignored messages: at most 20 lines a minute
    assert all(len(line) < 250 for line in lines)
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("SELECT count(*) FROM mutes WHERE stream != 'fan'").fetchone() == (0,)
