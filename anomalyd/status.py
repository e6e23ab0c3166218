"""What the daemon says about itself: one snapshot, read by systemd's STATUS line, the log and MQTT.

The main thread takes a snapshot every tick from the pipeline's streams (read-only: the worker owns
them), notices streams whose scores trail their audio by more than `inference.max_lag_seconds`, and
renders the snapshot as the STATUS summary and as the node's retained diagnostics message.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from anomalyd.records import iso
from anomalyd.store import StoreStatus
from anomalyd.stream import StreamRuntime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamView:
    name: str
    source: str  # ok / silent / clipping / lost / ended / invalid / unknown (not yet opened)
    event_open: bool
    lag_seconds: float | None  # None while nothing is captured
    lagging: bool


@dataclass(frozen=True)
class Snapshot:
    at: dt.datetime
    streams: tuple[StreamView, ...]
    windows_scored: int
    blocks_dropped: int
    max_lag_seconds: float
    storage: StoreStatus
    events_today: int = 0  # events started since local midnight
    outbox_backlog: int = 0  # MQTT messages not yet acknowledged by the broker
    mqtt: str | None = None  # link state, None without MQTT
    mqtt_detail: str = ""  # the last connection failure while not connected

    @property
    def lagging(self) -> list[StreamView]:
        return [s for s in self.streams if s.lagging]


def stream_view(runtime: StreamRuntime, now: dt.datetime, max_lag_seconds: float) -> StreamView:
    """What a stream's runtime says about it now (read-only: the worker owns it)."""
    lag = runtime.lag_seconds(now)
    state = runtime.health.state
    return StreamView(
        name=runtime.name,
        source=state.value if state is not None else "unknown",
        event_open=runtime.event_open,
        lag_seconds=lag,
        lagging=lag is not None and lag > max_lag_seconds,
    )


def take_snapshot(
    runtimes: list[StreamRuntime],
    *,
    now: dt.datetime,
    max_lag_seconds: float,
    windows_scored: int,
    blocks_dropped: int,
    storage: StoreStatus,
    mqtt: str | None,
    mqtt_detail: str = "",
    events_today: int = 0,
    outbox_backlog: int = 0,
) -> Snapshot:
    views = [stream_view(runtime, now, max_lag_seconds) for runtime in runtimes]
    return Snapshot(
        now, tuple(views), windows_scored, blocks_dropped, max_lag_seconds, storage, events_today,
        outbox_backlog, mqtt, mqtt_detail,
    )  # fmt: skip


def stalled(beats: dict[str, float], now: float, stale_seconds: float) -> list[str]:
    """The watched threads that have shown no progress for `stale_seconds` (monotonic times): while any
    has, the watchdog is not pinged and /healthz says so."""
    return [name for name, beat in beats.items() if now - beat >= stale_seconds]


def outbox_backlog(database: Path) -> int:
    """MQTT messages waiting in the outbox table (0 when it cannot be read now)."""
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def summary(snapshot: Snapshot) -> str:
    """systemd's STATUS= line: short, but everything an operator checks first."""
    states = Counter(s.source for s in snapshot.streams)
    health = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    open_events = sum(s.event_open for s in snapshot.streams)
    parts = [f"{len(snapshot.streams)} stream(s): {health}", f"{open_events} open event(s)"]
    lagging = snapshot.lagging
    if lagging:
        worst = max(s.lag_seconds or 0.0 for s in lagging)
        parts.append(f"{len(lagging)} lagging (up to {worst:.1f} s behind)")
    if snapshot.storage.state != "ok":
        parts.append(f"event log {snapshot.storage.state}: {snapshot.storage.detail}")
    if snapshot.mqtt is not None:
        failing = snapshot.mqtt != "connected" and snapshot.mqtt_detail
        parts.append(f"MQTT {snapshot.mqtt}" + (f" ({snapshot.mqtt_detail})" if failing else ""))
    if snapshot.blocks_dropped:
        parts.append(f"{snapshot.blocks_dropped} audio blocks dropped")
    parts.append(f"{snapshot.windows_scored} windows scored")
    return "; ".join(parts)


def diagnostics_payload(snapshot: Snapshot, node: str) -> dict[str, object]:
    """The node's retained diagnostics message (schemas/diagnostics.json), without its time stamp."""
    return {
        "node": node,
        "mqtt": snapshot.mqtt,
        "storage": snapshot.storage.as_dict(),
        "blocks_dropped": snapshot.blocks_dropped,
        "outbox_backlog": snapshot.outbox_backlog + snapshot.storage.messages_pending,
        "events_today": snapshot.events_today,
        "streams_unhealthy": sum(s.source != "ok" or s.lagging for s in snapshot.streams),
        "lag_seconds": max(
            (round(s.lag_seconds, 1) for s in snapshot.streams if s.lag_seconds is not None), default=None
        ),
        "max_lag_seconds": snapshot.max_lag_seconds,
        "streams": {
            s.name: {
                "source": s.source,
                "event_open": s.event_open,
                "lag_seconds": None if s.lag_seconds is None else round(s.lag_seconds, 1),
                "lagging": s.lagging,
            }
            for s in snapshot.streams
        },
    }


def stamped(payload: dict[str, object], at: dt.datetime) -> str:
    return json.dumps({**payload, "at": iso(at)})


class LagWatch:
    """Logs a warning when a stream starts lagging, and when it has caught up again."""

    def __init__(self) -> None:
        self._lagging: set[str] = set()

    def update(self, snapshot: Snapshot) -> None:
        now_lagging = {s.name: s for s in snapshot.lagging}
        for name, view in now_lagging.items():
            if name not in self._lagging:
                logger.warning(
                    "stream %s: scores trail the audio by %.1f s (limit %.1f s): the box cannot keep up",
                    name, view.lag_seconds or 0.0, snapshot.max_lag_seconds,
                )  # fmt: skip
        for name in self._lagging - set(now_lagging):
            logger.info("stream %s: caught up (lag below %.1f s)", name, snapshot.max_lag_seconds)
        self._lagging = set(now_lagging)
