"""What the pipeline reports: anomaly event messages and source status changes (typed, immutable).

They travel from the worker to the event store (and, through its outbox, to MQTT); their field names
are those of the event log and of the published JSON.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None) -> str | None:
    """UTC ISO 8601 with offset and milliseconds, or None."""
    return None if t is None else t.astimezone(dt.UTC).isoformat(timespec="milliseconds")


class SourceState(Enum):
    OK = "ok"
    SILENT = "silent"
    CLIPPING = "clipping"
    LOST = "lost"
    ENDED = "ended"  # a replayed file reached its end
    INVALID = "invalid"  # samples that are not audio: NaN, infinite or far beyond full scale


@dataclass(frozen=True)
class SourceStatus:
    node: str
    stream: str
    state: SourceState
    detail: str
    at: dt.datetime


@dataclass(frozen=True)
class AnomalyEvent:
    """One message about an event: its `start`, a periodic `update`, or its `end`. Same event_id for all."""

    event_id: str
    type: str  # "start" | "update" | "end"
    node: str
    stream: str
    started_at: dt.datetime
    ended_at: dt.datetime | None  # None until the end
    start_sample: int
    end_sample: int
    score: float  # the latest window's score
    peak_score: float
    mean_score: float
    threshold: float
    mean: float  # validation window scores' mean, from the bundle
    std: float  # and their standard deviation
    k: float | None  # None when an absolute threshold is set
    model_id: str
    windows: int
    windows_over: int
    reason: str  # for an end: recovered, shutdown, stream-ended, reconfigured
    at: dt.datetime  # when this message was made
    # The window scores so far, (seconds from the start, score), for the event log (not published).
    scores: tuple[tuple[float, float], ...] = ()

    def shared_fields(self) -> dict[str, Any]:
        """The fields that the event log's row and the published message have in common, as plain values."""
        return {
            "event_id": self.event_id,
            "node": self.node,
            "stream": self.stream,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "score": self.score,
            "peak_score": self.peak_score,
            "mean_score": self.mean_score,
            "threshold": self.threshold,
            "mean": self.mean,
            "std": self.std,
            "k": self.k,
            "model_id": self.model_id,
            "windows": self.windows,
            "windows_over": self.windows_over,
        }


@dataclass(frozen=True)
class ScoreReport:
    """A stream's latest window score, for dashboards (published every score_interval_seconds)."""

    stream: str
    score: float
    threshold: float
    at: dt.datetime
    lag_seconds: float = 0.0  # now minus the audio time of the end of the last scored window


@dataclass(frozen=True)
class AlarmState:
    """A stream's alarm state, stated again (retained) at start and after every reload.

    Events carry state changes; this tells subscribers the current truth when nothing changes, e.g. the
    `OFF` of a healthy machine after a restart.
    """

    stream: str
    on: bool  # an event is open
    at: dt.datetime


@dataclass(frozen=True)
class ClipJob:
    """Audio of one event, with pre- and post-roll, for the store's writer to save."""

    event_id: str
    stream: str
    started_at: dt.datetime
    samples: npt.NDArray[np.float32]
    sample_rate: int
    directory: Path
    event_offset: float = 0.0  # seconds from the clip's first sample to the event's start
