"""The MQTT contract: topics and payloads (public API; field names are frozen once released).

    <prefix>/<node>/status             retained  "online" | "offline" (the offline one is the Last Will)
    <prefix>/<node>/diagnostics        retained  JSON: storage, MQTT backlog and per-stream lag (on change)
    <prefix>/<node>/<stream>/state     retained  "ON" while an anomaly event is open, else "OFF"
    <prefix>/<node>/<stream>/event     QoS 1     JSON: start / update / end of an event (schemas/event.json)
    <prefix>/<node>/<stream>/score     QoS 0     JSON: the latest window score, periodically
    <prefix>/<node>/<stream>/source    retained  JSON: source health (ok / silent / clipping / lost / ended)
    <prefix>/<node>/<stream>/mute/set  command   seconds to mute the stream's new alerts (0 to 604800, plain
                                                 decimal); 0 or "off" unmutes; anything else is refused
    <prefix>/<node>/<stream>/mute      retained  JSON: the mute state, acknowledging each command (also a
                                                 refused one) and each mute's expiry
    <prefix>/<node>/<stream>/event/mark  command   an event id: that event was a false alarm (its clip
                                                 joins the stream's normal audio)
    <prefix>/<node>/<stream>/marked    QoS 1     JSON: the answer to each mark command (schemas/marked.json)

Every JSON payload has a JSON Schema in anomalyd/schemas/; tests validate published messages against them.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from anomalyd import __version__
from anomalyd.records import AnomalyEvent, ScoreReport, SourceState, SourceStatus, iso

SCHEMA_NAMES = ("event", "score", "source", "mute", "state", "status", "diagnostics", "marked")


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
    def mark_commands(self) -> str:
        return f"{self.prefix}/{self.node}/+/event/mark"

    def stream_of_mark(self, topic: str) -> str | None:
        """The stream of an `event/mark` command topic; None for any other topic."""
        parts = topic.split("/")
        base = f"{self.prefix}/{self.node}".split("/")
        if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[-2:] != ["event", "mark"]:
            return None
        return parts[len(base)]

    def stream_of_command(self, topic: str) -> str | None:
        parts = topic.split("/")
        base = f"{self.prefix}/{self.node}".split("/")
        if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[-2:] != ["mute", "set"]:
            return None
        return parts[len(base)]


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    qos: int
    retain: bool
    kind: str  # event | state | source | score | mute | discovery: the outbox drops scores first, events last
    event_id: str | None = None


def event_message(topics: Topics, event: AnomalyEvent, replayed: bool = False) -> Message:
    payload = {
        **event.shared_fields(),
        "type": event.type,
        "reason": event.reason or None,
        "sent_at": iso(event.at),
        "replayed": replayed,
    }
    return Message(
        topics.stream(event.stream, "event"), json.dumps(payload), 1, False, "event", event.event_id
    )


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


def mute_payload(
    stream: str, until: dt.datetime | None, at: dt.datetime, reason: str = "command", refused: str = ""
) -> str:
    """The mute state; `refused` (the short reason) when it answers a command that changed nothing."""
    assert reason in MUTE_REASONS
    return json.dumps(
        {"stream": stream, "muted": until is not None, "until": iso(until), "at": iso(at),
         "reason": reason, "refused": refused or None}
    )  # fmt: skip


def mute_message(
    topics: Topics,
    stream: str,
    until: dt.datetime | None,
    at: dt.datetime,
    *,
    reason: str = "command",
    refused: str = "",
) -> Message:
    payload = mute_payload(stream, until, at, reason, refused)
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


def discovery_messages(topics: Topics, streams: list[str], discovery_prefix: str) -> list[Message]:
    """Home Assistant MQTT discovery: one device per node; per stream a problem sensor, score, source."""
    device = {
        "identifiers": [f"anomalyd_{topics.node}"],
        "name": f"anomalyd {topics.node}",
        "manufacturer": "anomalyd",
        "model": "audio anomaly monitor",
        "sw_version": __version__,
    }
    availability = {"availability_topic": topics.status, "payload_available": "online",
                    "payload_not_available": "offline"}  # fmt: skip
    out = []
    for stream in streams:
        uid = f"anomalyd_{topics.node}_{stream}".replace("-", "_")
        configs: dict[str, dict[str, Any]] = {
            f"binary_sensor/{uid}_anomaly": {
                "name": f"{stream} anomaly",
                "state_topic": topics.stream(stream, "state"),
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "problem",
            },
            f"sensor/{uid}_score": {
                "name": f"{stream} anomaly score",
                "state_topic": topics.stream(stream, "score"),
                "value_template": "{{ value_json.score }}",
                "state_class": "measurement",
            },
            f"sensor/{uid}_source": {
                "name": f"{stream} microphone",
                "state_topic": topics.stream(stream, "source"),
                "value_template": "{{ value_json.state }}",
                "device_class": "enum",
                "options": [s.value for s in SourceState],
            },
        }
        for path, config in configs.items():
            unique_id = path.split("/", 1)[1]
            body = {
                **config,
                **availability,
                "unique_id": unique_id,
                "object_id": unique_id,
                "device": device,
            }
            out.append(Message(f"{discovery_prefix}/{path}/config", json.dumps(body), 1, True, "discovery"))
    return out
