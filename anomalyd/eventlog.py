"""`anomalyd events`: the event log as a table, CSV or JSON, optionally followed as it grows."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from anomalyd.config import DEFAULT_CONFIG, load_config
from anomalyd.control import ControlClient
from anomalyd.database import open_database
from anomalyd.errors import AnomalydError, MarkError
from anomalyd.marks import MARK_WAIT_S, Marked, give_to_folder_owner, mark_normal
from anomalyd.records import utc_now
from anomalyd.store import EVENT_COLUMNS, read_events

FOLLOW_POLL_S = 1.0
TABLE = (  # (column, heading, width)
    ("started_at", "started (UTC)", 23),
    ("ended_at", "ended (UTC)", 23),
    ("stream", "stream", 12),
    ("state", "state", 6),
    ("peak_score", "peak", 8),
    ("mean_score", "mean", 8),
    ("threshold", "threshold", 9),
    ("windows_over", "over", 5),
    ("end_reason", "reason", 12),
    ("event_id", "event", 8),
)
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> dt.datetime:
    """'30m', '12h', '7d' (ago), or an ISO 8601 time (UTC if it has no offset)."""
    age = _AGE.match(text.strip())
    if age:
        return utc_now() - dt.timedelta(seconds=float(age[1]) * _UNIT_S[age[2]])
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise AnomalydError(
            f"--since {text!r}: expected an age like 30m, 12h, 7d or an ISO 8601 time"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table_row(row: dict[str, Any]) -> str:
    cells = []
    for key, _, width in TABLE:
        text = _cell(row[key]).replace("+00:00", "")
        cells.append(text[:width].ljust(width))
    return "  ".join(cells).rstrip()


class _Printer:
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._csv = csv.DictWriter(sys.stdout, fieldnames=list(EVENT_COLUMNS)) if fmt == "csv" else None
        self._started = False

    def rows(self, rows: list[dict[str, Any]], final: bool) -> None:
        if self.fmt == "json" and final:
            print(json.dumps(rows, indent=2))
            return
        if not self._started:
            self._started = True
            if self._csv is not None:
                self._csv.writeheader()
            elif self.fmt == "table":
                print("  ".join(h.ljust(w) for _, h, w in TABLE).rstrip())
        for row in rows:
            if self.fmt == "json":
                print(json.dumps(row))  # one object per line while following
            elif self._csv is not None:
                self._csv.writerow(row)
            else:
                print(_table_row(row))
        sys.stdout.flush()


def show_events(args: argparse.Namespace) -> int:
    """Print the events; errors raise AnomalydError (the CLI makes them one line and exit 2)."""
    database: Path = args.database or load_config(args.config or DEFAULT_CONFIG).storage.database
    since = parse_since(args.since) if args.since else None
    rows = read_events(database, since, args.stream)
    printer = _Printer(args.format)
    printer.rows(rows, final=not args.follow)
    if not args.follow:
        return 0
    seen = {(r["event_id"], r["updated_at"]) for r in rows}
    last = max((r["updated_at"] for r in rows), default="")
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            fresh = [
                r
                for r in read_events(database, since, args.stream, updated_after=last or None)
                if (r["event_id"], r["updated_at"]) not in seen
            ]
            seen |= {(r["event_id"], r["updated_at"]) for r in fresh}
            last = max([last, *(r["updated_at"] for r in fresh)])
            printer.rows(fresh, final=False)
    except KeyboardInterrupt:
        return 0


def mark_event(args: argparse.Namespace) -> int:
    """`events mark ID --normal`: by the running daemon when one listens on the config's control socket
    (its store writer is the event log's one writer), otherwise on the database directly (WAL allows it).

    The normal-audio folder is the config's `storage.normal_dir`, or `normal` beside the database.
    Run as root, whatever it creates belongs to the database folder's owner (the daemon's user).
    """
    if not args.normal:
        raise MarkError("events mark: say what the event was: --normal (a false alarm)")
    if args.event_id is None:
        raise MarkError("events mark: which event? give its id (see `anomalyd events`)")
    marked: Marked | None
    if args.database is not None:
        marked = _mark_in(args.database, args.database.resolve().parent / "normal", args)
    else:
        config = load_config(args.config or DEFAULT_CONFIG)
        marked = _mark_by_daemon(config.control.socket, args)
        if marked is None:
            marked = _mark_in(config.storage.database, config.storage.normal_folder, args)
    if marked.already:
        print(f"event {marked.event_id} was already marked a false alarm ({marked.marked_at}); its clip: "
              f"{marked.normal_clip}")  # fmt: skip
    else:
        print(f"event {marked.event_id} ({marked.stream}) marked a false alarm; its clip joins the normal "
              f"audio: {marked.normal_clip}")  # fmt: skip
    return 0


def _mark_in(database: Path, normal_dir: Path, args: argparse.Namespace) -> Marked:
    if not database.is_file():
        raise MarkError(f"{database}: no event database (has the daemon run with this config?)")
    db = open_database(database)
    try:
        give_to_folder_owner(database)
        note = args.note or ""
        return mark_normal(db.conn, args.event_id, normal_dir, utc_now(), note=note, owner_of=database.parent)
    finally:
        db.close()


def _mark_by_daemon(socket_path: Path, args: argparse.Namespace) -> Marked | None:
    """The running daemon's answer, or None when no daemon listens on `socket_path`."""
    client = ControlClient.connect(socket_path)
    if client is None:
        return None
    try:
        client.send({"op": "mark", "event_id": args.event_id, "note": args.note or ""})
        reply = client.receive(MARK_WAIT_S + 5.0)
    except (OSError, TimeoutError) as exc:
        raise MarkError(f"the daemon at {socket_path} did not answer the mark ({exc})") from exc
    finally:
        client.close()
    if reply is None or reply.get("ok") is not True:
        error = reply.get("error", reply) if reply is not None else "it closed the connection"
        raise MarkError(f"the daemon refused: {error}")
    try:
        return Marked(str(reply["event_id"]), str(reply["stream"]), Path(str(reply["normal_clip"])),
                      str(reply["marked_at"]), bool(reply["already"]))  # fmt: skip
    except KeyError as exc:
        raise MarkError(f"the daemon's answer lacks {exc}: {reply}") from exc
