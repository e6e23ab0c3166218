"""The event database file: schema and migrations, opening it, transactions, the WAL's size, readers.

Only the store's writer thread writes; readers (`anomalyd events`, dashboards, backups, the MQTT
publisher) open their own connections and, thanks to WAL, never block it. The schema version lives in
`PRAGMA user_version` and `MIGRATIONS[i]` brings a database from version i to i + 1, each step in one
transaction. A database from a newer anomalyd is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from anomalyd.errors import StoreError
from anomalyd.records import iso

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0  # at start, wait this long for another process's write lock
BUSY_TIMEOUT_MS = 500  # then: a locked write fails fast and is retried from memory (the writer stays live)
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file keeps after a checkpoint resets it


def _v1(db: sqlite_utils.Database) -> None:
    db["events"].create(  # type: ignore[union-attr]
        {
            "event_id": str, "node": str, "stream": str, "state": str,
            "started_at": str, "ended_at": str, "start_sample": int, "end_sample": int,
            "score": float, "peak_score": float, "mean_score": float, "threshold": float,
            "mean": float, "std": float, "k": float, "model_id": str,
            "windows": int, "windows_over": int, "end_reason": str, "clip_path": str, "updated_at": str,
        },
        pk="event_id",
        not_null={"node", "stream", "state", "started_at", "updated_at"},
    )  # fmt: skip
    db["events"].create_index(["started_at"])  # type: ignore[union-attr]
    db["events"].create_index(["stream", "started_at"])  # type: ignore[union-attr]
    db["source_status"].create(  # type: ignore[union-attr]
        {"id": int, "node": str, "stream": str, "state": str, "detail": str, "at": str},
        pk="id",
        not_null={"node", "stream", "state", "at"},
    )
    db["source_status"].create_index(["at"])  # type: ignore[union-attr]


def _v2(db: sqlite_utils.Database) -> None:
    """The MQTT outbox: messages wait here, in order, until the broker acknowledges them."""
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL, "
        "event_id TEXT, created_at TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX outbox_kind ON outbox(kind, id)")
    db.execute("CREATE INDEX outbox_topic ON outbox(topic)")


def _v3(db: sqlite_utils.Database) -> None:
    """Whether each event's start went out over MQTT (so that its end always does), and the mutes.

    Rows from before have 1: mutes did not outlive a run then, and a start was published unless muted.
    """
    db.execute("ALTER TABLE events ADD COLUMN published INTEGER NOT NULL DEFAULT 1")
    db.execute("CREATE TABLE mutes (stream TEXT PRIMARY KEY, until TEXT NOT NULL, set_at TEXT NOT NULL)")


def _v4(db: sqlite_utils.Database) -> None:
    """False alarms: when an event was marked normal, the note, and the copy of its clip among the
    stream's normal audio (anomalyd/marks.py). Retention keeps marked events."""
    db.execute("ALTER TABLE events ADD COLUMN marked_normal_at TEXT")
    db.execute("ALTER TABLE events ADD COLUMN mark_note TEXT")
    db.execute("ALTER TABLE events ADD COLUMN normal_clip_path TEXT")


def _v5(db: sqlite_utils.Database) -> None:
    """Mute durations set at run time (Home Assistant's number), and the Home Assistant discovery
    topics published, so that those of streams removed from the config are cleared, after a restart too."""
    db.execute(
        "CREATE TABLE mute_minutes (stream TEXT PRIMARY KEY, minutes REAL NOT NULL, set_at TEXT NOT NULL)"
    )
    db.execute("CREATE TABLE discovery (topic TEXT PRIMARY KEY, published_at TEXT NOT NULL)")


def _v6(db: sqlite_utils.Database) -> None:
    """For the dashboard's event page: the event's window scores (JSON, [[seconds from its start, score],
    ...]) and where in its clip it starts (seconds from the clip's first sample)."""
    db.execute("ALTER TABLE events ADD COLUMN scores TEXT")
    db.execute("ALTER TABLE events ADD COLUMN clip_offset REAL")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
SCHEMA_VERSION = len(MIGRATIONS)


def describe(exc: BaseException, path: Path) -> str:
    """An SQLite or OS error in a few words, with the free space when the disk may be the cause."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if free < 16e6 or "full" in text or "I/O" in text:
            text += f"; {free / 1e6:.1f} MB free on {path.parent}"
    return text


def open_database(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the event database; WAL mode, autocommit connection.

    Every failure, a full disk included, is one StoreError naming the file and the cause.
    """
    conn: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(path), check_same_thread=False, timeout=OPEN_TIMEOUT_S, isolation_level=None
        )
        db = sqlite_utils.Database(conn)
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        db.enable_wal()
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: event database schema version {version} is newer than this anomalyd's "
                f"({SCHEMA_VERSION})"
            )
        for target in range(version, SCHEMA_VERSION):
            with db.atomic():
                MIGRATIONS[target](db)
                db.execute(f"PRAGMA user_version = {target + 1}")
            logger.info("%s: event database migrated to schema version %d", path, target + 1)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except (OSError, sqlite3.Error) as exc:
        if conn is not None:
            conn.close()
        raise StoreError(f"{path}: cannot open the event database: {describe(exc, path)}") from exc
    except StoreError:
        if conn is not None:
            conn.close()
        raise
    return db


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock at once (a reader-first transaction could not
    upgrade in WAL mode); rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def checkpoint(conn: sqlite3.Connection, wal: Path) -> bool:
    """Copy the WAL into the database without waiting for readers; when all of it got there and the
    WAL file has grown past its limit (a long reader held it), truncate it. True if it was complete."""
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    complete = not busy and frames == done
    size = wal.stat().st_size if wal.exists() else 0
    if complete and size > JOURNAL_SIZE_LIMIT:
        conn.execute("PRAGMA busy_timeout = 50")  # a reader that just began: try again next time
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return complete


EVENT_COLUMNS = (
    "event_id", "stream", "state", "started_at", "ended_at", "peak_score", "mean_score", "threshold",
    "windows_over", "windows", "end_reason", "model_id", "clip_path", "node", "updated_at",
    "marked_normal_at", "mark_note",
)  # fmt: skip


def read_events(
    path: Path, since: dt.datetime | None = None, stream: str | None = None, updated_after: str | None = None
) -> list[dict[str, Any]]:
    """Events, oldest first, from a database another process may be writing (WAL readers never block)."""
    if not path.is_file():
        raise StoreError(f"{path}: no event database (has the daemon run with this config?)")
    clauses, params = [], []
    if since is not None:
        clauses.append("(started_at >= ? OR ended_at IS NULL OR ended_at >= ?)")
        params += [iso(since), iso(since)]
    if stream is not None:
        clauses.append("stream = ?")
        params.append(stream)
    if updated_after is not None:
        clauses.append("updated_at >= ?")
        params.append(updated_after)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {version} is newer than this anomalyd's")
            # An older schema (a daemon migrating it right now, or not run since an upgrade): columns it
            # does not have yet read as NULL; before the events table exists there are no events.
            present = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
            if version == 0 or not present:
                return []
            columns = ", ".join(c if c in present else f"NULL AS {c}" for c in EVENT_COLUMNS)
            rows = conn.execute(
                f"SELECT {columns} FROM events {where} ORDER BY started_at, updated_at", params
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot read events ({exc})") from exc
    return [dict(row) for row in rows]
