"""Source health: dropouts and silence, clipping, samples that are not audio, and loss, as status changes.

Judged on the captured audio, before resampling, one second at a time:
- `invalid` when a second holds NaN, infinite or absurd samples (beyond `MAX_ABS_SAMPLE`): a broken driver
  or file, never audio; the worker scores none of them (they are zeroed, which reads as a dropout);
- `clipping` when more than `clipping_fraction` of a second's samples are at full scale;
- `silent` when any 10 ms of the second is digital silence (RMS below `silence_dbfs`): a dropout, or a
  dead or muted microphone once the silence has lasted `silence_seconds`. Machines are never that quiet,
  so this is a fault of the capture chain, and windows holding any of it are not scored;
- `lost` or `ended` when its source says so, else `ok`.
The first state is always reported (there is no assumed `ok` before the source has said anything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.audio import MAX_ABS_SAMPLE
from anomalyd.config import HealthConfig
from anomalyd.records import SourceState

FULL_SCALE = 0.999  # |sample| at or above this counts as clipped (float32 full scale is 1.0)
CHUNK_SECONDS = 0.01  # the unit of a dropout


def dbfs(mean_square: float) -> float:
    """RMS level in dB full scale: a mean square of 1.0 (a square wave at +-1) is 0 dBFS."""
    return 10.0 * float(np.log10(max(mean_square, 1e-20)))


def sums_of_squares(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each row's sum of squares, for (n, size) samples.

    In float32: a few hundred terms lose at most a few parts in 1e5 of their sum, and the squares stay
    normal floats for samples far below the lowest silence threshold (-200 dBFS).
    """
    squares: npt.NDArray[np.float32] = np.einsum("ij,ij->i", rows, rows)
    return squares


def sanitise(samples: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], int]:
    """Samples with NaN, infinities and absurd values zeroed, and how many there were.

    Zeroing (rather than dropping) keeps sample counts, and so time, exact; zeros read as a dropout, so
    the windows around them are not scored.
    """
    magnitude = np.abs(samples)
    if magnitude.max(initial=0.0) <= MAX_ABS_SAMPLE:  # False when any is NaN: the max is then NaN
        return samples, 0
    bad = ~(magnitude <= MAX_ABS_SAMPLE)  # True for NaN too
    return np.where(bad, np.float32(0.0), samples).astype(np.float32), int(np.count_nonzero(bad))


def count_clipped(samples: npt.NDArray[np.float32]) -> int:
    """How many samples are at full scale."""
    magnitude = np.abs(samples)
    if magnitude.max(initial=0.0) < FULL_SCALE:  # nearly always: no need to compare every sample
        return 0
    return int(np.count_nonzero(magnitude >= FULL_SCALE))


@dataclass
class _Second:
    squares: float = 0.0
    clipped: int = 0
    invalid: int = 0
    silent_chunks: int = 0
    samples: int = 0


class HealthMonitor:
    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.state: SourceState | None = None  # nothing known until the source or its audio says so
        self.detail = ""
        self._kind = ""
        self._second = _Second()
        self._silent_seconds = 0.0
        self._source_state = SourceState.OK  # what the source itself reports (ok / lost / ended)
        self._silence_ms = 10 ** (config.silence_dbfs / 10)  # mean square of a silent chunk

    def observe(
        self, samples: npt.NDArray[np.float32], rate: int, invalid: int = 0
    ) -> tuple[SourceState, str] | None:
        """Take a captured block (already sanitised; `invalid` samples were zeroed); return (state, detail)
        when the state changes."""
        s = self._second
        squares, silent_chunks = self._squares(samples, rate)
        s.squares += squares
        s.clipped += count_clipped(samples)
        s.invalid += invalid
        s.silent_chunks += silent_chunks
        s.samples += len(samples)
        if s.samples < rate:
            return None
        level = dbfs(s.squares / s.samples)
        clipped = s.clipped / s.samples
        seconds = s.samples / rate
        self._second = _Second()
        whole_second_silent = level < self.config.silence_dbfs
        self._silent_seconds = self._silent_seconds + seconds if whole_second_silent else 0.0
        if s.invalid:
            return self._set(SourceState.INVALID, f"{s.invalid} sample(s) NaN, infinite or beyond +24 dBFS")
        if clipped > self.config.clipping_fraction:
            return self._set(SourceState.CLIPPING, f"{clipped:.1%} of samples at full scale")
        if self._silent_seconds >= self.config.silence_seconds:
            return self._set(
                SourceState.SILENT,
                f"level {level:.1f} dBFS for {self._silent_seconds:.0f} s (dead or muted?)",
                kind="dead",
            )
        if s.silent_chunks:
            silent = s.silent_chunks * CHUNK_SECONDS
            return self._set(
                SourceState.SILENT, f"dropout: {silent:.2f} s of digital silence in the last second"
            )
        return self._set(SourceState.OK, f"level {level:.1f} dBFS")

    def samples_to_second(self, rate: int) -> int:
        """How many more samples complete the second being judged (so that a long block is judged one
        second at a time, as short ones are)."""
        return max(1, rate - self._second.samples)

    def _squares(self, samples: npt.NDArray[np.float32], rate: int) -> tuple[float, int]:
        """The block's sum of squares, and how many of its 10 ms chunks are digital silence (a short
        block counts as one chunk)."""
        size = max(1, int(rate * CHUNK_SECONDS))
        n = len(samples) // size
        chunk_squares = sums_of_squares(samples[: n * size].reshape(n, size))
        rest = samples[n * size :]
        squares = float(chunk_squares.sum(dtype=np.float64)) + float(np.dot(rest, rest))
        if n == 0:
            return squares, int(len(samples) > 0 and squares < self._silence_ms * len(samples))
        return squares, int(np.count_nonzero(chunk_squares < self._silence_ms * size))

    def source_reports(self, state: SourceState, detail: str) -> tuple[SourceState, str] | None:
        """The source opened (OK), was lost, or ended."""
        self._source_state = state
        self._second = _Second()
        self._silent_seconds = 0.0
        return self._set(state, detail)

    def _set(self, state: SourceState, detail: str, kind: str = "") -> tuple[SourceState, str] | None:
        """Report a change of state, or of kind within a state (a dropout that turns out a dead mic)."""
        if self._source_state in (SourceState.LOST, SourceState.ENDED) and state != self._source_state:
            return None  # audio still queued from before the loss does not undo it
        if (state, kind) == (self.state, self._kind):
            return None
        self.state, self.detail, self._kind = state, detail, kind
        return state, detail
