"""The running daemon as the web side sees it (anomalyd/web/view.py's DaemonView).

Reads are snapshots of in-memory state that other threads own: plain attribute reads of numbers and
strings, which Python makes atomic, so nothing here takes the worker's time or a lock it holds. Writes go
to the store's writer as commands, exactly like the control channel's and MQTT's, and wait for its answer.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomalyd.answer import Answer
from anomalyd.bundleinfo import describe
from anomalyd.features import LogMel
from anomalyd.marks import Marked, submit_mark
from anomalyd.mqtt import Publisher
from anomalyd.mutes import MAX_MUTE_SECONDS, MuteCommand
from anomalyd.pipeline import Pipeline
from anomalyd.records import utc_now
from anomalyd.status import outbox_backlog, stalled, stream_view
from anomalyd.store import StoreWriter
from anomalyd.stream import StreamRuntime
from anomalyd.web.view import NodeState, RefusedError, StreamState

MUTE_WAIT_S = 10.0  # how long a dashboard mute waits for the store's writer


def _p50_p99(found: list[float] | None) -> tuple[float, float] | None:
    return (found[0], found[1]) if found else None


def watched_beats(
    main_beat: float, pipeline: Pipeline, store: StoreWriter, publisher: Publisher | None
) -> dict[str, float]:
    """The last sign of progress of each thread the watchdog watches (monotonic seconds): the main loop
    (which pings), the worker, the store's writer and, with MQTT, the publisher's thread."""
    beats = {"main": main_beat, "worker": pipeline.heartbeat, "store writer": store.heartbeat}
    if publisher is not None:
        beats["mqtt"] = publisher.heartbeat
    return beats


class LiveView:
    def __init__(
        self,
        node: str,
        pipeline: Pipeline,
        *,
        store: StoreWriter,
        publisher: Publisher | None,
        beats: Callable[[], dict[str, float]],
        stale_seconds: float,
        stopping: Callable[[], bool],
    ) -> None:
        """`beats`: each watched thread's last sign of progress (monotonic seconds), as the watchdog sees
        them; one older than `stale_seconds` is stalled."""
        assert pipeline.config is not None
        self.node = node
        self._pipeline = pipeline
        self._store = store
        self._publisher = publisher
        self._beats = beats
        self._stale = stale_seconds
        self._stopping = stopping
        self.database = pipeline.config.storage.database  # a reload does not move it
        self.history_seconds = pipeline.config.web.history_minutes * 60.0

    @property
    def clips(self) -> Path:
        """The clip folder now (a reload may move it)."""
        assert self._pipeline.config is not None
        return self._pipeline.config.storage.clips.directory

    def _runtime(self, stream: str) -> StreamRuntime | None:
        return next((r for r in self._pipeline.streams() if r.name == stream), None)

    def _stream(self, runtime: StreamRuntime, now: dt.datetime, max_lag: float) -> StreamState:
        view = stream_view(runtime, now, max_lag)
        score = runtime.last_score
        return StreamState(
            name=view.name,
            area=runtime.config.area,
            source=view.source,
            source_detail=runtime.health.detail,
            event_open=view.event_open,
            event_id=runtime.event_id,
            score=None if math.isnan(score) else score,
            threshold=runtime.threshold,
            k=runtime.k,
            lag_seconds=view.lag_seconds,
            lagging=view.lagging,
            model_id=runtime.model.bundle.meta.model_id,
            muted_until=self._store.mutes.until(runtime.name, now),
            windows_scored=runtime.windows_scored,
            windows_silent=runtime.windows_silent,
            events_total=self._pipeline.events_started.get(runtime.name, 0),
        )

    def state(self) -> NodeState:
        pipeline, store = self._pipeline, self._store
        assert pipeline.config is not None
        now = utc_now()
        max_lag = pipeline.config.inference.max_lag_seconds
        link = self._publisher.link_status() if self._publisher is not None else None
        return NodeState(
            node=self.node,
            at=now,
            streams=tuple(self._stream(r, now, max_lag) for r in pipeline.streams()),
            mqtt=link.state.value if link is not None else None,
            storage=store.status(),
            store_write_failures=store.write_failures,
            blocks_dropped=pipeline.blocks_dropped,
            windows_scored=pipeline.windows_scored,
            workers=pipeline.workers,
            window_latency=_p50_p99(pipeline.latency.percentiles([50.0, 99.0])),
            events_version=store.events_version,
            stalled=tuple(stalled(self._beats(), time.monotonic(), self._stale)),
            stopping=self._stopping(),
        )

    def trail(self, stream: str, after: float) -> list[tuple[float, float]]:
        runtime = self._runtime(stream)
        if runtime is None or runtime.trail is None:
            return []
        return runtime.trail.since(after)

    def stream_details(self, stream: str) -> dict[str, Any] | None:
        runtime = self._runtime(stream)
        if runtime is None:
            return None
        config = runtime.config
        return {
            "detector": config.detector.model_dump(mode="json"),
            "mute_minutes": self._store.mutes.minutes(stream) or config.mute_minutes,
            "source_config": config.source.model_dump(mode="json"),
            "bundle": describe(runtime.model.bundle),
        }

    def logmel(self, stream: str) -> LogMel | None:
        runtime = self._runtime(stream)
        return runtime.model.logmel if runtime is not None else None

    def outbox_backlog(self) -> int:
        if self._publisher is None:
            return 0
        return outbox_backlog(self.database) + self._store.status().messages_pending

    def mute(self, stream: str, seconds: float) -> dt.datetime | None:
        if self._runtime(stream) is None:
            raise RefusedError(f"no stream {stream!r} in this daemon", 404)
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_MUTE_SECONDS):
            raise RefusedError(f"seconds: expected 0 (unmute) to {MAX_MUTE_SECONDS} (7 days)", 400)
        answer: Answer[dt.datetime | None] = Answer()
        self._store.put(MuteCommand(stream, seconds, utc_now(), answer=answer))
        outcome = answer.wait(MUTE_WAIT_S)
        if outcome is None:
            raise RefusedError(f"the event log did not answer within {MUTE_WAIT_S:g} s; try again", 503)
        until, refused = outcome
        if refused:
            raise RefusedError(refused)
        return until

    def mark(self, event_id: str, note: str) -> Marked:
        marked, refused = submit_mark(self._store.put, event_id, note)
        if marked is None:
            raise RefusedError(refused)
        return marked
