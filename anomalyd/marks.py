"""Marking an event a false alarm: the event log records it, and its clip joins the stream's normal audio.

`mark_normal` is the one function that does it, given the event log's connection and the normal-audio
folder: the daemon's store writer calls it (the daemon is the only writer while it runs) for an MQTT
command or a control-channel request (`MarkOp`, which `anomalyd events mark` sends to a running daemon),
and `anomalyd events mark` calls it directly on the database when no daemon runs (WAL lets it). The
clip is copied (temp file + rename) into `<normal_dir>/<stream>/`, which retraining takes as an extra
`--normal` folder; the copy is outside the clip quota, so it survives when the clip itself is later
deleted to keep clips under their quota. A marked event is never removed by retention.

Command payloads (MQTT `<prefix>/<node>/<stream>/event/mark`) are parsed strictly, like mute commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anomalyd.answer import Answer
from anomalyd.control import Connection, Reply, Request
from anomalyd.database import transaction
from anomalyd.errors import CommandError, ControlError, MarkError
from anomalyd.records import iso, utc_now

MAX_NOTE_CHARS = 500
MAX_MARK_BYTES = 64  # an event id is 32 hex digits
MIN_ID_PREFIX = 8  # `anomalyd events` shows the first 8 digits; a shorter prefix is too easily ambiguous
_EVENT_ID = re.compile(r"[0-9a-f]{8,32}")


def parse_event_id(text: str) -> str:
    """An event id or a unique-enough prefix of one: 8 to 32 lowercase hexadecimal digits."""
    value = text.strip().lower()
    if not _EVENT_ID.fullmatch(value):
        raise CommandError(f"expected an event id: {MIN_ID_PREFIX} to 32 hexadecimal digits")
    return value


def parse_mark_command(payload: bytes) -> str:
    """The event id of an `event/mark` payload: ASCII, at most MAX_MARK_BYTES, 8-32 hex digits."""
    if len(payload) > MAX_MARK_BYTES:
        raise CommandError(f"longer than {MAX_MARK_BYTES} bytes")
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError("not ASCII text") from None
    if not text.strip():
        raise CommandError("empty")
    return parse_event_id(text)


@dataclass(frozen=True)
class MarkCommand:
    """A mark for the store's writer, from MQTT (`stream` is the topic's) or the control channel
    (`stream` None: any stream's event). `refused` says why when parsing already refused it; `answer`,
    when given, is told the outcome (the Marked record, or None and the reason) from the writer's thread."""

    stream: str | None
    event_id: str
    at: dt.datetime
    refused: str = ""
    note: str = ""
    answer: Callable[[Marked | None, str], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Marked:
    """What marking did: the event, its stream, the copy of its clip, and whether it was marked before."""

    event_id: str
    stream: str
    normal_clip: Path
    marked_at: str
    already: bool


def _find(conn: sqlite3.Connection, event_id: str) -> sqlite3.Row:
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT event_id, stream, state, clip_path, marked_normal_at, normal_clip_path FROM events "
            "WHERE event_id >= ? AND event_id < ? LIMIT 2",
            [event_id, event_id + "g"],  # 'g' sorts after every hex digit: a prefix range
        ).fetchall()
    finally:
        conn.row_factory = None
    if not rows:
        raise MarkError(f"event {event_id}: no such event in the event log")
    if len(rows) > 1:
        raise MarkError(f"event {event_id}: more than one event starts with it; give more digits")
    row: sqlite3.Row = rows[0]
    return row


def _owner_of(folder: Path) -> tuple[int, int] | None:
    """Root gives what it creates to the owner of `folder` (the daemon's user); others need not."""
    if os.geteuid() != 0:
        return None
    st = folder.stat()
    return st.st_uid, st.st_gid


def _mkdirs(folder: Path, owner: tuple[int, int] | None) -> None:
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):
        created.mkdir(mode=0o755)
        if owner is not None:
            os.chown(created, *owner)


