"""Window scores kept for people to look at: a stream's recent scores (the dashboard's live chart) and the
scores across one event (its page), both bounded whatever the stream's rate or the event's length.

Both are written by the worker thread only. `ScoreTrail` is read by the web thread without a lock: a
reader copies the arrays and the count, and a point the worker overwrites during the copy can at worst
show one stale value at the far (oldest) end of the chart.
"""

from __future__ import annotations

from collections import deque

import numpy as np

MAX_EVENT_POINTS = 2000  # an event's chart: beyond this, neighbouring points merge (their maximum)
LEAD_WINDOWS = 64  # scored windows remembered so that an event's chart starts before the event does


class ScoreTrail:
    """The last `capacity` scores of a stream with their times (Unix seconds of each window's end)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._times = np.zeros(self.capacity, dtype=np.float64)
        self._scores = np.zeros(self.capacity, dtype=np.float64)
        self.count = 0  # points ever added

    def add(self, at: float, score: float) -> None:
        i = self.count % self.capacity
        self._times[i] = at
        self._scores[i] = score
        self.count += 1

    def since(self, after: float) -> list[tuple[float, float]]:
        """Points with a time after `after`, oldest first."""
        count = self.count
        order = np.arange(count - min(count, self.capacity), count) % self.capacity
        times, scores = self._times[order], self._scores[order]  # fancy indexing copies
        keep = times > after
        return list(zip(times[keep].tolist(), scores[keep].tolist(), strict=True))


class EventTrace:
    """The window scores across one event: (seconds from the event's start, score), the windows that led
    up to it included; at most MAX_EVENT_POINTS, merging neighbours by their maximum when longer (a peak
    is never averaged away)."""

    def __init__(self, start_sample: int, rate: int, lead: list[tuple[int, float]]) -> None:
        """`lead`: (centre sample, score) of windows scored before the event opened."""
        self._start = start_sample
        self._rate = rate
        self._points: list[tuple[float, float]] = []
        self._stride = 1  # windows per point
        self._pending: tuple[float, float] | None = None  # a point still merging its `stride` windows
        self._merged = 0
        for centre, score in lead:
            self.add(centre, score)

    def add(self, centre_sample: int, score: float) -> None:
        offset = (centre_sample - self._start) / self._rate
        if self._pending is None:
            self._pending = (offset, score)
        else:
            self._pending = (self._pending[0], max(self._pending[1], score))
        self._merged += 1
        if self._merged < self._stride:
            return
        self._points.append(self._pending)
        self._pending, self._merged = None, 0
        if len(self._points) >= MAX_EVENT_POINTS:
            pairs = zip(self._points[::2], self._points[1::2], strict=False)
            self._points = [(a[0], max(a[1], b[1])) for a, b in pairs]
            self._stride *= 2

    def points(self) -> tuple[tuple[float, float], ...]:
        """Rounded for storage (ms, 5 significant digits): a 2000-point chart is about 40 kB of JSON."""
        points = [*self._points, *([self._pending] if self._pending is not None else [])]
        return tuple((round(t, 3), float(f"{s:.5g}")) for t, s in points)


class LeadIn:
    """The last LEAD_WINDOWS scored windows of a stream, (centre sample, score): an event's chart begins
    with them."""

    def __init__(self) -> None:
        self._windows: deque[tuple[int, float]] = deque(maxlen=LEAD_WINDOWS)

    def add(self, centre_sample: int, score: float) -> None:
        self._windows.append((centre_sample, score))

    def after(self, sample: int) -> list[tuple[int, float]]:
        return [w for w in self._windows if w[0] >= sample]
