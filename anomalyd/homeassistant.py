"""Home Assistant MQTT discovery: what a Home Assistant subscribed to the broker shows of this node.

One device for the node (its diagnostics) and one per stream, i.e. per machine, linked to the node's
with `via_device`. Entity ids are fixed by `default_entity_id` (Home Assistant >= 2025.10) and
`object_id` (older releases, which drop the newer key): both equal the unique id, which never changes,
so an installation keeps its entities' history across anomalyd and Home Assistant upgrades.

Every key used here is one Home Assistant documents for its platform; tests/test_homeassistant.py pins
them. Which discovery topics were published is remembered in the event log, so that a stream removed
from the config has its configs cleared (empty retained payloads) at the next reload or start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from anomalyd import __version__
from anomalyd.contract import Message, Topics
from anomalyd.mutes import MAX_MUTE_MINUTES
from anomalyd.records import SourceState

AVAILABLE, NOT_AVAILABLE = "online", "offline"
ORIGIN = {"name": "anomalyd", "sw_version": __version__}
# Jinja for Home Assistant, rendered against each message's JSON.
_SCORE_ATTRIBUTES = (
    "{{ {'threshold': value_json.threshold, 'anomalous': value_json.anomalous, "
    "'lag_seconds': value_json.lag_seconds, 'at': value_json.at} | to_json }}"
)
_EVENT = (
    "{{ {'event_type': value_json.type, 'event_id': value_json.event_id, "
    "'started_at': value_json.started_at, 'ended_at': value_json.ended_at, "
    "'peak_score': value_json.peak_score, 'threshold': value_json.threshold, "
    "'reason': value_json.reason, 'clip': value_json.clip, 'clip_url': value_json.clip_url, "
    "'replayed': value_json.replayed} | to_json }}"
)
_MUTE_ATTRIBUTES = (
    "{{ {'until': value_json.until, 'minutes': value_json.minutes, 'reason': value_json.reason, "
    "'refused': value_json.refused} | to_json }}"
)


@dataclass(frozen=True)
class HaStream:
    """What discovery says about one stream (machine)."""

    name: str
    model_id: str
    area: str = ""


def _ident(*parts: str) -> str:
    # Unique ids as anomalyd has always made them: '-' became '_' (Home Assistant entity ids cannot hold it).
    return "_".join(("anomalyd", *parts)).replace("-", "_")


def node_device_id(node: str) -> str:
    return f"anomalyd_{node}"


def _node_entities(topics: Topics) -> dict[str, dict[str, Any]]:
    diagnostics = topics.diagnostics
    base = _ident(topics.node)
    common = {"state_topic": diagnostics, "entity_category": "diagnostic"}
    return {
        f"binary_sensor/{base}_broker": {
            **common,
            "name": "Broker",
            "device_class": "connectivity",
            "value_template": "{{ 'ON' if value_json.mqtt == 'connected' else 'OFF' }}",
        },
        f"binary_sensor/{base}_event_log": {
            **common,
            "name": "Event log",
            "device_class": "problem",
            "value_template": "{{ 'OFF' if value_json.storage.state == 'ok' else 'ON' }}",
            "json_attributes_topic": diagnostics,
            "json_attributes_template": "{{ value_json.storage | to_json }}",
        },
        f"sensor/{base}_outbox": {
            **common,
            "name": "Outbox backlog",
            "value_template": "{{ value_json.outbox_backlog }}",
            "unit_of_measurement": "messages",
            "state_class": "measurement",
            "icon": "mdi:tray-full",
        },
        f"sensor/{base}_events_today": {
            **common,
            "name": "Events today",
            "value_template": "{{ value_json.events_today }}",
            "state_class": "total_increasing",
            "icon": "mdi:alert-circle-outline",
        },
        f"sensor/{base}_unhealthy": {
            **common,
            "name": "Streams needing attention",
            "value_template": "{{ value_json.streams_unhealthy }}",
            "state_class": "measurement",
            "icon": "mdi:microphone-off",
            "json_attributes_topic": diagnostics,
            "json_attributes_template": "{{ value_json.streams | to_json }}",
        },
    }


def _stream_entities(topics: Topics, stream: str) -> dict[str, dict[str, Any]]:
    base = _ident(topics.node, stream)
    score = topics.stream(stream, "score")
    mute = topics.stream(stream, "mute")
    return {
        f"binary_sensor/{base}_anomaly": {
            "name": "Anomaly",
            "state_topic": topics.stream(stream, "state"),
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "problem",
            "json_attributes_topic": topics.stream(stream, "last_event"),
        },
        f"sensor/{base}_score": {
            "name": "Anomaly score",
            "state_topic": score,
            "value_template": "{{ value_json.score }}",
            "state_class": "measurement",
            "suggested_display_precision": 3,
            "icon": "mdi:waveform",
            "json_attributes_topic": score,
            "json_attributes_template": _SCORE_ATTRIBUTES,
        },
        f"event/{base}_event": {
            "name": "Anomaly event",
            "state_topic": topics.stream(stream, "event"),
            "event_types": ["start", "update", "end"],
            "value_template": _EVENT,
            "icon": "mdi:alert-decagram",
        },
        f"switch/{base}_mute": {
            "name": "Mute",
            "entity_category": "config",
            "command_topic": topics.stream(stream, "mute/set"),
            "payload_on": "on",
            "payload_off": "off",
            "state_topic": mute,
            "value_template": "{{ 'ON' if value_json.muted else 'OFF' }}",
            "state_on": "ON",
            "state_off": "OFF",
            "icon": "mdi:bell-off",
            "json_attributes_topic": mute,
            "json_attributes_template": _MUTE_ATTRIBUTES,
        },
        f"number/{base}_mute_minutes": {
            "name": "Mute duration",
            "entity_category": "config",
            "command_topic": topics.stream(stream, "mute/minutes/set"),
            "state_topic": mute,
            "value_template": "{{ value_json.minutes }}",
            "min": 1,
            "max": MAX_MUTE_MINUTES,
            "step": 1,
            "mode": "box",
            "unit_of_measurement": "min",
            "device_class": "duration",
            "icon": "mdi:timer-outline",
        },
        f"sensor/{base}_source": {
            "name": "Microphone",
            "entity_category": "diagnostic",
            "state_topic": topics.stream(stream, "source"),
            "value_template": "{{ value_json.state }}",
            "device_class": "enum",
            "options": [s.value for s in SourceState],
            "json_attributes_topic": topics.stream(stream, "source"),
            "json_attributes_template": "{{ {'detail': value_json.detail, 'at': value_json.at} | to_json }}",
        },
        f"sensor/{base}_lag": {
            "name": "Lag",
            "entity_category": "diagnostic",
            "state_topic": score,
            "value_template": "{{ value_json.lag_seconds }}",
            "device_class": "duration",
            "unit_of_measurement": "s",
            "state_class": "measurement",
            "suggested_display_precision": 1,
        },
    }


def discovery_messages(topics: Topics, streams: list[HaStream], discovery_prefix: str) -> list[Message]:
    """Retained discovery configs: the node's device and entities, then one device per stream."""
    node_id = node_device_id(topics.node)
    node_device = {
        "identifiers": [node_id],
        "name": f"anomalyd {topics.node}",
        "manufacturer": "anomalyd",
        "model": "audio anomaly monitor",
        "sw_version": __version__,
    }
    groups: list[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = [(node_device, _node_entities(topics))]
    for stream in streams:
        device = {
            "identifiers": [f"{node_id}_{stream.name}"],
            "name": stream.name,
            "manufacturer": "anomalyd",
            "model": "machine sound monitor",
            "model_id": stream.model_id,
            "sw_version": __version__,
            "via_device": node_id,
        }
        if not stream.model_id:
            del device["model_id"]
        if stream.area:
            device["suggested_area"] = stream.area
        groups.append((device, _stream_entities(topics, stream.name)))
    out = []
    for device, entities in groups:
        for path, config in entities.items():
            component, unique_id = path.split("/", 1)
            body = {
                **config,
                "unique_id": unique_id,
                "object_id": unique_id,  # Home Assistant before 2025.10
                "default_entity_id": f"{component}.{unique_id}",
                "availability_topic": topics.status,
                "payload_available": AVAILABLE,
                "payload_not_available": NOT_AVAILABLE,
                "device": device,
                "origin": ORIGIN,
            }
            topic = f"{discovery_prefix}/{path}/config"
            out.append(Message(topic, json.dumps(body), 1, True, "discovery"))
    return out


def clearing_messages(topics: list[str]) -> list[Message]:
    """Empty retained payloads: Home Assistant removes those entities (and a device left without any)."""
    return [Message(topic, "", 1, True, "discovery") for topic in topics]