def _copy_clip(clip: Path, target: Path, owner: tuple[int, int] | None) -> None:
    _mkdirs(target.parent, owner)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(clip, tmp)
        tmp.chmod(0o644)
        if owner is not None:
            os.chown(tmp, *owner)
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def mark_normal(
    conn: sqlite3.Connection,
    event_id: str,
    normal_dir: Path,
    at: dt.datetime,
    *,
    note: str = "",
    stream: str | None = None,
    owner_of: Path | None = None,
) -> Marked:
    """Mark the event `event_id` (or a unique prefix) a false alarm: copy its clip into
    `normal_dir/<stream>/`, then record `marked_normal_at`, the note and the copy in one transaction.

    Idempotent: an event marked before is returned with `already` set and nothing changes. `stream`,
    when given (an MQTT command's topic), must be the event's. `owner_of`: when run as root, files and
    folders created belong to this folder's owner (the database folder: the daemon's user). Raises
    MarkError (one line) for an unknown or ambiguous id, an open event, an event without a clip on disk.
    """
    if len(note) > MAX_NOTE_CHARS:
        raise MarkError(f"note: {len(note)} characters; at most {MAX_NOTE_CHARS}")
    row = _find(conn, parse_event_id(event_id))
    full_id, event_stream = row["event_id"], row["stream"]
    if stream is not None and stream != event_stream:
        raise MarkError(f"event {full_id}: belongs to stream {event_stream}, not {stream}")
    if row["marked_normal_at"]:
        return Marked(
            full_id, event_stream, Path(row["normal_clip_path"] or ""), row["marked_normal_at"], True
        )
    if row["state"] != "closed":
        raise MarkError(f"event {full_id}: still open; mark it once it has ended and its clip is saved")
    if not row["clip_path"]:
        raise MarkError(
            f"event {full_id}: has no clip (clips off, the disk short, or deleted by the clip quota)"
        )
    clip = Path(row["clip_path"])
    if not clip.is_file():
        raise MarkError(f"event {full_id}: its clip {clip} is gone (deleted by the clip quota?)")
    target = normal_dir / event_stream / clip.name
    owner = _owner_of(owner_of) if owner_of is not None else None
    try:
        _copy_clip(clip, target, owner)
    except OSError as exc:
        raise MarkError(f"event {full_id}: cannot copy its clip to {target} ({exc.strerror or exc})") from exc
    marked_at = iso(at) or ""
    with transaction(conn):
        conn.execute(
            "UPDATE events SET marked_normal_at = ?, mark_note = ?, normal_clip_path = ? WHERE event_id = ?",
            [marked_at, note or None, str(target), full_id],
        )
    return Marked(full_id, event_stream, target, marked_at, False)


def give_to_folder_owner(database: Path) -> None:
    """Root opening the event log creates its -wal and -shm files; the daemon's user must keep
    writing them, so they go to the database folder's owner."""
    owner = _owner_of(database.parent)
    if owner is None:
        return
    for suffix in ("-wal", "-shm"):
        path = Path(f"{database}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_uid == 0:
                os.chown(path, *owner)


MARK_WAIT_S = 10.0  # how long a control-channel or dashboard mark waits for the store's writer


def submit_mark(put: Callable[[MarkCommand], None], event_id: str, note: str) -> tuple[Marked | None, str]:
    """Hand a mark to the store's writer (the event log's one writer) and wait for what it did:
    (Marked, "") or (None, the reason it was refused)."""
    answer: Answer[Marked | None] = Answer()
    put(MarkCommand(None, event_id, utc_now(), note=note, answer=answer))
    outcome = answer.wait(MARK_WAIT_S)
    if outcome is None:
        return None, f"the event log did not answer within {MARK_WAIT_S:g} s; try again"
    return outcome


class MarkOp:
    """`{"op": "mark", "event_id": ID, "note": TEXT}` on the control channel: marked by the store's writer
    (the only writer of the event log while the daemon runs), answered with what `mark_normal` did."""

    def __init__(self, put: Callable[[MarkCommand], None]) -> None:
        self._put = put

    def __call__(self, request: Request, connection: Connection) -> Reply:
        event_id, note = request.get("event_id"), request.get("note", "")
        if not isinstance(event_id, str) or not isinstance(note, str):
            raise ControlError('a mark request is {"op": "mark", "event_id": ID, "note": TEXT}')
        try:
            event_id = parse_event_id(event_id)
        except CommandError as exc:
            raise ControlError(f"event id {event_id[:40]!r}: {exc}") from exc
        if len(note) > MAX_NOTE_CHARS:
            raise ControlError(f"note: {len(note)} characters; at most {MAX_NOTE_CHARS}")
        marked, refused = submit_mark(self._put, event_id, note)
        if marked is None:
            raise ControlError(refused)
        return {
            "ok": True, "event_id": marked.event_id, "stream": marked.stream, "marked_at": marked.marked_at,
            "normal_clip": str(marked.normal_clip), "already": marked.already,
        }  # fmt: skip
