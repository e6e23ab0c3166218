"""The MQTT contract: topics and payloads (public API; field names are frozen once released).

    <prefix>/<node>/status             retained  "online" | "offline" (the offline one is the Last Will)
    <prefix>/<node>/diagnostics        retained  JSON: storage, MQTT backlog and per-stream lag (on change)
    <prefix>/<node>/<stream>/state     retained  "ON" while an anomaly event is open, else "OFF"
    <prefix>/<node>/<stream>/event     QoS 1     JSON: start / update / end of an event (schemas/event.json);
                                                 the end names the event's clip (file, URL)
    <prefix>/<node>/<stream>/last_event  retained  JSON: the latest of those messages (schemas/event.json),
                                                 for dashboards and Home Assistant's attributes
    <prefix>/<node>/<stream>/score     QoS 0     JSON: the latest window score, periodically
    <prefix>/<node>/<stream>/source    retained  JSON: source health (ok / silent / clipping / lost / ended)
    <prefix>/<node>/<stream>/mute/set  command   seconds to mute the stream's new alerts (0 to 604800, plain
                                                 decimal); "on" for the stream's mute duration; 0 or "off"
                                                 unmutes; anything else is refused
    <prefix>/<node>/<stream>/mute/minutes/set  command  the stream's mute duration in minutes (1 to 10080)
    <prefix>/<node>/<stream>/mute      retained  JSON: the mute state and duration, acknowledging each
                                                 command (also a refused one) and each mute's expiry
    <prefix>/<node>/<stream>/event/mark  command   an event id: that event was a false alarm (its clip
                                                 joins the stream's normal audio)
    <prefix>/<node>/<stream>/marked    QoS 1     JSON: the answer to each mark command (schemas/marked.json)

Every JSON payload has a JSON Schema in anomalyd/schemas/; tests validate published messages against them.
Home Assistant's discovery configs for these topics are made in anomalyd/homeassistant.py.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from anomalyd.records import AnomalyEvent, ScoreReport, SourceStatus, iso

SCHEMA_NAMES = ("event", "score", "source", "mute", "state", "status", "diagnostics", "marked")


# The schema of each topic's last level; `state` and `status` are plain strings.
SCHEMA_OF_LEAF = {**{name: name for name in SCHEMA_NAMES}, "last_event": "event"}


def schema_for(topic: str) -> str | None:
    """The name of the JSON Schema of a topic's payload, None for topics without one (commands)."""
    return SCHEMA_OF_LEAF.get(topic.rsplit("/", 1)[-1])


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one payload kind, shipped inside the package."""
    text = resources.files("anomalyd.schemas").joinpath(f"{name}.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.node}/status"

    def stream(self, stream: str, leaf: str) -> str:
        return f"{self.prefix}/{self.node}/{stream}/{leaf}"

    @property
    def diagnostics(self) -> str:
        return f"{self.prefix}/{self.node}/diagnostics"

    @property
    def mute_commands(self) -> str:
        return f"{self.prefix}/{self.node}/+/mute/set"

    @property
    def minutes_commands(self) -> str:
        return f"{self.prefix}/{self.node}/+/mute/minutes/set"

    @property
    def mark_commands(self) -> str:
        return f"{self.prefix}/{self.node}/+/event/mark"

    def command_of(self, topic: str) -> tuple[str, str] | None:
        """(stream, command) of a command topic: command is "mute/set", "mute/minutes/set" or
        "event/mark"; None for any other topic."""
        parts = topic.split("/")
        base = f"{self.prefix}/{self.node}".split("/")
        if len(parts) < len(base) + 3 or parts[: len(base)] != base:
            return None
        command = "/".join(parts[len(base) + 1 :])
        if command not in COMMANDS:
            return None
        return parts[len(base)], command


COMMANDS = ("mute/set", "mute/minutes/set", "event/mark")


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    qos: int
    retain: bool
    kind: str  # event | state | source | score | mute | discovery: the outbox drops scores first, events last
    event_id: str | None = None


@dataclass(frozen=True)
class ClipRef:
    """Where an event's clip is written (complete post_roll_seconds after the end), and its URL."""

    file: str
    url: str | None = None


def event_messages(
    topics: Topics, event: AnomalyEvent, replayed: bool = False, clip: ClipRef | None = None
) -> list[Message]:
    """The event message, and the same as the stream's retained `last_event`."""
    payload = json.dumps({
        **event.shared_fields(),
        "type": event.type,
        "reason": event.reason or None,
        "clip": clip.file if clip is not None else None,
        "clip_url": clip.url if clip is not None else None,
        "sent_at": iso(event.at),
        "replayed": replayed,
    })  # fmt: skip
    return [
        Message(topics.stream(event.stream, "event"), payload, 1, False, "event", event.event_id),
        # Only the newest matters: superseded like a state, and like one restated first when online.
        Message(topics.stream(event.stream, "last_event"), payload, 1, True, "state"),
    ]


def state_message(topics: Topics, event: AnomalyEvent) -> Message:
    return on_off_message(topics, event.stream, event.type != "end")


def on_off_message(topics: Topics, stream: str, on: bool) -> Message:
    return Message(topics.stream(stream, "state"), "ON" if on else "OFF", 1, True, "state")


def source_message(topics: Topics, status: SourceStatus) -> Message:
    payload = {
        "stream": status.stream,
        "state": status.state.value,
        "detail": status.detail,
        "at": iso(status.at),
    }
    return Message(topics.stream(status.stream, "source"), json.dumps(payload), 1, True, "source")


def score_message(topics: Topics, report: ScoreReport) -> Message:
    payload = {
        "stream": report.stream,
        "score": report.score,
        "threshold": report.threshold,
        "anomalous": report.score > report.threshold,
        "lag_seconds": round(report.lag_seconds, 3),
        "at": iso(report.at),
    }
    return Message(topics.stream(report.stream, "score"), json.dumps(payload), 0, False, "score")


MUTE_REASONS = ("command", "expired", "restored")  # why the mute state is what it is


def mute_message(
    topics: Topics,
    stream: str,
    until: dt.datetime | None,
    at: dt.datetime,
    *,
    minutes: float | None = None,
    reason: str = "command",
    refused: str = "",
) -> Message:
    """The mute state (and the stream's mute duration, where known); `refused` (the short reason) when
    it answers a command that changed nothing."""
    assert reason in MUTE_REASONS
    payload = json.dumps(
        {"stream": stream, "muted": until is not None, "until": iso(until), "minutes": minutes,
         "at": iso(at), "reason": reason, "refused": refused or None}
    )  # fmt: skip
    return Message(topics.stream(stream, "mute"), payload, 1, True, "mute")


def marked_message(
    topics: Topics,
    stream: str,
    event_id: str,
    at: dt.datetime,
    *,
    marked_at: str | None = None,
    normal_clip: str | None = None,
    already: bool = False,
    refused: str = "",
) -> Message:
    """The answer to an `event/mark` command: marked (or marked before), or refused with the reason."""
    payload = {
        "stream": stream, "event_id": event_id, "marked": not refused, "already": already,
        "marked_normal_at": marked_at, "normal_clip": normal_clip, "refused": refused or None, "at": iso(at),
    }  # fmt: skip
    # Dropped and kept like mute answers (a command's acknowledgement), never superseded.
    return Message(topics.stream(stream, "marked"), json.dumps(payload), 1, False, "mute")


def as_replayed(payload: str) -> str:
    """The same event message, flagged as sent late (after an outage or a restart)."""
    data = json.loads(payload)
    data["replayed"] = True
    return json.dumps(data)
