"""The event log's one writer thread: events, source status, mutes and the MQTT outbox, in SQLite.

Every row and the MQTT messages it causes commit in one transaction. When a write fails (a full disk,
an I/O error, another process's write lock) nothing is lost while memory lasts: the rows wait in a
bounded backlog, their messages go to the broker from memory, clips are not saved, and the writer
retries every second until the rows are written; one warning a minute says so, and `status()` tells the
service. The writer also keeps the WAL small (periodic checkpoints), ends mutes on time and prunes old
events. Schema, migrations and readers: anomalyd/database.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import sqlite_utils

from anomalyd.backlog import Backlog, ClipRow, EventRow, MinutesRow, MuteRow, Row, StatusRow, apply_rows
from anomalyd.clipfiles import remove_partial_clips, save_clip
from anomalyd.config import StorageConfig
from anomalyd.contract import Message, event_messages, marked_message, mute_message, state_message
from anomalyd.database import (
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    checkpoint,
    describe,
    open_database,
    read_events,
    transaction,
)
from anomalyd.errors import MarkError, StoreError
from anomalyd.marks import MarkCommand, mark_normal
from anomalyd.mutes import MAX_MUTE_SECONDS, MinutesCommand, MuteCommand, Mutes, load_mutes, save_mute
from anomalyd.outbox import Delivered, Outbox
from anomalyd.records import AlarmState, AnomalyEvent, ClipJob, ScoreReport, SourceStatus, iso, utc_now
from anomalyd.roster import Roster, RosterMemory, apply_roster
from anomalyd.throttle import Throttle

__all__ = [
    "EVENT_COLUMNS",
    "SCHEMA_VERSION",
    "Delivered",
    "MinutesCommand",
    "MuteCommand",
    "Mutes",
    "Outbox",
    "Roster",
    "StoreError",
    "StoreStatus",
    "StoreWriter",
    "apply_retention",
    "close_interrupted",
    "open_database",
    "read_events",
    "save_clip",
]

logger = logging.getLogger(__name__)

TICK_S = 0.25  # the writer wakes at least this often (mute expiry, retries, checkpoints)
RETRY_INTERVAL_S = 1.0  # while the event log cannot be written, try again this often
WARN_INTERVAL_S = 60.0  # one warning a minute about it, not one per item
CHECKPOINT_INTERVAL_S = 5.0  # WAL checkpoints (automatic ones happen too, at 1000 pages)
RETENTION_INTERVAL_S = 3600.0  # how often old rows and clips are pruned
RETRY_CHUNK = 500  # rows (and messages) per transaction when catching up
MAX_UNDELETED = 100_000  # acknowledged outbox ids waiting to be deleted; beyond, they are sent twice


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class StoreStatus:
    """The event log's health, for systemd STATUS and the node's diagnostics topic."""

    state: str  # "ok" | "degraded" (rows cannot be written; alerts still go out from memory)
    detail: str  # one line
    rows_pending: int  # rows waiting in memory for the database
    messages_pending: int  # MQTT messages waiting in memory
    rows_dropped: int  # rows given up because memory was full (status rows first, events last)
    messages_dropped: int  # MQTT messages given up because an outbox was full (scores first)
    clips_skipped: int  # clips not saved because the disk was short or failing

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Item = (
    AnomalyEvent
    | SourceStatus
    | ClipJob
    | ScoreReport
    | AlarmState
    | Delivered
    | MuteCommand
    | MarkCommand
    | MinutesCommand
    | Roster
)


def _retryable(exc: BaseException) -> bool:
    """Failures of the disk or of locking, which time may cure; programming errors are not."""
    return isinstance(exc, OSError | sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _interrupted_end(row: sqlite3.Row, now: dt.datetime) -> AnomalyEvent:
    """The `end` of an event a crash left open, at its last known time."""

    def number(key: str) -> float:
        value = row[key]
        return float(value) if value is not None else 0.0

    return AnomalyEvent(
        event_id=row["event_id"], type="end", node=row["node"], stream=row["stream"],
        started_at=dt.datetime.fromisoformat(row["started_at"]),
        ended_at=dt.datetime.fromisoformat(row["updated_at"]),
        start_sample=int(number("start_sample")), end_sample=int(number("end_sample")),
        score=number("score"), peak_score=number("peak_score"), mean_score=number("mean_score"),
        threshold=number("threshold"), mean=number("mean"), std=number("std"),
        k=row["k"], model_id=row["model_id"] or "", windows=max(1, int(number("windows"))),
        windows_over=int(number("windows_over")), reason="interrupted", at=now,
    )  # fmt: skip


def close_interrupted(conn: sqlite3.Connection, outbox: Outbox | None, now: dt.datetime) -> int:
    """Close events left open by a crash at their last known time, reason 'interrupted', inside the
    caller's transaction; those whose start was published get their `end` (replayed) and `OFF` queued."""
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM events WHERE state = 'open'").fetchall()
    finally:
        conn.row_factory = None
    conn.execute(
        "UPDATE events SET state = 'closed', ended_at = updated_at, end_reason = 'interrupted' "
        "WHERE state = 'open'"
    )
    if outbox is not None:
        for row in rows:
            if row["published"]:
                end = _interrupted_end(row, now)
                outbox.add(
                    conn,
                    [*event_messages(outbox.topics, end, replayed=True), state_message(outbox.topics, end)],
                )
    return len(rows)


