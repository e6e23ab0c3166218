"""What sources hand to the pipeline, and the back-off they share."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.records import SourceState


@dataclass(frozen=True)
class AudioBlock:
    stream: str
    samples: npt.NDArray[np.float32]  # (n,), one channel, at `rate`
    rate: int  # Hz, the capture (or file) rate; the pipeline resamples
    received: float  # monotonic seconds when the block arrived


@dataclass(frozen=True)
class SourceNotice:
    """A source opened (OK), was lost (LOST), or reached its end (ENDED)."""

    stream: str
    state: SourceState
    detail: str


SourceMessage = AudioBlock | SourceNotice
Sink = Callable[[SourceMessage], None]
# Takes a message without waiting; False when an audio block finds no room (notices are always taken).
Offer = Callable[[SourceMessage], bool]


class Backoff:
    """Capped exponential back-off with jitter, waiting on a stop event so that shutdown is immediate."""

    def __init__(self, initial: float, maximum: float, stop: threading.Event) -> None:
        self.initial, self.maximum = initial, maximum
        self._delay = initial
        self._stop = stop

    def reset(self) -> None:
        self._delay = self.initial

    def wait(self) -> bool:
        """Sleep the current delay (+-20 % jitter) and double it; False if stop was set meanwhile."""
        return not self._stop.wait(self.take())

    def take(self) -> float:
        """The current delay (+-20 % jitter), doubled for next time: for a caller that waits elsewhere."""
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    @property
    def next_delay(self) -> float:
        return self._delay
