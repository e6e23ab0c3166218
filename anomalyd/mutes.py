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
from collections.abc import Callable
from dataclasses import dataclass, field

from anomalyd.errors import CommandError
from anomalyd.records import iso

MAX_MUTE_SECONDS = 7 * 24 * 3600  # 604800: a week; a longer silence is a decision, not maintenance
MAX_COMMAND_BYTES = 32  # "604800.000" fits many times over; anything longer is not a command
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # plain decimal: no sign, exponent, inf or nan
MAX_MUTE_MINUTES = MAX_MUTE_SECONDS // 60
UNMUTE = "off"
MUTE = "on"  # for the stream's mute duration (Home Assistant's switch sends it)


def _command_text(payload: bytes) -> str:
    """A command payload as text: ASCII, at most MAX_COMMAND_BYTES, surrounding white space ignored."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"longer than {MAX_COMMAND_BYTES} bytes")
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CommandError("not ASCII text") from None
    if not text:
        raise CommandError("empty")
    return text


def parse_mute_command(payload: bytes) -> float | None:
    """Seconds to mute from a `mute/set` payload, 0.0 to unmute (`off` or `0`), None for `on` (the
    stream's mute duration).

    Accepted: ASCII, at most MAX_COMMAND_BYTES, surrounding white space ignored, a plain decimal number
    of seconds from 0 to MAX_MUTE_SECONDS, `on` or `off` (any case). Anything else raises CommandError
    whose message is the short reason sent back to the sender.
    """
    text = _command_text(payload)
    if text.lower() == UNMUTE:
        return 0.0
    if text.lower() == MUTE:
        return None
    if not _SECONDS.fullmatch(text):
        raise CommandError("expected a number of seconds, 'on' or 'off'")
    seconds = float(text)  # at most 32 digits: always finite
    if seconds > MAX_MUTE_SECONDS:
        raise CommandError(f"more than {MAX_MUTE_SECONDS} s (7 days)")
    return seconds


def parse_minutes_command(payload: bytes) -> float:
    """The stream's new mute duration in minutes from a `mute/minutes/set` payload: a plain decimal
    from 1 to MAX_MUTE_MINUTES (a week). Anything else raises CommandError with the short reason."""
    text = _command_text(payload)
    if not _SECONDS.fullmatch(text):
        raise CommandError("expected a number of minutes")
    minutes = float(text)
    if not 1 <= minutes <= MAX_MUTE_MINUTES:
        raise CommandError(f"expected 1 to {MAX_MUTE_MINUTES} minutes")
    return minutes


@dataclass(frozen=True)
class MuteCommand:
    """A parsed command for the store's writer: mute `stream` for `seconds` (0: unmute; None: for the
    stream's mute duration), or, when `refused` says why, only acknowledge it with the current state.
    `answer`, when given, is told the outcome from the writer's thread: (muted until or None, refusal)."""

    stream: str
    seconds: float | None
    at: dt.datetime
    refused: str = ""
    answer: Callable[[dt.datetime | None, str], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MinutesCommand:
    """A parsed command for the store's writer: `stream`'s mute duration becomes `minutes`, or, when
    `refused` says why, only acknowledge it with the current state."""

    stream: str
    minutes: float
    at: dt.datetime
    refused: str = ""


class Mutes:
    """Streams whose new alerts are not published until a time (read by the writer's outbox; shared)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, dt.datetime] = {}
        self._minutes: dict[str, float] = {}  # each stream's mute duration, where it is known

    def set_minutes(self, stream: str, minutes: float) -> None:
        with self._lock:
            self._minutes[stream] = minutes

    def minutes(self, stream: str) -> float | None:
        with self._lock:
            return self._minutes.get(stream)

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


def save_minutes(conn: sqlite3.Connection, stream: str, minutes: float, at: dt.datetime) -> None:
    """Record a stream's mute duration set at run time, inside the caller's transaction."""
    conn.execute(
        "INSERT INTO mute_minutes (stream, minutes, set_at) VALUES (?, ?, ?) "
        "ON CONFLICT(stream) DO UPDATE SET minutes = excluded.minutes, set_at = excluded.set_at",
        [stream, minutes, iso(at)],
    )


def load_minutes(conn: sqlite3.Connection) -> dict[str, float]:
    """The mute durations set at run time (they outlive restarts; the config's are the defaults)."""
    rows = conn.execute("SELECT stream, minutes FROM mute_minutes").fetchall()
    return {stream: float(minutes) for stream, minutes in rows}
