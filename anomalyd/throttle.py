"""Log lines that repeat at most once an interval: a failing disk or a flood of bad commands must not
become a flood of log lines."""

from __future__ import annotations

import time


class Throttle:
    """Says whether to log now; counts what it held back so that the next line can say how much."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval_s
        return True

    def take_suppressed(self) -> str:
        """' (N similar line(s) held back)' once after a held-back stretch, else ''."""
        count, self.suppressed = self.suppressed, 0
        return f" ({count} similar line(s) held back)" if count else ""

    def reset(self) -> None:
        self._next = 0.0
        self.suppressed = 0
