"""Audio clips of anomaly events: the model-rate audio from pre-roll before the start to post-roll after
the end, collected in the worker from a short ring buffer and handed to the store's writer to save."""

from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.config import ClipsConfig
from anomalyd.records import ClipJob


@dataclass
class _Collecting:
    event_id: str
    started_at: dt.datetime
    first_sample: int
    chunks: list[npt.NDArray[np.float32]]
    length: int
    event_sample: int  # where the event starts
    stop_at: int | None = None  # sample index where the clip ends, once the event has ended


class ClipRecorder:
    def __init__(self, stream: str, config: ClipsConfig, rate: int, lookback_samples: int) -> None:
        """`lookback_samples`: how far before the newest audio an event may be found to have started."""
        self.stream = stream
        self.config = config
        self.rate = rate
        self._keep = int(config.pre_roll_seconds * rate) + lookback_samples
        self._max = int(config.max_seconds * rate)
        self._ring: deque[tuple[int, npt.NDArray[np.float32]]] = deque()
        self._ring_samples = 0
        self._end = 0  # sample index after the newest audio
        self._clip: _Collecting | None = None

    def push(self, first_sample: int, samples: npt.NDArray[np.float32]) -> ClipJob | None:
        """Add model-rate audio starting at `first_sample`; return a finished clip, if one is."""
        self._ring.append((first_sample, samples))
        self._ring_samples += len(samples)
        self._end = first_sample + len(samples)
        while self._ring and self._ring_samples - len(self._ring[0][1]) >= self._keep:
            self._ring_samples -= len(self._ring.popleft()[1])
        clip = self._clip
        if clip is None:
            return None
        clip.chunks.append(samples)
        clip.length += len(samples)
        end = clip.first_sample + clip.length
        if (clip.stop_at is not None and end >= clip.stop_at) or clip.length >= self._max:
            return self.flush()
        return None

    def start(self, event_id: str, started_at: dt.datetime, start_sample: int) -> None:
        begin = start_sample - int(self.config.pre_roll_seconds * self.rate)
        chunks = [(s, a) for s, a in self._ring if s + len(a) > begin]
        if not chunks:  # nothing kept reaches back that far: the clip starts with the next audio
            self._clip = _Collecting(event_id, started_at, self._end, [], 0, start_sample)
            return
        first, head = chunks[0]
        cut = max(0, begin - first)
        arrays = [head[cut:]] + [a for _, a in chunks[1:]]
        length = sum(len(a) for a in arrays)
        self._clip = _Collecting(event_id, started_at, first + cut, arrays, length, start_sample)

    def end(self, end_sample: int) -> ClipJob | None:
        """The event ended at `end_sample`: the clip closes after the post-roll (now, if already there)."""
        if self._clip is None:
            return None
        self._clip.stop_at = end_sample + int(self.config.post_roll_seconds * self.rate)
        if self._clip.first_sample + self._clip.length >= self._clip.stop_at:
            return self.flush()
        return None

    def flush(self) -> ClipJob | None:
        """Hand over whatever the clip holds (at stream end and shutdown too)."""
        clip, self._clip = self._clip, None
        if clip is None or clip.length == 0:
            return None
        samples = np.concatenate(clip.chunks)
        if clip.stop_at is not None:
            samples = samples[: max(0, clip.stop_at - clip.first_sample)]
        return ClipJob(
            event_id=clip.event_id,
            stream=self.stream,
            started_at=clip.started_at,
            samples=samples[: self._max],
            sample_rate=self.rate,
            directory=self.config.directory,
            event_offset=(clip.event_sample - clip.first_sample) / self.rate,
        )