def _local_midnight(now: dt.datetime) -> dt.datetime:
    local = now.astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def _events_since(conn: sqlite3.Connection, since: dt.datetime) -> tuple[dt.date, int]:
    """(the local day of `since`, events started since then) from the event log."""
    count = conn.execute(
        "SELECT count(*) FROM events WHERE started_at >= ?", [iso(since.astimezone(dt.UTC))]
    ).fetchone()[0]
    return since.date(), int(count)


def restore_mutes(conn: sqlite3.Connection, mutes: Mutes, outbox: Outbox | None, now: dt.datetime) -> None:
    """Load the mutes kept in the event log; restate them (retained, with MQTT), and end (and acknowledge)
    those that ran out while the daemon was not running."""
    for stream, until in sorted(load_mutes(conn).items()):
        if until > now:
            mutes.set(stream, until)
            if outbox is not None:
                outbox.add(conn, [mute_message(outbox.topics, stream, until, now, reason="restored")])
            logger.warning("stream %s: new alerts stay muted until %s", stream, iso(until))
        else:
            save_mute(conn, stream, None, now)
            if outbox is not None:
                outbox.add(conn, [mute_message(outbox.topics, stream, None, now, reason="expired")])


class StoreWriter:
    """The one thread that writes the event log and the clips."""

    def __init__(self, config: StorageConfig, outbox: Outbox | None = None) -> None:
        """Open and migrate the database, close what a crash left open, restore the mutes, remove
        half-written clips. Raises StoreError (one line: file and cause) when any of it fails."""
        self.config = config
        self.outbox = outbox
        # Mutes are kept with or without MQTT: the dashboard sets and shows them too.
        self.mutes = outbox.mutes if outbox is not None else Mutes()
        self._queue: queue.Queue[Item | _Stop] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.db: sqlite_utils.Database = open_database(config.database)
        self._conn: sqlite3.Connection = self.db.conn
        self._wal = Path(f"{config.database}-wal")
        now = utc_now()
        try:
            with transaction(self._conn):
                interrupted = close_interrupted(self._conn, outbox, now)
                restore_mutes(self._conn, self.mutes, outbox, now)
            self._roster = RosterMemory.load(self._conn)
            self._today = _events_since(self._conn, _local_midnight(now))
        except (OSError, sqlite3.Error) as exc:
            self.db.close()
            raise StoreError(
                f"{config.database}: cannot write to the event database: {describe(exc, config.database)}"
            ) from exc
        if interrupted:
            logger.warning(
                "closed %d event(s) left open by an earlier run (reason 'interrupted')", interrupted
            )
        remove_partial_clips(config.clips.directory)
        self.heartbeat = time.monotonic()
        self.written = 0
        # Changes with every write that changes what an events list shows (for the dashboard); starts from
        # the clock so that a page open across a restart sees a new value, never the one it last had.
        self.events_version = time.time_ns() // 1_000_000
        self.write_failures = 0  # times a write to the event log failed (a full disk, I/O, a foreign lock)
        self.clips_skipped = 0
        self._backlog = Backlog()
        self._undeleted: set[int] = set()  # acknowledged outbox ids not deleted yet
        self._failure = ""  # why the event log cannot be written; "" while it can
        self._announced = False  # the current failure was logged (so its end is too)
        self._failing_since = 0.0
        self._next_retry = 0.0
        self._warn = Throttle(WARN_INTERVAL_S)
        self._clip_warn = Throttle(WARN_INTERVAL_S)
        self._next_mute_check = 0.0
        self._next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL_S
        self._next_retention = 0.0
        self._stop_deadline = math.inf  # set by stop(): clips still queued after it are given up
        self._stopping = threading.Event()

    # ---- the service's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Item) -> None:
        self._queue.put(item)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is handled (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def stop(self, timeout: float) -> None:
        """Write everything queued, then close the database."""
        if not self._thread.is_alive():
            self.db.close()
            return
        self._stop_deadline = time.monotonic() + max(0.1, timeout - 0.2)
        self._stopping.set()
        self._queue.put(_Stop())  # wakes the writer if it waits
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("store writer did not finish within %.1f s", timeout)

    def status(self) -> StoreStatus:
        """The event log's health now (safe to call from any thread)."""
        memory = self.outbox.memory if self.outbox is not None else None
        rows, messages = len(self._backlog), len(memory) if memory is not None else 0
        dropped = sum(memory.dropped.values()) if memory is not None else 0
        if self.outbox is not None:
            dropped += sum(self.outbox.dropped.values())
        failure = self._failure
        if failure:
            since = time.monotonic() - self._failing_since
            detail = (
                f"event log not writable for {since:.0f} s ({failure}); {rows} row(s) and {messages} "
                "MQTT message(s) held in memory"
            )
        else:
            detail = "event log ok"
        return StoreStatus(
            state="degraded" if failure else "ok",
            detail=" ".join(detail.split()),
            rows_pending=rows,
            messages_pending=messages,
            rows_dropped=self._backlog.total_dropped,
            messages_dropped=dropped,
            clips_skipped=self.clips_skipped,
        )

    # ---- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            self.heartbeat = time.monotonic()
            if self._stopping.is_set() or isinstance(item, _Stop):
                if item is not None:
                    self._queue.task_done()
                self._write_remaining(item)
                break
            if item is not None:
                try:
                    self.write(item)
                finally:
                    self._queue.task_done()
            self.tick()
        self._close()

    def _write_remaining(self, first: Item | _Stop | None) -> None:
        """At stop: what is still queued, events and statuses first; clips only while time remains, so that
        a stop with many open events never leaves an event unwritten behind a long clip."""
        rest: list[Item] = [] if first is None or isinstance(first, _Stop) else [first]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if not isinstance(item, _Stop):
                rest.append(item)
        for item in sorted(rest, key=lambda i: isinstance(i, ClipJob)):  # stable: order kept otherwise
            if isinstance(item, ClipJob) and time.monotonic() > self._stop_deadline:
                self.clips_skipped += 1
                continue
            self.write(item)

    def tick(self) -> None:
        """The writer's periodic work: retries, mute expiry, checkpoints, retention."""
        now = time.monotonic()
        if self._failure and now >= self._next_retry:
            self._catch_up()
        if self._failure and self._warn.ready():
            self._announced = True
            self._warn_failing()
        if now >= self._next_mute_check:
            self._next_mute_check = now + TICK_S
            self._expire_mutes(utc_now())
        if not self._failure and now >= self._next_checkpoint:
            self._next_checkpoint = now + CHECKPOINT_INTERVAL_S
            self._checkpoint()
        if not self._failure and now >= self._next_retention:
            self._next_retention = now + RETENTION_INTERVAL_S
            self._retain()

    def _close(self) -> None:
        if self._failure:
            self._catch_up()
        if self._failure:
            memory = len(self.outbox.memory) if self.outbox is not None else 0
            logger.error(
                "event log still not writable at shutdown (%s): %d row(s) and %d unsent MQTT message(s) "
                "are lost", self._failure, len(self._backlog), memory,
            )  # fmt: skip
        self.db.close()

    # ---- one item -----------------------------------------------------------------------------------

    def write(self, item: Item) -> None:
        """Handle one item now (the writer thread's step; also for tools and tests that own the store)."""
        now = utc_now()
        rows: list[Row] = []
        messages: list[Message] = []
        deletes: tuple[int, ...] = ()
        if isinstance(item, Delivered):
            deletes = item.ids
        elif isinstance(item, ClipJob):
            rows = self._save_clip(item)
        elif isinstance(item, MuteCommand):
            rows, messages = self._mute(item, now)
        elif isinstance(item, MinutesCommand):
            rows, messages = self._minutes(item, now)
        elif isinstance(item, Roster):
            if self.outbox is not None:
                rows, messages = apply_roster(item, self._roster, self.outbox, now)
        elif isinstance(item, MarkCommand):
            messages = self._mark(item, now)
        elif isinstance(item, AnomalyEvent):
            if item.type == "start":
                self._count_event(item.started_at)
            published = False
            if self.outbox is not None:
                messages, published = self.outbox.for_event(item, now)
            rows = [EventRow(item, published)]
        else:
            if isinstance(item, SourceStatus):
                rows = [StatusRow(item)]
            if self.outbox is not None:
                messages = self.outbox.messages(item, now)
        self._commit(rows, messages, deletes, now)
        self.written += 1
        if isinstance(item, AnomalyEvent | MarkCommand) or (isinstance(item, ClipJob) and rows):
            self.events_version += 1

    def _commit(
        self, rows: list[Row], messages: list[Message], deletes: tuple[int, ...], now: dt.datetime
    ) -> None:
        created = iso(now) or ""
        if not self._failure:
            try:
                with transaction(self._conn):
                    apply_rows(self._conn, rows)
                    self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in deletes])
                    if self.outbox is not None and messages:
                        self.outbox.add(self._conn, messages, created)
                return
            except (OSError, sqlite3.Error) as exc:
                if not _retryable(exc):
                    raise
                self._fail(exc)
        self._backlog.add(rows)
        if self.outbox is not None and messages:
            self.outbox.memory.put(messages, created)
        if len(self._undeleted) < MAX_UNDELETED:
            self._undeleted.update(deletes)

    def _save_clip(self, job: ClipJob) -> list[Row]:
        if self._failure:  # clips are the first thing given up when the disk is short
            self.clips_skipped += 1
            return []
        try:
            path = save_clip(job, self.config.clips)
        except (OSError, sf.LibsndfileError) as exc:
            self.clips_skipped += 1
            if self._clip_warn.ready():
                logger.warning(
                    "clip of event %s not saved: %s%s", job.event_id, exc, self._clip_warn.take_suppressed()
                )
            return []
        return [ClipRow(job.event_id, str(path), job.event_offset)] if path is not None else []

    # ---- mutes --------------------------------------------------------------------------------------

    def _mute(self, command: MuteCommand, now: dt.datetime) -> tuple[list[Row], list[Message]]:
        outbox, mutes = self.outbox, self.mutes
        refused = command.refused
        minutes = mutes.minutes(command.stream)
        seconds = command.seconds
        if seconds is None:  # "on": for the stream's mute duration
            seconds = (minutes or 0.0) * 60.0
            if not refused and minutes is None:
                refused = "this stream has no mute duration; give the seconds"
        if not refused and not (math.isfinite(seconds) and 0 <= seconds <= MAX_MUTE_SECONDS):
            refused = f"expected 0 to {MAX_MUTE_SECONDS} s"
        if refused:
            current = mutes.until(command.stream, now)
            if command.answer is not None:
                command.answer(current, refused)
            if outbox is None:
                return [], []
            return [], [
                mute_message(outbox.topics, command.stream, current, now, minutes=minutes, refused=refused)
            ]
        until = now + dt.timedelta(seconds=seconds) if seconds > 0 else None
        mutes.set(command.stream, until)
        logger.warning(
            "stream %s: new alerts %s", command.stream, f"muted until {iso(until)}" if until else "unmuted"
        )
        if command.answer is not None:
            command.answer(until, "")
        rows: list[Row] = [MuteRow(command.stream, until, now)]
        if outbox is None:
            return rows, []
        messages = [mute_message(outbox.topics, command.stream, until, now, minutes=minutes)]
        if until is None:
            lifted, events = outbox.lifted(command.stream, now)
            messages += lifted
            rows += [EventRow(event, True) for event in events]
        return rows, messages

    def _minutes(self, command: MinutesCommand, now: dt.datetime) -> tuple[list[Row], list[Message]]:
        """A stream's new mute duration: kept in the event log, acknowledged on its mute topic."""
        outbox = self.outbox
        if outbox is None:
            return [], []
        rows: list[Row] = []
        if not command.refused:
            outbox.mutes.set_minutes(command.stream, command.minutes)
            self._roster.minutes[command.stream] = command.minutes
            rows.append(MinutesRow(command.stream, command.minutes, now))
            logger.info("stream %s: mute duration set to %g min", command.stream, command.minutes)
        until = outbox.mutes.until(command.stream, now)
        minutes = outbox.mutes.minutes(command.stream)
        return rows, [
            mute_message(outbox.topics, command.stream, until, now, minutes=minutes, refused=command.refused)
        ]

    def _count_event(self, started_at: dt.datetime) -> None:
        day = started_at.astimezone().date()
        count = self._today[1] if self._today[0] == day else 0
        self._today = (day, count + 1)

    def events_today(self, now: dt.datetime) -> int:
        """Events that started since local midnight (safe to call from any thread)."""
        day, count = self._today
        return count if day == now.astimezone().date() else 0

    def _mark(self, command: MarkCommand, now: dt.datetime) -> list[Message]:
        """Mark an event a false alarm (its own transaction); returns the answer for the sender."""
        refused = command.refused
        marked = None
        if not refused and self._failure:
            refused = "the event log cannot be written now; try again later"
        if not refused:
            try:
                marked = mark_normal(
                    self._conn, command.event_id, self.config.normal_folder, now, note=command.note,
                    stream=command.stream, owner_of=self.config.database.parent,
                )  # fmt: skip
            except MarkError as exc:
                refused = str(exc)
            except (OSError, sqlite3.Error) as exc:  # the disk: the sender may try again
                refused = f"cannot mark now: {' '.join(describe(exc, self.config.database).split())}"
        if refused:
            logger.warning("stream %s: mark command for event %s refused: %s", command.stream or "-",
                           command.event_id, refused)  # fmt: skip
        elif marked is not None and not marked.already:
            logger.warning("stream %s: event %s marked a false alarm; its clip is now normal audio: %s",
                           marked.stream, marked.event_id, marked.normal_clip)  # fmt: skip
        if command.answer is not None:
            command.answer(marked, refused)
        if self.outbox is None:
            return []
        if marked is None:
            if command.stream is None:  # from the control channel: its client has the answer
                return []
            return [
                marked_message(
                    self.outbox.topics, command.stream, command.event_id, now, refused=refused[:200]
                )
            ]
        return [
            marked_message(
                self.outbox.topics, marked.stream, marked.event_id, now, marked_at=marked.marked_at,
                normal_clip=str(marked.normal_clip), already=marked.already,
            )
        ]  # fmt: skip

    def _expire_mutes(self, now: dt.datetime) -> None:
        outbox = self.outbox
        for stream in self.mutes.expired(now):
            self.mutes.set(stream, None)
            logger.info("stream %s: mute expired; new alerts are published again", stream)
            rows: list[Row] = [MuteRow(stream, None, now)]
            messages: list[Message] = []
            if outbox is not None:
                minutes = self.mutes.minutes(stream)
                messages = [mute_message(outbox.topics, stream, None, now, minutes=minutes, reason="expired")]
                lifted, events = outbox.lifted(stream, now)
                rows += [EventRow(event, True) for event in events]
                messages += lifted
            self._commit(rows, messages, (), now)

    # ---- when the event log cannot be written ---------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.write_failures += 1
        self._failure = " ".join(describe(exc, self.config.database).split())
        self._failing_since = time.monotonic()
        self._next_retry = self._failing_since + RETRY_INTERVAL_S
        self._announced = self._warn.ready()
        if self._announced:
            logger.warning(
                "event log %s cannot be written (%s): keeping its rows in memory (at most %d), sending "
                "alerts from memory, not saving clips; retrying every %.0f s",
                self.config.database, self._failure, self._backlog.limit, RETRY_INTERVAL_S,
            )  # fmt: skip

    def _warn_failing(self) -> None:
        status = self.status()
        logger.warning(
            "%s; %d row(s) dropped, %d clip(s) not saved so far",
            status.detail, status.rows_dropped, status.clips_skipped,
        )  # fmt: skip

    def _catch_up(self) -> None:
        """Write what waited in memory, oldest first, in chunks; stop at the first failure."""
        memory = self.outbox.memory if self.outbox is not None else None
        written = 0
        while True:
            self.heartbeat = time.monotonic()
            rows = self._backlog.head(RETRY_CHUNK)
            pending = memory.peek()[:RETRY_CHUNK] if memory is not None else []
            deletes = sorted(self._undeleted)[: RETRY_CHUNK * 10]
            if not rows and not pending and not deletes:
                break
            try:
                with transaction(self._conn):
                    apply_rows(self._conn, rows)
                    self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in deletes])
                    if self.outbox is not None and pending:
                        self.outbox.add_pending(self._conn, pending)
            except (OSError, sqlite3.Error) as exc:
                if not _retryable(exc):
                    raise
                self._failure = " ".join(describe(exc, self.config.database).split())
                self._next_retry = time.monotonic() + RETRY_INTERVAL_S
                return
            self._backlog.drop_head(len(rows))
            if memory is not None:
                memory.remove({p.seq for p in pending})
            self._undeleted.difference_update(deletes)
            written += len(rows)
        if self._announced:  # a failure that flaps is said once a minute, and so is its end
            logger.warning(
                "event log writable again after %.0f s: %d row(s) written from memory, %d dropped so far",
                time.monotonic() - self._failing_since, written, self._backlog.total_dropped,
            )  # fmt: skip
        self._failure = ""

    # ---- upkeep -------------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        try:
            checkpoint(self._conn, self._wal)
        except (OSError, sqlite3.Error) as exc:  # a busy or full disk: the next one will do
            logger.debug("WAL checkpoint not done: %s", exc)

    def _retain(self) -> None:
        try:
            removed = apply_retention(self.db, self.config, utc_now())
        except (sqlite3.Error, OSError) as exc:
            logger.error("retention failed: %s", exc)
            return
        if removed:
            logger.info("retention removed %d event(s)", removed)


def apply_retention(db: sqlite_utils.Database, config: StorageConfig, now: dt.datetime) -> int:
    """Delete closed events older than retention_days or beyond the newest max_events, with their clips.
    Events marked as false alarms are kept (and do not count against max_events)."""
    cutoff = iso(now - dt.timedelta(days=config.retention_days))
    doomed = db.execute(
        "SELECT event_id, clip_path FROM events WHERE state = 'closed' AND marked_normal_at IS NULL "
        "AND (started_at < ? OR "
        "event_id NOT IN "
        "(SELECT event_id FROM events WHERE marked_normal_at IS NULL ORDER BY started_at DESC LIMIT ?))",
        [cutoff, config.max_events],
    ).fetchall()
    with transaction(db.conn):
        db.conn.executemany("DELETE FROM events WHERE event_id = ?", [(event_id,) for event_id, _ in doomed])
        db.execute("DELETE FROM source_status WHERE at < ?", [cutoff])
    for _, clip in doomed:
        if clip:
            Path(clip).unlink(missing_ok=True)
    return len(doomed)
