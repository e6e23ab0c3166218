"""How long windows wait for their scores: the recent ones, for percentiles (benchmarks, diagnostics)."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt


class LatencyRecord:
    """The last `size` window latencies in seconds: from the arrival of the audio that completed a window
    to its score having gone through the stream's detector. Written by the worker, read by any thread."""

    def __init__(self, size: int = 8192) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._count = 0  # ever added
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self._count, len(self._values))

    def add(self, seconds: npt.NDArray[np.float64]) -> None:
        size = len(self._values)
        seconds = seconds[-size:]
        with self._lock:
            at = (self._count + np.arange(len(seconds))) % size
            self._values[at] = seconds
            self._count += len(seconds)

    def clear(self) -> None:
        with self._lock:
            self._count = 0

    def percentiles(self, q: list[float]) -> list[float] | None:
        """The given percentiles (0-100) of the recent latencies, in seconds; None before any."""
        with self._lock:
            held = self._values[: len(self)].copy()
        return [float(v) for v in np.percentile(held, q)] if len(held) else None
