"""The local event log: SQLite through sqlite-utils, WAL, one writer thread, versioned schema.

Only the writer thread writes; readers (`anomalyd events`, dashboards, backups) open their own
connections and, thanks to WAL, never block it. The schema version lives in `PRAGMA user_version` and
`MIGRATIONS[i]` brings a database from version i to i + 1, each step in one transaction. A database from a
newer anomalyd is refused rather than guessed at.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import sqlite_utils

from anomalyd.config import ClipsConfig, StorageConfig
from anomalyd.contract import (
    Message,
    Topics,
    alarm_state_message,
    event_message,
    score_message,
    source_message,
    state_message,
)
from anomalyd.errors import AnomalydError
from anomalyd.records import AlarmState, AnomalyEvent, ClipJob, ScoreReport, SourceStatus, iso, utc_now

logger = logging.getLogger(__name__)


class StoreError(AnomalydError):
    """The event database cannot be opened or is from an incompatible version."""


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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


def open_database(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the event database; WAL mode."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0)
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the event database ({exc})") from exc
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
    return db


def close_interrupted(db: sqlite_utils.Database) -> int:
    """Events left open by a crash are closed at their last known time, reason 'interrupted'."""
    with db.atomic():
        cursor = db.execute(
            "UPDATE events SET state = 'closed', ended_at = updated_at, end_reason = 'interrupted' "
            "WHERE state = 'open'"
        )
    return cursor.rowcount


def _event_row(event: AnomalyEvent) -> dict[str, Any]:
    return {
        **event.shared_fields(),
        "state": "closed" if event.type == "end" else "open",
        "start_sample": event.start_sample,
        "end_sample": event.end_sample,
        "end_reason": event.reason or None,
        "updated_at": iso(event.at),
    }


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class Delivered:
    """Outbox rows the broker has acknowledged."""

    ids: tuple[int, ...]


class Mutes:
    """Streams whose alerts are not published until a time (shared by the command handler and the writer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, dt.datetime] = {}

    def set(self, stream: str, until: dt.datetime | None) -> None:
        with self._lock:
            if until is None:
                self._until.pop(stream, None)
            else:
                self._until[stream] = until

    def until(self, stream: str, now: dt.datetime) -> dt.datetime | None:
        with self._lock:
            until = self._until.get(stream)
            return until if until is not None and until > now else None


# What the outbox gives up first when full; events only when nothing else is left.
DROP_ORDER = ("score", "source", "state", "discovery", "event")
# Kinds where only the newest undelivered message of a topic matters (retained state, latest score).
SUPERSEDED_KINDS = ("score", "source", "state")


class Outbox:
    """Turns what the writer records into MQTT messages, in the same transaction, within a bound."""

    def __init__(self, topics: Topics, max_messages: int, mutes: Mutes) -> None:
        self.topics = topics
        self.max_messages = max_messages
        self.mutes = mutes
        self.dropped: dict[str, int] = dict.fromkeys(DROP_ORDER, 0)
        self.muted = 0

    def messages(self, item: AnomalyEvent | SourceStatus | ScoreReport | AlarmState) -> list[Message]:
        if isinstance(item, SourceStatus):
            return [source_message(self.topics, item)]
        if isinstance(item, AlarmState):
            return [alarm_state_message(self.topics, item)]
        if self.mutes.until(item.stream, utc_now()) is not None:
            self.muted += 1
            return []  # logged locally, not published
        if isinstance(item, ScoreReport):
            return [score_message(self.topics, item)]
        out = [event_message(self.topics, item)]
        if item.type != "update":
            out.append(state_message(self.topics, item))
        return out

    def add(self, db: sqlite_utils.Database, messages: list[Message]) -> None:
        """Insert (inside the caller's transaction), replacing superseded messages of the same topic."""
        now = iso(utc_now())
        for m in messages:
            if m.kind in SUPERSEDED_KINDS:
                db.execute("DELETE FROM outbox WHERE topic = ? AND kind = ?", [m.topic, m.kind])
            db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, kind, event_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [m.topic, m.payload, m.qos, int(m.retain), m.kind, m.event_id, now],
            )
        if messages:
            self._bound(db)

    def _bound(self, db: sqlite_utils.Database) -> None:
        excess = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0]) - self.max_messages
        for kind in DROP_ORDER:
            if excess <= 0:
                return
            cursor = db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?)",
                [kind, excess],
            )
            if cursor.rowcount:
                self.dropped[kind] += cursor.rowcount
                excess -= cursor.rowcount
                logger.warning(
                    "MQTT outbox full (%d messages): dropped the %d oldest %s message(s); %s dropped so far",
                    self.max_messages, cursor.rowcount, kind, self.dropped[kind],
                )  # fmt: skip


Item = AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState | Delivered | _Stop

RETENTION_INTERVAL_S = 3600.0  # how often old rows and clips are pruned


