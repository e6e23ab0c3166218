"""The per-stream detector: window scores in, event transitions out. Pure logic, no I/O, no clock.

- open:  at least `n` of the last `m` windows score over the threshold (and no cooldown runs); the event
         starts at the earliest over-threshold window among those m;
- stay:  every window while open adds to the event's peak and mean; an `update` is due every
         `update_seconds` of audio;
- close: after `hold_off_windows` consecutive windows under the threshold; the event ends where the last
         over-threshold window ended;
- cooldown: after a close, no event opens until `cooldown_seconds` of audio have passed.

Times are sample indices at the model rate; the caller turns them into UTC.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from anomalyd.config import DetectorConfig


class Phase(Enum):
    START = "start"
    UPDATE = "update"
    END = "end"


@dataclass(frozen=True)
class WindowScore:
    index: int
    start_sample: int
    end_sample: int
    score: float


@dataclass(frozen=True)
class Transition:
    """What happened to the stream's one open event, with its statistics so far."""

    phase: Phase
    start_sample: int
    end_sample: int  # end of the last over-threshold window
    peak_score: float
    mean_score: float  # over every window since the start
    windows: int  # windows since the start
    windows_over: int
    reason: str = ""  # why an `end` happened: "recovered", or the caller's reason when forced


@dataclass
class _Open:
    start_sample: int
    end_sample: int
    peak: float
    total: float
    windows: int
    windows_over: int
    below_run: int
    last_update_sample: int

    def transition(self, phase: Phase, reason: str = "") -> Transition:
        return Transition(
            phase,
            self.start_sample,
            self.end_sample,
            self.peak,
            self.total / self.windows,
            self.windows,
            self.windows_over,
            reason,
        )


class Detector:
    def __init__(self, config: DetectorConfig, threshold: float, sample_rate: int) -> None:
        self.config = config
        self.threshold = threshold
        self._rate = sample_rate
        self._recent: deque[WindowScore] = deque(maxlen=config.m)
        self._open: _Open | None = None
        self._cooldown_until = -1  # sample index

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def push(self, window: WindowScore) -> list[Transition]:
        over = window.score > self.threshold
        self._recent.append(window)
        if self._open is None:
            return self._maybe_open(window)
        event = self._open
        event.windows += 1
        event.total += window.score
        event.peak = max(event.peak, window.score)
        if over:
            event.windows_over += 1
            event.end_sample = window.end_sample
            event.below_run = 0
        else:
            event.below_run += 1
            if event.below_run >= self.config.hold_off_windows:
                return [self._close(window.end_sample, "recovered")]
        if window.end_sample - event.last_update_sample >= self.config.update_seconds * self._rate:
            event.last_update_sample = window.end_sample
            return [event.transition(Phase.UPDATE)]
        return []

    def _maybe_open(self, window: WindowScore) -> list[Transition]:
        over = [w for w in self._recent if w.score > self.threshold]
        if len(over) < self.config.n or window.end_sample < self._cooldown_until:
            return []
        first = over[0]
        since_first = [w for w in self._recent if w.index >= first.index]
        self._open = _Open(
            start_sample=first.start_sample,
            end_sample=over[-1].end_sample,
            peak=max(w.score for w in since_first),
            total=sum(w.score for w in since_first),
            windows=len(since_first),
            windows_over=len(over),
            below_run=0 if window.score > self.threshold else 1,
            last_update_sample=window.end_sample,
        )
        return [self._open.transition(Phase.START)]

    def _close(self, at_sample: int, reason: str) -> Transition:
        assert self._open is not None
        transition = self._open.transition(Phase.END, reason)
        self._open = None
        self._recent.clear()
        self._cooldown_until = at_sample + int(self.config.cooldown_seconds * self._rate)
        return transition

    def close(self, at_sample: int, reason: str) -> list[Transition]:
        """Force the open event, if any, to end (shutdown, stream end, reconfiguration)."""
        if self._open is None:
            return []
        return [self._close(at_sample, reason)]
