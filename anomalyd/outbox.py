"""The MQTT outbox: what the store's writer records becomes MQTT messages, in the same transaction.

Messages wait in the `outbox` table, in order, until the broker acknowledges them. When the event log
cannot be written (a full disk, a foreign lock) they wait in memory instead (`MemoryOutbox`), which the
publisher sends after the table's rows, so that alerts still go out; once the disk is writable again
the writer moves what is left of them into the table, before anything newer.

This module also decides what a subscriber is told about events under a mute: a mute holds back the
start (and updates) of events that begin while it lasts; the end and `OFF` of an event whose `ON` went
out are always sent; when the mute ends while such an event is still open, it is announced then.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
from collections import deque
from dataclasses import dataclass, replace

from anomalyd.clipfiles import clip_name
from anomalyd.config import ClipsConfig
from anomalyd.contract import (
    ClipRef,
    Message,
    Topics,
    event_messages,
    on_off_message,
    score_message,
    source_message,
    state_message,
)
from anomalyd.mutes import Mutes
from anomalyd.records import AlarmState, AnomalyEvent, ScoreReport, SourceStatus, iso, utc_now
from anomalyd.throttle import Throttle

logger = logging.getLogger(__name__)

# What an outbox gives up first when full; events only when nothing else is left.
DROP_ORDER = ("score", "source", "state", "mute", "discovery", "event")
# Kinds where only the newest undelivered message of a topic matters (retained state, latest score).
# Mute acknowledgements are not among them: each command gets its own answer.
SUPERSEDED_KINDS = ("score", "source", "state")
MEMORY_MESSAGES = 10_000  # messages kept in memory while the event log cannot be written
FULL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Delivered:
    """Outbox rows the broker has acknowledged."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Pending:
    """A message waiting in memory; `created_at` decides whether it is a replay when it goes out."""

    seq: int
    message: Message
    created_at: str