class StoreWriter:
    """The one thread that writes the event log and the clips."""

    def __init__(self, config: StorageConfig, outbox: Outbox | None = None) -> None:
        self.config = config
        self.outbox = outbox
        self._queue: queue.Queue[Item] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.db = open_database(config.database)
        interrupted = close_interrupted(self.db)
        if interrupted:
            logger.warning(
                "closed %d event(s) left open by an earlier run (reason 'interrupted')", interrupted
            )
        self.heartbeat = time.monotonic()
        self.written = 0

    def start(self) -> None:
        self._thread.start()

    def put(self, item: AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState | Delivered) -> None:
        self._queue.put(item)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def stop(self, timeout: float) -> None:
        """Write everything queued, then close the database."""
        if not self._thread.is_alive():
            self.db.close()
            return
        self._queue.put(_Stop())
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("store writer did not finish within %.1f s", timeout)

    def _run(self) -> None:
        next_retention = 0.0
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            self.heartbeat = time.monotonic()
            if isinstance(item, _Stop):
                self._queue.task_done()
                break
            if item is not None:
                self._write_safely(item)
                self._queue.task_done()
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + RETENTION_INTERVAL_S
                self._retain_safely()
        self.db.close()

    def _write_safely(
        self, item: AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState | Delivered
    ) -> None:
        try:
            self.write(item)
            self.written += 1
        except (sqlite3.Error, OSError, sf.LibsndfileError) as exc:
            # The pipeline keeps running; the row is lost only if the disk itself fails.
            logger.error("could not write %s to the event log: %s", type(item).__name__, exc)

    def write(
        self, item: AnomalyEvent | SourceStatus | ClipJob | ScoreReport | AlarmState | Delivered
    ) -> None:
        """Write one item now (the writer thread's step; also for tools and tests that own the store)."""
        if isinstance(item, Delivered):
            with self.db.atomic():
                self.db.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in item.ids])
            return
        if isinstance(item, AnomalyEvent | SourceStatus | ScoreReport | AlarmState):
            # A row and its outgoing messages commit together, or not at all.
            with self.db.atomic():
                if isinstance(item, AnomalyEvent):
                    self.db["events"].upsert(_event_row(item), pk="event_id")  # type: ignore[union-attr]
                elif isinstance(item, SourceStatus):
                    self.db["source_status"].insert(  # type: ignore[union-attr]
                        {"node": item.node, "stream": item.stream, "state": item.state.value,
                         "detail": item.detail, "at": iso(item.at)}
                    )  # fmt: skip
                if self.outbox is not None:
                    self.outbox.add(self.db, self.outbox.messages(item))
        else:
            path = save_clip(item, self.config.clips)
            if path is not None:
                with self.db.atomic():
                    self.db.execute(
                        "UPDATE events SET clip_path = ? WHERE event_id = ?", [str(path), item.event_id]
                    )

    def _retain_safely(self) -> None:
        try:
            removed = apply_retention(self.db, self.config, utc_now())
        except (sqlite3.Error, OSError) as exc:
            logger.error("retention failed: %s", exc)
            return
        if removed:
            logger.info("retention removed %d event(s)", removed)


def apply_retention(db: sqlite_utils.Database, config: StorageConfig, now: dt.datetime) -> int:
    """Delete closed events older than retention_days or beyond the newest max_events, with their clips."""
    cutoff = iso(now - dt.timedelta(days=config.retention_days))
    doomed = db.execute(
        "SELECT event_id, clip_path FROM events WHERE state = 'closed' AND (started_at < ? OR "
        "event_id NOT IN "
        "(SELECT event_id FROM events ORDER BY started_at DESC LIMIT ?))",
        [cutoff, config.max_events],
    ).fetchall()
    with db.atomic():
        db.conn.executemany("DELETE FROM events WHERE event_id = ?", [(event_id,) for event_id, _ in doomed])
        db.execute("DELETE FROM source_status WHERE at < ?", [cutoff])
    for _, clip in doomed:
        if clip:
            Path(clip).unlink(missing_ok=True)
    return len(doomed)


def _clip_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wav"), key=lambda p: p.stat().st_mtime)


def save_clip(job: ClipJob, config: ClipsConfig) -> Path | None:
    """Write the clip as 16-bit WAV unless the disk is short; then keep all clips under the quota."""
    job.directory.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(job.directory).free / 1e6
    if free_mb < config.min_free_mb:
        logger.warning(
            "clip of event %s not saved: %.0f MB free in %s, floor is %.0f MB",
            job.event_id, free_mb, job.directory, config.min_free_mb,
        )  # fmt: skip
        return None
    stamp = job.started_at.strftime("%Y%m%dT%H%M%S")
    path = job.directory / f"{job.stream}-{stamp}-{job.event_id[:8]}.wav"
    tmp = path.with_suffix(".wav.partial")
    sf.write(tmp, job.samples, job.sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)
    files = _clip_files(job.directory)
    total = sum(p.stat().st_size for p in files)
    quota = config.quota_mb * 1e6
    for old in files:
        if total <= quota:
            break
        total -= old.stat().st_size
        old.unlink()
        logger.info("clip quota (%.0f MB): deleted %s", config.quota_mb, old.name)
    return path if path.exists() else None


EVENT_COLUMNS = (
    "event_id", "stream", "state", "started_at", "ended_at", "peak_score", "mean_score", "threshold",
    "windows_over", "windows", "end_reason", "model_id", "clip_path", "node", "updated_at",
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
            if version == 0:
                return []  # the daemon is creating it right now: no events yet
            rows = conn.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM events {where} ORDER BY started_at, updated_at",
                params,
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot read events ({exc})") from exc
    return [dict(row) for row in rows]
