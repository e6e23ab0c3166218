"""The event log: real SQLite files, migrations, the writer thread, retention, clips under a quota, the\nWAL kept small and foreign locks outlasted."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlite_utils

from anomalyd.backlog import Backlog, EventRow, StatusRow
from anomalyd.clipfiles import save_clip
from anomalyd.config import ClipsConfig, StorageConfig
from anomalyd.contract import Message, Topics
from anomalyd.database import JOURNAL_SIZE_LIMIT, MIGRATIONS, SCHEMA_VERSION, open_database, read_events
from anomalyd.errors import StoreError
from anomalyd.mutes import Mutes
from anomalyd.outbox import MemoryOutbox, Outbox
from anomalyd.records import AnomalyEvent, ClipJob, SourceState, SourceStatus, utc_now
from anomalyd.store import StoreWriter, apply_retention
from tests.conftest import ROOT

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def event(event_id: str, kind: str, started: dt.datetime, **changes: object) -> AnomalyEvent:
    fields = dict(
        event_id=event_id, type=kind, node="n", stream="fan", started_at=started,
        ended_at=started + dt.timedelta(seconds=30) if kind == "end" else None,
        start_sample=0, end_sample=480_000, score=0.5, peak_score=0.9, mean_score=0.4, threshold=0.2,
        mean=0.1, std=0.03, k=3.0, model_id="m-1", windows=10, windows_over=8,
        reason="recovered" if kind == "end" else "", at=started + dt.timedelta(seconds=31 if kind == "end" else 1),
    )  # fmt: skip
    fields.update(changes)
    return AnomalyEvent(**fields)  # type: ignore[arg-type]


def storage(tmp_path: Path, **changes: object) -> StorageConfig:
    clips = ClipsConfig(directory=tmp_path / "clips")
    return StorageConfig(database=tmp_path / "events.db", clips=clips, **changes)  # type: ignore[arg-type]


def test_new_database_is_wal_and_at_the_current_schema(tmp_path: Path) -> None:
    db = open_database(tmp_path / "sub" / "events.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"events", "source_status"} <= set(db.table_names())
    db.close()
    again = open_database(tmp_path / "sub" / "events.db")  # reopening migrates nothing and loses nothing
    assert again.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "events.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this anomalyd's"):
        open_database(tmp_path / "events.db")


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_text("this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the event database"):
        open_database(tmp_path / "events.db")


def test_writer_records_an_event_lifecycle_and_status(tmp_path: Path) -> None:
    writer = StoreWriter(storage(tmp_path))
    writer.start()
    writer.put(event("e1", "start", T0))
    writer.put(event("e1", "update", T0, peak_score=1.5))
    writer.put(SourceStatus("n", "fan", SourceState.SILENT, "level -90 dBFS", T0))
    writer.put(event("e1", "end", T0, peak_score=1.5))
    writer.stop(5.0)
    rows = read_events(tmp_path / "events.db")
    assert len(rows) == 1
    row = rows[0]
    assert (row["state"], row["peak_score"], row["end_reason"]) == ("closed", 1.5, "recovered")
    assert row["started_at"] == "2026-01-01T12:00:00.000+00:00"
    assert row["ended_at"] == "2026-01-01T12:00:30.000+00:00"
    conn = sqlite3.connect(tmp_path / "events.db")
    assert conn.execute("SELECT stream, state, detail FROM source_status").fetchall() == [
        ("fan", "silent", "level -90 dBFS")
    ]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_events_left_open_by_a_crash_are_closed_on_the_next_start(tmp_path: Path) -> None:
    db = open_database(tmp_path / "events.db")
    db["events"].insert({"event_id": "x", "node": "n", "stream": "fan", "state": "open",  # type: ignore[union-attr]
                         "started_at": "2026-01-01T12:00:00.000+00:00", "updated_at": "2026-01-01T12:00:05.000+00:00"})  # fmt: skip
    db.close()
    StoreWriter(storage(tmp_path)).stop(1.0)
    (row,) = read_events(tmp_path / "events.db")
    assert (row["state"], row["end_reason"], row["ended_at"]) == ("closed", "interrupted", row["updated_at"])


def test_read_events_filters(tmp_path: Path) -> None:
    writer = StoreWriter(storage(tmp_path))
    writer.start()
    for i in range(5):
        writer.put(event(f"e{i}", "end", T0 + dt.timedelta(hours=i), stream="fan" if i % 2 else "pump"))
    writer.stop(5.0)
    db = tmp_path / "events.db"
    assert [r["event_id"] for r in read_events(db)] == ["e0", "e1", "e2", "e3", "e4"]
    assert [r["event_id"] for r in read_events(db, stream="fan")] == ["e1", "e3"]
    assert [r["event_id"] for r in read_events(db, since=T0 + dt.timedelta(hours=2, minutes=50))] == [
        "e3",
        "e4",
    ]
    with pytest.raises(StoreError, match="no event database"):
        read_events(tmp_path / "missing.db")


def test_retention_by_age_and_count_deletes_clips_too(tmp_path: Path) -> None:
    config = storage(tmp_path, retention_days=10, max_events=3)
    now = utc_now()
    clip = tmp_path / "old.wav"
    clip.write_bytes(b"RIFF")
    writer = StoreWriter(config)  # not started: its writes happen here, in order
    writer.write(event("ancient", "end", now - dt.timedelta(days=30)))
    for i in range(4):
        writer.write(event(f"recent{i}", "end", now - dt.timedelta(hours=4 - i)))
    writer.write(event("still-open", "start", now - dt.timedelta(days=40)))
    writer.db.execute("UPDATE events SET clip_path = ? WHERE event_id = 'ancient'", [str(clip)])
    writer.db.conn.commit()
    removed = apply_retention(writer.db, config, now)
    remaining = [r["event_id"] for r in read_events(config.database)]
    assert removed == 2
    assert remaining == ["still-open", "recent1", "recent2", "recent3"]  # open events are never deleted
    assert not clip.exists()


def test_clips_respect_quota_and_free_space_floor(tmp_path: Path) -> None:
    directory = tmp_path / "clips"
    one_second = np.zeros(16_000, dtype=np.float32)  # 32 kB as 16-bit WAV
    config = ClipsConfig(directory=directory, quota_mb=0.1, min_free_mb=0)
    paths = []
    for i in range(5):
        job = ClipJob(f"event{i}", "fan", T0 + dt.timedelta(minutes=i), one_second, 16_000, directory)
        paths.append(save_clip(job, config))
    assert all(p is not None for p in paths)
    kept = sorted(p.name for p in directory.glob("*.wav"))
    assert len(kept) == 3  # 3 x 32 kB fit under 100 kB
    assert paths[-1] is not None
    assert paths[-1].name in kept
    data, rate = sf.read(paths[-1])
    assert (len(data), rate) == (16_000, 16_000)

    huge_floor = ClipsConfig(directory=directory, min_free_mb=1e7)  # 10 TB: more than any test disk has free
    job = ClipJob("e-last", "fan", T0, one_second, 16_000, directory)
    assert save_clip(job, huge_floor) is None


def test_events_follow_prints_new_and_changed_events(tmp_path: Path) -> None:
    writer = StoreWriter(storage(tmp_path))
    writer.write(event("before", "end", T0))
    follower = subprocess.Popen(
        [sys.executable, "-m", "anomalyd", "events", "--database", str(tmp_path / "events.db"), "--follow", "--format", "json"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        assert '"event_id": "before"' in follower.stdout.readline()
        writer.write(event("live", "start", T0 + dt.timedelta(hours=1), at=utc_now()))
        first = follower.stdout.readline()
        assert '"event_id": "live"' in first
        assert '"state": "open"' in first
        writer.write(event("live", "end", T0 + dt.timedelta(hours=1), at=utc_now()))
        assert '"state": "closed"' in follower.stdout.readline()
    finally:
        follower.terminate()
        follower.wait(10)
        writer.stop(1.0)


def test_a_database_being_created_reads_as_empty(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "events.db").execute("PRAGMA journal_mode = wal").close()
    assert read_events(tmp_path / "events.db") == []


def test_half_written_clips_are_removed_at_start(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "fan-20260101T120000-abcdef12.wav.partial").write_bytes(b"RIFF")
    (clips / "fan-20260101T110000-12345678.wav").write_bytes(b"RIFF")
    StoreWriter(storage(tmp_path)).stop(1.0)
    assert sorted(p.name for p in clips.iterdir()) == ["fan-20260101T110000-12345678.wav"]


def test_a_database_without_published_flags_and_mutes_is_migrated(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "events.db")
    db = sqlite_utils.Database(conn)
    for step in MIGRATIONS[:2]:
        step(db)
    conn.execute("PRAGMA user_version = 2")
    db["events"].insert({"event_id": "old", "node": "n", "stream": "fan", "state": "closed",  # type: ignore[union-attr]
                         "started_at": "2025-01-01T00:00:00.000+00:00", "updated_at": "2025-01-01T00:00:00.000+00:00"})  # fmt: skip
    conn.commit()
    conn.close()
    # Readers (`anomalyd events`, a daemon migrating it right now) see its events, later columns as null.
    (old,) = read_events(tmp_path / "events.db")
    assert (old["event_id"], old["marked_normal_at"], old["clip_path"]) == ("old", None, None)
    writer = StoreWriter(storage(tmp_path))
    assert writer.db.execute("SELECT event_id, published FROM events").fetchall() == [("old", 1)]
    assert writer.db.execute("SELECT count(*) FROM mutes").fetchone() == (0,)
    writer.stop(1.0)


def test_the_backlog_coalesces_an_events_rows_and_drops_status_rows_first() -> None:
    backlog = Backlog(limit=4)
    status = SourceStatus("n", "fan", SourceState.SILENT, "quiet", T0)
    backlog.add([EventRow(event("a", "start", T0), False), StatusRow(status), StatusRow(status)])
    backlog.add([EventRow(event("a", "update", T0), False), EventRow(event("b", "start", T0), True)])
    assert len(backlog) == 4  # a's two rows are one
    backlog.add([EventRow(event("c", "start", T0), True), EventRow(event("d", "start", T0), True)])
    rows = backlog.head(10)
    assert [type(r).__name__ for r in rows] == ["EventRow"] * 4
    assert backlog.dropped["StatusRow"] == 2
    kept = [r.event.event_id for r in rows if isinstance(r, EventRow)]
    assert kept == ["a", "b", "c", "d"]
    backlog.add([EventRow(event("e", "start", T0), True)])
    assert backlog.dropped["EventRow"] == 1  # events go last, oldest first
    assert [r.event.event_id for r in backlog.head(10) if isinstance(r, EventRow)] == ["b", "c", "d", "e"]


def test_the_memory_outbox_keeps_order_supersedes_and_drops_scores_first() -> None:
    memory = MemoryOutbox(limit=4)

    def msg(kind: str, topic: str) -> Message:
        return Message(topic, f"{kind}@{topic}", 0 if kind == "score" else 1, kind != "event", kind)

    memory.put([msg("event", "e"), msg("score", "s1"), msg("state", "st")], "t0")
    memory.put([msg("state", "st"), msg("score", "s2")], "t1")  # a newer state replaces the queued one
    assert [p.message.payload for p in memory.peek()] == ["event@e", "score@s1", "state@st", "score@s2"]
    memory.put([msg("event", "e2")], "t2")
    assert memory.dropped["score"] == 1
    taken = memory.take(2)
    assert [p.message.payload for p in taken] == ["event@e", "state@st"]
    memory.requeue()  # the connection dropped before the PUBACKs
    assert [p.message.payload for p in memory.take(10)] == ["event@e", "state@st", "score@s2", "event@e2"]
    generation = memory.generation
    memory.remove({taken[0].seq})
    assert memory.take(10, generation) == []  # rows moved to disk meanwhile: read the table first
    memory.acked([p.seq for p in memory.peek()])
    assert len(memory) == 0


def test_storage_status_says_ok(tmp_path: Path) -> None:
    writer = StoreWriter(storage(tmp_path))
    status = writer.status()
    assert (status.state, status.detail, status.rows_pending) == ("ok", "event log ok", 0)
    assert set(status.as_dict()) >= {"state", "detail", "rows_pending", "rows_dropped", "clips_skipped"}
    writer.stop(1.0)


def _wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


@pytest.mark.slow
@pytest.mark.fault
def test_the_wal_shrinks_back_once_a_long_reader_ends(tmp_path: Path) -> None:
    config = storage(tmp_path)
    writer = StoreWriter(config)
    writer.start()
    reader = sqlite3.connect(config.database, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot: nothing can be reset
        detail = "x" * 40_000
        for i in range(300):
            writer.put(SourceStatus("n", "fan", SourceState.SILENT, f"{i} {detail}", utc_now()))
        assert writer.flush(120.0)
        grown = _wal_size(config.database)
        assert grown > 2 * JOURNAL_SIZE_LIMIT  # the reader pinned the WAL
        time.sleep(6.0)  # checkpoints run meanwhile, and still cannot get past the reader
        assert _wal_size(config.database) >= grown
    finally:
        reader.execute("COMMIT")
        reader.close()
    deadline = time.monotonic() + 30
    while _wal_size(config.database) > JOURNAL_SIZE_LIMIT:
        assert time.monotonic() < deadline, f"WAL still {_wal_size(config.database)} bytes"
        time.sleep(0.2)
    writer.put(event("after", "start", T0))
    assert writer.flush(10.0)
    assert _wal_size(config.database) <= JOURNAL_SIZE_LIMIT
    writer.stop(5.0)
    conn = sqlite3.connect(config.database)
    assert conn.execute("SELECT count(*) FROM source_status").fetchone() == (300,)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    print(
        f"WAL: {grown / 1e6:.1f} MB while a reader held it, back under {JOURNAL_SIZE_LIMIT / 1e6:.1f} MB after"
    )


LOCK_HOLD_S = 12.0  # longer than the 10 s busy timeout that used to drop the item


@pytest.mark.slow
@pytest.mark.fault
def test_a_write_that_meets_a_foreign_lock_is_kept_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = storage(tmp_path)
    outbox = Outbox(Topics("anomalyd", "edge1"), 10_000, Mutes())
    writer = StoreWriter(config, outbox)
    writer.start()
    other = sqlite3.connect(config.database, isolation_level=None)
    beats = []
    with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            released = time.monotonic() + LOCK_HOLD_S
            for n in range(20):
                writer.put(event(f"e{n:02d}", "start", T0 + dt.timedelta(minutes=n)))
                writer.put(event(f"e{n:02d}", "end", T0 + dt.timedelta(minutes=n)))
            while time.monotonic() < released:
                beats.append(time.monotonic() - writer.heartbeat)
                time.sleep(0.1)
            status = writer.status()
            assert status.state == "degraded"
            assert "locked" in status.detail
            assert status.rows_pending == 20  # an event's start and end are one row
            # 40 event messages, the newest last_event and the newest OFF: alerts are not held up
            assert len(outbox.memory) == 42
        finally:
            other.execute("ROLLBACK")
            other.close()
        deadline = time.monotonic() + 10
        while writer.status().state != "ok":
            assert time.monotonic() < deadline, writer.status().detail
            time.sleep(0.05)
    writer.stop(5.0)
    assert max(beats) < 2.0  # the writer never stalled on the lock
    rows = read_events(config.database)
    assert [(r["event_id"], r["state"]) for r in rows] == [(f"e{n:02d}", "closed") for n in range(20)]
    conn = sqlite3.connect(config.database)
    events = [
        json.loads(p) for (p,) in conn.execute("SELECT payload FROM outbox WHERE kind = 'event' ORDER BY id")
    ]
    assert [(e["event_id"], e["type"]) for e in events] == [
        (f"e{n:02d}", t) for n in range(20) for t in ("start", "end")
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # one when it began, one when it was over
    assert "cannot be written" in warnings[0]
    assert "writable again" in warnings[1]
