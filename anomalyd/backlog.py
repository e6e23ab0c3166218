"""Rows of the event log as typed writes, and the bounded backlog that keeps them in memory while the
database cannot be written (a full disk, an I/O error, another process's write lock).

Writes of one event coalesce (its row holds only its latest state), so the backlog grows with the
number of events, not of messages. When it is full, source status rows go first, events last.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from anomalyd.mutes import save_minutes, save_mute
from anomalyd.records import AnomalyEvent, SourceStatus, iso

BACKLOG_ROWS = 10_000  # rows kept in memory while the event log cannot be written


@dataclass(frozen=True)
class EventRow:
    event: AnomalyEvent
    published: bool  # its start went out over MQTT (so its end must)


@dataclass(frozen=True)
class StatusRow:
    status: SourceStatus


@dataclass(frozen=True)
class MuteRow:
    stream: str
    until: dt.datetime | None  # None: the mute ended
    at: dt.datetime


@dataclass(frozen=True)
class ClipRow:
    event_id: str
    path: str
    event_offset: float = 0.0  # seconds from the clip's start to the event's


@dataclass(frozen=True)
class MinutesRow:
    stream: str
    minutes: float  # the stream's mute duration, set at run time
    at: dt.datetime


@dataclass(frozen=True)
class DiscoveryRow:
    """Home Assistant discovery topics now published, and those just cleared."""

    published: tuple[str, ...]
    cleared: tuple[str, ...]
    at: dt.datetime


Row = EventRow | StatusRow | MuteRow | ClipRow | MinutesRow | DiscoveryRow
DROP_ORDER: tuple[type[Row], ...] = (StatusRow, ClipRow, DiscoveryRow, MinutesRow, MuteRow, EventRow)

_EVENT_COLUMNS = (
    "event_id", "node", "stream", "state", "started_at", "ended_at", "start_sample", "end_sample",
    "score", "peak_score", "mean_score", "threshold", "mean", "std", "k", "model_id", "windows",
    "windows_over", "end_reason", "updated_at", "published", "scores",
)  # fmt: skip
# A message without scores (an `end` made for an event a crash left open) keeps those already written.
_UPSERT_EVENT = (
    f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(_EVENT_COLUMNS))}) "
    "ON CONFLICT(event_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _EVENT_COLUMNS if c not in ("event_id", "scores"))
    + ", scores = coalesce(excluded.scores, scores)"
)


def event_row(event: AnomalyEvent, published: bool) -> dict[str, Any]:
    return {
        **event.shared_fields(),
        "state": "closed" if event.type == "end" else "open",
        "start_sample": event.start_sample,
        "end_sample": event.end_sample,
        "end_reason": event.reason or None,
        "updated_at": iso(event.at),
        "published": int(published),
        "scores": json.dumps(event.scores, separators=(",", ":")) if event.scores else None,
    }


def apply_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Write rows inside the caller's transaction."""
    for row in rows:
        if isinstance(row, EventRow):
            values = event_row(row.event, row.published)
            conn.execute(_UPSERT_EVENT, [values[c] for c in _EVENT_COLUMNS])
        elif isinstance(row, StatusRow):
            s = row.status
            conn.execute(
                "INSERT INTO source_status (node, stream, state, detail, at) VALUES (?, ?, ?, ?, ?)",
                [s.node, s.stream, s.state.value, s.detail, iso(s.at)],
            )
        elif isinstance(row, MuteRow):
            save_mute(conn, row.stream, row.until, row.at)
        elif isinstance(row, MinutesRow):
            save_minutes(conn, row.stream, row.minutes, row.at)
        elif isinstance(row, DiscoveryRow):
            _save_discovery(conn, row)
        else:
            conn.execute(
                "UPDATE events SET clip_path = ?, clip_offset = ? WHERE event_id = ?",
                [row.path, row.event_offset, row.event_id],
            )


def _save_discovery(conn: sqlite3.Connection, row: DiscoveryRow) -> None:
    conn.executemany("DELETE FROM discovery WHERE topic = ?", [(t,) for t in row.cleared])
    conn.executemany(
        "INSERT INTO discovery (topic, published_at) VALUES (?, ?) ON CONFLICT(topic) DO NOTHING",
        [(t, iso(row.at)) for t in row.published],
    )
    # A config wanted again must not be cleared by a clearing message still waiting from before.
    conn.executemany(
        "DELETE FROM outbox WHERE topic = ? AND kind = 'discovery' AND payload = ''",
        [(t,) for t in row.published],
    )


def _key(row: Row, seq: int) -> tuple[str, str]:
    if isinstance(row, EventRow):
        return ("event", row.event.event_id)
    if isinstance(row, MuteRow):
        return ("mute", row.stream)
    if isinstance(row, ClipRow):
        return ("clip", row.event_id)
    if isinstance(row, MinutesRow):
        return ("minutes", row.stream)
    return ("status", str(seq))


class Backlog:
    """Rows waiting for the database, oldest first; owned by the writer thread."""

    def __init__(self, limit: int = BACKLOG_ROWS) -> None:
        self.limit = limit
        self._rows: OrderedDict[tuple[str, str], Row] = OrderedDict()
        self._seq = 0
        self.dropped: dict[str, int] = {kind.__name__: 0 for kind in DROP_ORDER}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: list[Row]) -> None:
        for row in rows:
            self._seq += 1
            key = _key(row, self._seq)
            self._rows.pop(key, None)  # a newer write of the same row replaces the older one
            self._rows[key] = row
        self._bound()

    def _bound(self) -> None:
        excess = len(self._rows) - self.limit
        for kind in DROP_ORDER:
            if excess <= 0:
                return
            doomed = [key for key, row in self._rows.items() if isinstance(row, kind)][:excess]
            for key in doomed:
                del self._rows[key]
            self.dropped[kind.__name__] += len(doomed)
            excess -= len(doomed)

    def head(self, count: int) -> list[Row]:
        return [row for _, row in zip(range(count), self._rows.values(), strict=False)]

    def drop_head(self, count: int) -> None:
        for key in list(self._rows)[:count]:
            del self._rows[key]

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())
