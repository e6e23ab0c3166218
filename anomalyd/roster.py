"""The configured streams as the store's writer learns them, at start and after each reload.

From the roster the writer restates each stream's mute state and duration (retained, so that a mute
switch is right from the start), and clears the Home Assistant discovery configs published earlier
that are no longer wanted: a stream removed from the config, discovery turned off. Which topics were
published, and the mute durations set at run time, are kept in the event log so that both outlive a
restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass, field

from anomalyd.backlog import DiscoveryRow, Row
from anomalyd.contract import Message, mute_message
from anomalyd.homeassistant import clearing_messages
from anomalyd.mutes import load_minutes
from anomalyd.outbox import Outbox

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roster:
    """The streams configured now, for the store's writer."""

    mute_minutes: dict[str, float]  # each stream's configured mute duration (the default)
    discovery: tuple[str, ...] = ()  # Home Assistant discovery topics wanted now; none when it is off


@dataclass
class RosterMemory:
    """What the event log remembers across restarts (loaded once; the writer keeps it current)."""

    discovered: set[str] = field(default_factory=set)
    minutes: dict[str, float] = field(default_factory=dict)  # set at run time, over the configured

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> RosterMemory:
        topics = {row[0] for row in conn.execute("SELECT topic FROM discovery")}
        return cls(topics, load_minutes(conn))


def apply_roster(
    roster: Roster, memory: RosterMemory, outbox: Outbox, now: dt.datetime
) -> tuple[list[Row], list[Message]]:
    """The rows and messages for a new roster (committed together by the writer)."""
    messages = []
    for stream, default in sorted(roster.mute_minutes.items()):
        minutes = memory.minutes.get(stream, default)
        outbox.mutes.set_minutes(stream, minutes)
        until = outbox.mutes.until(stream, now)
        messages.append(mute_message(outbox.topics, stream, until, now, minutes=minutes, reason="restored"))
    wanted = set(roster.discovery)
    stale = sorted(memory.discovered - wanted)
    if stale:
        logger.info("Home Assistant: clearing %d discovery config(s) no longer wanted", len(stale))
    messages += clearing_messages(stale)
    memory.discovered = wanted
    return [DiscoveryRow(tuple(sorted(wanted)), tuple(stale), now)], messages