class MemoryOutbox:
    """Messages whose rows could not be written yet (thread-safe: the writer adds, the publisher sends)."""

    def __init__(self, limit: int = MEMORY_MESSAGES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._queue: deque[Pending] = deque()  # not handed to the broker on this connection
        self._inflight: dict[int, Pending] = {}  # handed over, not yet acknowledged
        self._seq = 0
        self.generation = 0  # counts moves onto disk: a sender that read the table before one must not
        # send newer messages from memory ahead of the rows that move brought
        self.dropped: dict[str, int] = dict.fromkeys(DROP_ORDER, 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._inflight)

    def put(self, messages: list[Message], created_at: str) -> int:
        """Queue messages (superseding older queued ones of retained kinds); returns how many were dropped
        to stay within the limit."""
        with self._lock:
            for m in messages:
                if m.kind in SUPERSEDED_KINDS:
                    kept = [
                        p
                        for p in self._queue
                        if not (p.message.kind == m.kind and p.message.topic == m.topic)
                    ]
                    if len(kept) != len(self._queue):
                        self._queue = deque(kept)
                self._seq += 1
                self._queue.append(Pending(self._seq, m, created_at))
            return self._bound()

    def _bound(self) -> int:
        excess = len(self._queue) + len(self._inflight) - self.limit
        dropped = 0
        for kind in DROP_ORDER:
            if excess <= 0:
                break
            doomed = {p.seq for p in self._queue if p.message.kind == kind}
            doomed = set(sorted(doomed)[:excess])
            if doomed:
                self._queue = deque(p for p in self._queue if p.seq not in doomed)
                self.dropped[kind] += len(doomed)
                excess -= len(doomed)
                dropped += len(doomed)
        return dropped

    def take(self, count: int, generation: int | None = None) -> list[Pending]:
        """The oldest `count` messages not yet handed over; they are in flight until acked or requeued.
        Nothing if messages moved onto disk since the caller read `generation` (it reads the table again)."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return []
            out: list[Pending] = []
            while self._queue and len(out) < count:
                pending = self._queue.popleft()
                self._inflight[pending.seq] = pending
                out.append(pending)
            return out

    def acked(self, seqs: list[int]) -> None:
        with self._lock:
            for seq in seqs:
                self._inflight.pop(seq, None)

    def requeue(self) -> None:
        """The connection dropped: what was in flight goes out again first, in order."""
        with self._lock:
            back = sorted(self._inflight.values(), key=lambda p: p.seq)
            self._inflight.clear()
            self._queue.extendleft(reversed(back))

    def peek(self) -> list[Pending]:
        """Everything waiting, in flight included, oldest first (for the writer to move onto disk)."""
        with self._lock:
            return sorted([*self._inflight.values(), *self._queue], key=lambda p: p.seq)

    def remove(self, seqs: set[int]) -> None:
        """These are on disk now; one still in flight may go out twice (delivery is at least once)."""
        with self._lock:
            self.generation += 1
            self._queue = deque(p for p in self._queue if p.seq not in seqs)
            for seq in seqs:
                self._inflight.pop(seq, None)


@dataclass
class _Open:
    """An open event as the outbox last saw it, and whether its start was published."""

    last: AnomalyEvent
    published: bool


class Outbox:
    """Turns what the writer records into MQTT messages, and keeps them within a bound."""

    def __init__(
        self,
        topics: Topics,
        max_messages: int,
        mutes: Mutes,
        memory_messages: int = MEMORY_MESSAGES,
        clips: ClipsConfig | None = None,
    ) -> None:
        self.topics = topics
        self.clips = clips  # the end of an event names its clip when clips are saved (the service updates it)
        self.max_messages = max_messages
        self.mutes = mutes
        self.memory = MemoryOutbox(min(max_messages, memory_messages))
        self.dropped: dict[str, int] = dict.fromkeys(DROP_ORDER, 0)
        self.muted = 0  # event messages held back by mutes
        self._open: dict[str, _Open] = {}
        self._full_log = Throttle(FULL_LOG_INTERVAL_S)

    # ---- what to publish ---------------------------------------------------------------------------

    def messages(
        self, item: AnomalyEvent | SourceStatus | ScoreReport | AlarmState, now: dt.datetime | None = None
    ) -> list[Message]:
        if isinstance(item, SourceStatus):
            return [source_message(self.topics, item)]
        if isinstance(item, ScoreReport):
            return [score_message(self.topics, item)]  # scores flow while muted: they announce nothing
        if isinstance(item, AlarmState):
            return [on_off_message(self.topics, item.stream, self._announced(item))]
        return self.for_event(item, now or utc_now())[0]

    def for_event(self, event: AnomalyEvent, now: dt.datetime) -> tuple[list[Message], bool]:
        """The messages for one event message, and whether the event's start is now published."""
        entry = self._open.get(event.event_id)
        muted = self.mutes.until(event.stream, now) is not None
        if event.type == "start":
            published = False
        elif entry is not None:
            published = entry.published
        else:  # an event this outbox never saw begin (a tool writing updates): pass it on as it is
            published = not muted
        out: list[Message] = []
        if published:
            out += self._event_messages(event)
            if event.type == "end":
                out.append(state_message(self.topics, event))
        elif muted:
            self.muted += 1
        else:
            # Not muted (any more): the subscriber learns of the event now, with a start and ON.
            start = event if event.type == "start" else self._as_start(event, event.at)
            out += [*self._event_messages(start), state_message(self.topics, start)]
            published = True
            if event.type == "end":
                out += [*self._event_messages(event), state_message(self.topics, event)]
        if event.type == "end":
            self._open.pop(event.event_id, None)
        else:
            self._open[event.event_id] = _Open(event, published)
        return out, published

    def lifted(self, stream: str, now: dt.datetime) -> tuple[list[Message], list[AnomalyEvent]]:
        """A mute of `stream` ended: announce its events that are open but unannounced. Returns the
        messages and those events (whose rows the writer marks published)."""
        out: list[Message] = []
        events: list[AnomalyEvent] = []
        if self.mutes.until(stream, now) is not None:
            return out, events
        for entry in self._open.values():
            if entry.last.stream == stream and not entry.published:
                start = self._as_start(entry.last, now)
                out += [*self._event_messages(start), state_message(self.topics, start)]
                entry.published = True
                events.append(entry.last)
        return out, events

    def _event_messages(self, event: AnomalyEvent) -> list[Message]:
        """An event's messages; its end names the clip that is being written for it."""
        clips = self.clips
        clip = None
        if event.type == "end" and clips is not None and clips.enabled:
            file = clip_name(event.stream, event.started_at, event.event_id)
            clip = ClipRef(file, f"{clips.base_url.rstrip('/')}/{file}" if clips.base_url else None)
        return event_messages(self.topics, event, clip=clip)

    @staticmethod
    def _as_start(event: AnomalyEvent, at: dt.datetime) -> AnomalyEvent:
        return replace(event, type="start", reason="", ended_at=None, at=at)

    def _announced(self, state: AlarmState) -> bool:
        """The state to publish: ON only for an open event whose start went out (or is unknown here)."""
        mine = [key for key, entry in self._open.items() if entry.last.stream == state.stream]
        if not state.on:
            for key in mine:  # the pipeline has no open event there: nothing left to end
                del self._open[key]
            return False
        return not mine or any(self._open[key].published for key in mine)

    # ---- the table ---------------------------------------------------------------------------------

    def add(self, conn: sqlite3.Connection, messages: list[Message], created_at: str | None = None) -> None:
        """Insert (inside the caller's transaction), replacing superseded messages of the same topic."""
        when = created_at or iso(utc_now()) or ""
        self._insert(conn, [(m, when) for m in messages])

    def add_pending(self, conn: sqlite3.Connection, pending: list[Pending]) -> None:
        """Messages that waited in memory, with their original creation times."""
        self._insert(conn, [(p.message, p.created_at) for p in pending])

    def _insert(self, conn: sqlite3.Connection, messages: list[tuple[Message, str]]) -> None:
        for m, created_at in messages:
            if m.kind in SUPERSEDED_KINDS:
                conn.execute("DELETE FROM outbox WHERE topic = ? AND kind = ?", [m.topic, m.kind])
            conn.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, kind, event_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [m.topic, m.payload, m.qos, int(m.retain), m.kind, m.event_id, created_at],
            )
        if messages:
            self._bound(conn)

    def _bound(self, conn: sqlite3.Connection) -> None:
        excess = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0]) - self.max_messages
        for kind in DROP_ORDER:
            if excess <= 0:
                return
            cursor = conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?)",
                [kind, excess],
            )
            if cursor.rowcount:
                self.dropped[kind] += cursor.rowcount
                excess -= cursor.rowcount
                if self._full_log.ready():
                    logger.warning(
                        "MQTT outbox full (%d messages): dropping the oldest %s messages first; dropped so "
                        "far: %s%s",
                        self.max_messages, kind,
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n),
                        self._full_log.take_suppressed(),
                    )  # fmt: skip
