"""Source health: silence (a dead or muted microphone), clipping, and loss, as status changes.

Judged on the captured audio, before resampling, one second at a time. A source is `silent` after
`silence_seconds` of RMS below `silence_dbfs`, `clipping` when more than `clipping_fraction` of a
second's samples are at full scale, `lost` or `ended` when its source says so, else `ok`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.config import HealthConfig
from anomalyd.records import SourceState

FULL_SCALE = 0.999  # |sample| at or above this counts as clipped (float32 full scale is 1.0)


def dbfs(mean_square: float) -> float:
    """RMS level in dB full scale: a mean square of 1.0 (a square wave at +-1) is 0 dBFS."""
    return 10.0 * float(np.log10(max(mean_square, 1e-20)))


@dataclass
class _Second:
    squares: float = 0.0
    clipped: int = 0
    samples: int = 0


class HealthMonitor:
    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.state = SourceState.OK
        self.detail = ""
        self._second = _Second()
        self._silent_seconds = 0.0
        self._source_state = SourceState.OK  # what the source itself reports (ok / lost / ended)

    def observe(self, samples: npt.NDArray[np.float32], rate: int) -> tuple[SourceState, str] | None:
        """Take a captured block; return (state, detail) when the state changes."""
        s = self._second
        s.squares += float(np.dot(samples, samples))
        s.clipped += int(np.count_nonzero(np.abs(samples) >= FULL_SCALE))
        s.samples += len(samples)
        if s.samples < rate:
            return None
        level = dbfs(s.squares / s.samples)
        clipped = s.clipped / s.samples
        seconds = s.samples / rate
        self._second = _Second()
        self._silent_seconds = self._silent_seconds + seconds if level < self.config.silence_dbfs else 0.0
        if clipped > self.config.clipping_fraction:
            return self._set(SourceState.CLIPPING, f"{clipped:.1%} of samples at full scale")
        if self._silent_seconds >= self.config.silence_seconds:
            return self._set(
                SourceState.SILENT,
                f"level {level:.1f} dBFS for {self._silent_seconds:.0f} s (dead or muted?)",
            )
        return self._set(SourceState.OK, f"level {level:.1f} dBFS")

    def source_reports(self, state: SourceState, detail: str) -> tuple[SourceState, str] | None:
        """The source opened (OK), was lost, or ended."""
        self._source_state = state
        self._second = _Second()
        self._silent_seconds = 0.0
        return self._set(state, detail)

    def _set(self, state: SourceState, detail: str) -> tuple[SourceState, str] | None:
        if self._source_state in (SourceState.LOST, SourceState.ENDED) and state != self._source_state:
            return None  # audio still queued from before the loss does not undo it
        if state == self.state:
            return None
        self.state, self.detail = state, detail
        return state, detail
