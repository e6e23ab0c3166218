"""The dashboard's live picture: every stream's state as JSON, and the server-sent event stream that
pushes it about once a second with only the scores that are new to that client."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

from anomalyd import __version__
from anomalyd.records import iso
from anomalyd.web.view import DaemonView, NodeState, StreamState

LIVE_INTERVAL_S = 1.0  # how often the live stream pushes
STOP_CHECKS = 10  # times per push interval a live stream looks whether the daemon stops
MAX_LIVE_CLIENTS = 32  # open dashboards at once; more are told to try later


def number(value: float | None, digits: int = 6) -> float | None:
    """A finite number rounded to `digits` significant digits, else None (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def stream_json(s: StreamState) -> dict[str, Any]:
    return {
        "name": s.name, "area": s.area, "source": s.source, "source_detail": s.source_detail,
        "event_open": s.event_open, "event_id": s.event_id, "score": number(s.score),
        "threshold": number(s.threshold), "k": s.k, "lag_seconds": number(s.lag_seconds, 3),
        "lagging": s.lagging, "model_id": s.model_id, "muted_until": iso(s.muted_until),
        "windows_scored": s.windows_scored, "events_total": s.events_total,
    }  # fmt: skip


def health_json(state: NodeState) -> dict[str, Any]:
    status = "stopping" if state.stopping else "stalled" if state.stalled else "ok"
    return {"status": status, "stalled": list(state.stalled)}


def overview_json(view: DaemonView, state: NodeState, writes: bool) -> dict[str, Any]:
    """/api/overview without the scores (the caller adds them per stream)."""
    return {
        "node": state.node,
        "version": __version__,
        "now": iso(state.at),
        "writes": writes,
        "history_seconds": view.history_seconds,
        "events_version": state.events_version,
        "health": health_json(state),
        "mqtt": state.mqtt,
        "storage": {"state": state.storage.state, "detail": state.storage.detail},
        "streams": [stream_json(s) for s in state.streams],
    }


def _points(points: list[tuple[float, float]]) -> list[list[float | None]]:
    return [[round(t, 3), number(s, 5)] for t, s in points]


def overview_with_scores(
    view: DaemonView, writes: bool, sent: dict[str, float] | None = None
) -> dict[str, Any]:
    """/api/overview: each stream with its scores newer than `sent[stream]` (the whole history for a stream
    not in `sent`); `sent` is updated to the newest score time given out."""
    sent = {} if sent is None else sent
    state = view.state()
    out = overview_json(view, state, writes)
    oldest = state.at.timestamp() - view.history_seconds
    for stream in out["streams"]:
        points = view.trail(stream["name"], sent.get(stream["name"], oldest))
        if points:
            sent[stream["name"]] = points[-1][0]
        stream["scores"] = _points(points)
    return out


class LiveFeed:
    """The server-sent event stream of each open dashboard."""

    def __init__(self, view: DaemonView, writes: bool, stopping: threading.Event) -> None:
        self._view = view
        self._writes = writes
        self._stopping = stopping
        self.clients = 0

    def full(self) -> bool:
        return self.clients >= MAX_LIVE_CLIENTS

    async def messages(self) -> AsyncIterator[str]:
        """One `data:` line of JSON per push; the first holds each stream's whole history, later ones only
        the scores since the one before. Ends when the server stops (or the client goes)."""
        self.clients += 1
        try:
            sent: dict[str, float] = {}  # each stream's newest score time sent to this client
            # Tell EventSource to come back quickly after a restart of the daemon.
            yield "retry: 2000\n\n"
            while not self._stopping.is_set():
                out = overview_with_scores(self._view, self._writes, sent)
                yield f"data: {json.dumps(out, separators=(',', ':'))}\n\n"
                for _ in range(STOP_CHECKS):  # a stopping daemon does not wait for the next push
                    if self._stopping.is_set():
                        break
                    await asyncio.sleep(LIVE_INTERVAL_S / STOP_CHECKS)
        finally:
            self.clients -= 1
