"""The daemon's side of `anomalyd record`: a tap on each stream's audio at the model rate; the `record` op.

The worker hands the tap every block it has just resampled (the very samples it turns into windows), and
the tap copies it to the recorders of that stream. The worker never waits here: each recorder holds at
most `MAX_QUEUED_SECONDS` of audio; a client that falls that far behind, or that takes nothing for
`control.SEND_TIMEOUT_S`, is dropped, counted and logged, and its connection closed. The daemon only
streams; the client writes the files, in its own user's folders.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomalyd.control import Connection, Request
from anomalyd.errors import ControlError
from anomalyd.records import SourceState

logger = logging.getLogger(__name__)

MAX_QUEUED_SECONDS = 30.0  # audio waiting for one client before it counts as not reading
FRAME_SAMPLES = 8192  # samples per audio line to the client (a 10 s replay block goes out in pieces)
POLL_S = 0.25  # how often a recording connection looks at the stop flag and the client


@dataclass(frozen=True)
class StreamSource:
    """What a recording client is told about a stream."""

    stream: str
    rate: int  # Hz, the model's rate: what the tap delivers
    device: str  # the input device's name (or the replayed file)
    capture_rate: int | None  # Hz, what the device delivers; None before it has opened


@dataclass(frozen=True)
class TapAudio:
    samples: npt.NDArray[np.float32]  # (n,), at the model rate
    capture_rate: int  # Hz


@dataclass(frozen=True)
class TapNotice:
    state: SourceState  # the source opened (ok), was lost, or ended
    detail: str


TapItem = TapAudio | TapNotice


class Recorder:
    """One client's queue: filled by the worker (never waiting), emptied by the client's connection thread."""

    def __init__(self, stream: str, rate: int, max_seconds: float) -> None:
        self.stream = stream
        self.rate = rate
        self._max_samples = int(max_seconds * rate)
        self._items: deque[TapItem] = deque()
        self._queued = 0  # samples waiting
        self._ready = threading.Condition()
        self.dropped = ""  # why the tap gave up on this client; "" while it is served

    def offer(self, item: TapItem) -> bool:
        """Queue an item; False (nothing queued) when the client is that far behind."""
        size = len(item.samples) if isinstance(item, TapAudio) else 0
        with self._ready:
            if self._queued + size > self._max_samples:
                return False
            self._items.append(item)
            self._queued += size
            self._ready.notify()
        return True

    def drop(self, reason: str) -> None:
        with self._ready:
            self.dropped = reason
            self._items.clear()
            self._queued = 0
            self._ready.notify()

    def take(self, timeout: float) -> list[TapItem]:
        """Everything queued, waiting at most `timeout` for something."""
        with self._ready:
            if not self._items and not self.dropped:
                self._ready.wait(timeout)
            items = list(self._items)
            self._items.clear()
            self._queued = 0
        return items


class AudioTap:
    def __init__(self, max_queued_seconds: float = MAX_QUEUED_SECONDS) -> None:
        self.max_queued_seconds = max_queued_seconds
        self._lock = threading.Lock()
        # Replaced whole on every change, so that the worker reads it without the lock.
        self._recorders: dict[str, tuple[Recorder, ...]] = {}
        self.dropped = 0  # clients given up on: not reading, or the stream went away

    def open(self, stream: str, rate: int) -> Recorder:
        recorder = Recorder(stream, rate, self.max_queued_seconds)
        with self._lock:
            self._recorders = {**self._recorders, stream: (*self._recorders.get(stream, ()), recorder)}
        return recorder

    def close(self, recorder: Recorder) -> None:
        with self._lock:
            rest = tuple(r for r in self._recorders.get(recorder.stream, ()) if r is not recorder)
            recorders = {k: v for k, v in self._recorders.items() if k != recorder.stream}
            if rest:
                recorders[recorder.stream] = rest
            self._recorders = recorders

    def wants(self, stream: str) -> bool:
        """Whether anyone records `stream` (the worker's only cost when nobody does)."""
        return stream in self._recorders

    def audio(self, stream: str, samples: npt.NDArray[np.float32], capture_rate: int, rate: int) -> None:
        """From the worker: a block just resampled to the model's `rate`."""
        for recorder in self._recorders.get(stream, ()):
            if recorder.rate != rate:
                self._give_up(recorder, f"the stream's model rate changed to {rate} Hz (a reload)")
            elif not recorder.offer(TapAudio(samples, capture_rate)):
                self._give_up(recorder, f"the client is not reading ({self.max_queued_seconds:.0f} s of "
                                        "audio waiting)")  # fmt: skip

    def notice(self, stream: str, state: SourceState, detail: str) -> None:
        """From the worker: the stream's source opened, was lost or ended."""
        for recorder in self._recorders.get(stream, ()):
            if not recorder.offer(TapNotice(state, detail)):
                self._give_up(recorder, "the client is not reading")

    def end(self, stream: str, reason: str) -> None:
        """From the worker: the stream is gone (a reload removed it)."""
        for recorder in self._recorders.get(stream, ()):
            self._give_up(recorder, reason)

    def _give_up(self, recorder: Recorder, reason: str) -> None:
        recorder.drop(reason)
        self.close(recorder)
        self.count_drop(recorder.stream, reason)

    def count_drop(self, stream: str, reason: str) -> None:
        with self._lock:
            self.dropped += 1
            count = self.dropped
        logger.warning("recording of stream %s dropped: %s (%d dropped so far)", stream, reason, count)


def audio_message(samples: npt.NDArray[np.float32], capture_rate: int) -> dict[str, object]:
    """An audio line: float32 little-endian samples at the model rate, base64."""
    data = np.ascontiguousarray(samples, dtype="<f4").tobytes()
    return {"type": "audio", "capture_rate": capture_rate, "pcm": base64.b64encode(data).decode()}


class RecordOp:
    """`{"op": "record", "stream": NAME}`: a header line, then the stream's audio until the client hangs up.

    Lines sent: `{"ok": true, "stream", "rate", "device", "capture_rate", "source": "daemon"}`, then
    `{"type": "audio", "capture_rate", "pcm"}` (base64 float32 LE at `rate`), `{"type": "source", "state",
    "detail"}` when the source opens, is lost or ends, and a last `{"type": "end", "reason", "error"}`
    when the daemon stops, the stream goes away or the client is dropped.
    """

    def __init__(self, tap: AudioTap, describe: Callable[[str], StreamSource | None],
                 streams: Callable[[], list[str]]) -> None:  # fmt: skip
        self._tap = tap
        self._describe = describe
        self._streams = streams

    def __call__(self, request: Request, connection: Connection) -> None:
        name = request.get("stream")
        if not isinstance(name, str):
            raise ControlError('record: give "stream", the name of a configured stream')
        source = self._describe(name)
        if source is None:
            raise ControlError(
                f"record: this daemon runs no stream {name[:64]!r}; it runs: {', '.join(self._streams())}"
            )
        recorder = self._tap.open(name, source.rate)
        peer = connection.peer
        logger.info("stream %s: recording for pid %d (uid %d)", name, peer.pid, peer.uid)
        try:
            connection.send({"ok": True, "stream": name, "rate": source.rate, "device": source.device,
                             "capture_rate": source.capture_rate, "source": "daemon"})  # fmt: skip
            self._stream(recorder, connection)
        except TimeoutError:
            self._tap.count_drop(name, "the client took nothing for a while (not reading)")
        finally:
            self._tap.close(recorder)
        logger.info("stream %s: recording for pid %d ended", name, connection.peer.pid)

    def _stream(self, recorder: Recorder, connection: Connection) -> None:
        while True:
            if connection.stopping:
                connection.send({"type": "end", "reason": "the daemon is stopping", "error": True})
                return
            items = recorder.take(POLL_S)
            if recorder.dropped:
                connection.send({"type": "end", "reason": recorder.dropped, "error": True})
                return
            if not items and connection.closed_by_peer():
                return
            for item in items:
                if isinstance(item, TapNotice):
                    connection.send({"type": "source", "state": item.state.value, "detail": item.detail})
                    continue
                for start in range(0, len(item.samples), FRAME_SAMPLES):
                    chunk = item.samples[start : start + FRAME_SAMPLES]
                    connection.send(audio_message(chunk, item.capture_rate))
