"""What the web side may know and do of the running daemon: typed snapshots and two writes.

The daemon implements `DaemonView` (anomalyd/live.py); the web side never touches the pipeline, the
store's writer or the publisher directly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anomalyd.marks import Marked
from anomalyd.store import StoreStatus


@dataclass(frozen=True)
class StreamState:
    """One stream now."""

    name: str
    area: str
    source: str  # ok / silent / clipping / lost / ended / invalid / unknown (not yet opened)
    source_detail: str
    event_open: bool
    event_id: str | None  # the open event
    score: float | None  # the latest window's score; None before the first
    threshold: float
    k: float | None  # None with an absolute threshold
    lag_seconds: float | None
    lagging: bool
    model_id: str
    muted_until: dt.datetime | None
    windows_scored: int
    windows_silent: int
    events_total: int  # events started since the daemon started


@dataclass(frozen=True)
class NodeState:
    """The daemon now: what the dashboard's header, /metrics and /healthz say."""

    node: str
    at: dt.datetime
    streams: tuple[StreamState, ...]
    mqtt: str | None  # link state; None without MQTT
    storage: StoreStatus
    store_write_failures: int
    blocks_dropped: int
    windows_scored: int
    workers: int  # worker threads scoring the streams
    window_latency: tuple[float, float] | None  # p50, p99 seconds over the recent windows; None before any
    events_version: int  # changes whenever what an events list shows changes
    stalled: tuple[str, ...]  # threads the watchdog would call stalled; empty when healthy
    stopping: bool


class RefusedError(Exception):
    """A mute or mark the daemon refused; the message is the one-line reason, `status` the HTTP status."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class DaemonView(Protocol):
    database: Path  # the event log, read read-only
    history_seconds: float  # how much of each stream's scores `trail` keeps

    @property
    def clips(self) -> Path:
        """The clip folder: nothing outside it is served."""
        ...

    def state(self) -> NodeState: ...

    def trail(self, stream: str, after: float) -> list[tuple[float, float]]:
        """(Unix seconds, score) of the stream's windows scored after `after`, oldest first."""
        ...

    def stream_details(self, stream: str) -> dict[str, Any] | None:
        """The stream's configuration and its bundle's facts (`bundle info`); None: no such stream."""
        ...

    def logmel(self, stream: str) -> Any | None:
        """The stream's log-mel front end (anomalyd.features.LogMel), for spectrograms; None: unknown."""
        ...

    def outbox_backlog(self) -> int:
        """MQTT messages waiting for the broker (a database read)."""
        ...

    def mute(self, stream: str, seconds: float) -> dt.datetime | None:
        """Mute the stream's new alerts for `seconds` (0: unmute); returns when the mute ends.
        Raises RefusedError."""
        ...

    def mark(self, event_id: str, note: str) -> Marked:
        """Mark an event a false alarm (its clip joins the stream's normal audio). Raises RefusedError."""
        ...
