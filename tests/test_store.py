"""The event log: real SQLite files, migrations, the writer thread, retention, clips under a quota."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from anomalyd.config import ClipsConfig, StorageConfig
from anomalyd.records import AnomalyEvent, ClipJob, SourceState, SourceStatus, utc_now
from anomalyd.store import (
    SCHEMA_VERSION,
    StoreError,
    StoreWriter,
    apply_retention,
    open_database,
    read_events,
    save_clip,
)
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

    huge_floor = ClipsConfig(directory=directory, min_free_mb=1e12)
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
