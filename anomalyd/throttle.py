"""Log lines that repeat at most once an interval: a failing disk or a flood of bad commands must not
become a flood of log lines."""

from __future__ import annotations

import time


class Throttle:
    """Says whether to log now: at most `burst` lines per `interval_s`; counts what it held back so that
    the next line can say how much."""

    def __init__(self, interval_s: float, burst: int = 1) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self._window_end = 0.0
        self._used = 0
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + self.interval_s
            self._used = 0
        if self._used >= self.burst:
            self.suppressed += 1
            return False
        self._used += 1
        return True

    def take_suppressed(self) -> str:
        """' (N similar line(s) held back)' once after a held-back stretch, else ''."""
        count, self.suppressed = self.suppressed, 0
        return f" ({count} similar line(s) held back)" if count else ""
