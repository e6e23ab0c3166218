"""The event log as the dashboard reads it: filtered lists, one event with its scores, CSV.

Read-only connections of their own (WAL: they never block the store's writer, nor it them). Filters
come from query strings and are checked strictly: a bad one is a ValueError whose message names it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyd.database import EVENT_COLUMNS, SCHEMA_VERSION
from anomalyd.errors import AnomalydError
from anomalyd.eventlog import parse_since
from anomalyd.marks import parse_event_id
from anomalyd.records import iso

DEFAULT_LIMIT = 200
MAX_LIMIT = 5000
MAX_CSV_ROWS = 100_000  # the event log's default size: an export is the whole log at most
LIST_COLUMNS = (*EVENT_COLUMNS, "clip_offset")
ONE_COLUMNS = (*LIST_COLUMNS, "score", "mean", "std", "k", "start_sample", "end_sample", "scores")


@dataclass(frozen=True)
class EventFilter:
    stream: str | None = None
    since: dt.datetime | None = None
    state: str | None = None  # open | closed
    marked: bool | None = None  # marked a false alarm, or not
    limit: int = DEFAULT_LIMIT

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.stream is not None:
            clauses.append("stream = ?")
            params.append(self.stream)
        if self.since is not None:
            clauses.append("(started_at >= ? OR ended_at IS NULL OR ended_at >= ?)")
            params += [iso(self.since), iso(self.since)]
        if self.state is not None:
            clauses.append("state = ?")
            params.append(self.state)
        if self.marked is not None:
            clauses.append("marked_normal_at IS NOT NULL" if self.marked else "marked_normal_at IS NULL")
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


_CHOICES = {"state": ("open", "closed"), "marked": ("yes", "no")}


def parse_filter(query: Mapping[str, str], max_limit: int = MAX_LIMIT) -> EventFilter:
    """An EventFilter from query parameters (`stream`, `since`, `state`, `marked`, `limit`); empty values
    mean "any". Raises ValueError naming the parameter and what it allows."""
    unknown = sorted(set(query) - {"stream", "since", "state", "marked", "limit"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; allowed: stream, since, state, marked, limit")
    values = {key: query.get(key, "").strip() for key in ("stream", "since", "state", "marked", "limit")}
    for key, allowed in _CHOICES.items():
        if values[key] and values[key] not in allowed:
            raise ValueError(f"{key}={values[key][:40]!r}: expected {' or '.join(allowed)}")
    since = None
    if values["since"] and values["since"] != "all":
        try:
            since = parse_since(values["since"])
        except AnomalydError as exc:
            raise ValueError(str(exc).replace("--since", "since")) from exc
    limit = DEFAULT_LIMIT
    if values["limit"]:
        if not values["limit"].isdigit() or not 1 <= int(values["limit"]) <= max_limit:
            raise ValueError(f"limit={values['limit'][:40]!r}: expected 1 to {max_limit}")
        limit = int(values["limit"])
    return EventFilter(
        stream=values["stream"] or None,
        since=since,
        state=values["state"] or None,
        marked={"yes": True, "no": False}.get(values["marked"]),
        limit=limit,
    )


def _connect(path: Path) -> sqlite3.Connection | None:
    """A read-only connection, or None while there is no event log (or an older schema) yet."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    conn.row_factory = sqlite3.Row
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:  # a daemon migrating it right now, or one newer than this code
        conn.close()
        return None
    return conn


def _duration(row: dict[str, Any]) -> float | None:
    if not row.get("ended_at"):
        return None
    started = dt.datetime.fromisoformat(row["started_at"])
    return round((dt.datetime.fromisoformat(row["ended_at"]) - started).total_seconds(), 3)


def _shaped(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["duration_seconds"] = _duration(out)
    out["has_clip"] = bool(out.get("clip_path"))
    return out


def list_events(path: Path, where: EventFilter) -> tuple[list[dict[str, Any]], int]:
    """(the newest `where.limit` matching events, newest first; how many match in all)."""
    conn = _connect(path)
    if conn is None:
        return [], 0
    clause, params = where.where()
    try:
        total = int(conn.execute(f"SELECT count(*) FROM events {clause}", params).fetchone()[0])
        rows = conn.execute(
            f"SELECT {', '.join(LIST_COLUMNS)} FROM events {clause} ORDER BY started_at DESC, event_id "
            "LIMIT ?",
            [*params, where.limit],
        ).fetchall()
    finally:
        conn.close()
    return [_shaped(row) for row in rows], total


def get_event(path: Path, event_id: str) -> dict[str, Any] | None:
    """One event by its id (or a unique prefix of 8+ hex digits), its window scores parsed; None: no such
    event. Raises ValueError for something that is not an event id."""
    try:
        wanted = parse_event_id(event_id)
    except AnomalydError as exc:
        raise ValueError(f"{event_id[:40]!r}: {exc}") from exc
    conn = _connect(path)
    if conn is None:
        return None
    try:
        rows = conn.execute(
            f"SELECT {', '.join(ONE_COLUMNS)} FROM events WHERE event_id >= ? AND event_id < ? LIMIT 2",
            [wanted, wanted + "g"],  # 'g' sorts after every hex digit: a prefix range
        ).fetchall()
    finally:
        conn.close()
    if len(rows) != 1:
        return None
    event = _shaped(rows[0])
    try:
        event["scores"] = json.loads(event["scores"]) if event["scores"] else []
    except ValueError:
        event["scores"] = []
    return event


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The columns of `anomalyd events --format csv`, oldest first as there."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(EVENT_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(reversed(rows))
    return out.getvalue()
