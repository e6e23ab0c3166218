"""Muting a stream's alerts for a while (maintenance): the command's strict parser, the shared mute
table in memory, and its copy in the event log so that a mute outlives a restart.

A mute command arrives on the MQTT thread, which only parses it into a MuteCommand for the store's
writer; the writer persists it, updates `Mutes` and queues the acknowledgement in one transaction.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
from dataclasses import dataclass

from anomalyd.errors import CommandError
from anomalyd.records import iso

MAX_MUTE_SECONDS = 7 * 24 * 3600  # 604800: a week; a longer silence is a decision, not maintenance
MAX_COMMAND_BYTES = 32  # "604800.000" fits many times over; anything longer is not a command
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # plain decimal: no sign, exponent, inf or nan
UNMUTE = "off"


def parse_mute_command(payload: bytes) -> float:
    """Seconds to mute from a `mute/set` payload, 0.0 to unmute (`off` or `0`).

    Accepted: ASCII, at most MAX_COMMAND_BYTES, surrounding white space ignored, a plain decimal number
    of seconds from 0 to MAX_MUTE_SECONDS, or `off` (any case). Anything else raises CommandError
    whose message is the short reason sent back to the sender.
    """
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"longer than {MAX_COMMAND_BYTES} bytes")
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CommandError("not ASCII text") from None
    if not text:
        raise CommandError("empty")
    if text.lower() == UNMUTE:
        return 0.0
    if not _SECONDS.fullmatch(text):
        raise CommandError("expected a number of seconds or 'off'")
    seconds = float(text)  # at most 32 digits: always finite
    if seconds > MAX_MUTE_SECONDS:
        raise CommandError(f"more than {MAX_MUTE_SECONDS} s (7 days)")
    return seconds


@dataclass(frozen=True)
class MuteCommand:
    """A parsed command for the store's writer: mute `stream` for `seconds` (0: unmute), or, when
    `refused` says why, only acknowledge it with the current state."""

    stream: str
    seconds: float
    at: dt.datetime
    refused: str = ""


class Mutes:
    """Streams whose new alerts are not published until a time (read by the writer's outbox; shared)."""

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

    def expired(self, now: dt.datetime) -> list[str]:
        """Streams whose mute has run out but is still in the table (the writer acknowledges them)."""
        with self._lock:
            return sorted(s for s, until in self._until.items() if until <= now)

    def active(self) -> dict[str, dt.datetime]:
        with self._lock:
            return dict(self._until)


def save_mute(conn: sqlite3.Connection, stream: str, until: dt.datetime | None, at: dt.datetime) -> None:
    """Record a mute (or its end) in the event log, inside the caller's transaction."""
    if until is None:
        conn.execute("DELETE FROM mutes WHERE stream = ?", [stream])
    else:
        conn.execute(
            "INSERT INTO mutes (stream, until, set_at) VALUES (?, ?, ?) "
            "ON CONFLICT(stream) DO UPDATE SET until = excluded.until, set_at = excluded.set_at",
            [stream, iso(until), iso(at)],
        )


def load_mutes(conn: sqlite3.Connection) -> dict[str, dt.datetime]:
    """The mutes kept in the event log, expired ones included (the caller acknowledges those)."""
    rows = conn.execute("SELECT stream, until FROM mutes").fetchall()
    return {stream: dt.datetime.fromisoformat(until) for stream, until in rows}
