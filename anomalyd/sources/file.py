"""Replay of WAV or FLAC files as streams: paced in real time or as fast as the pipeline takes them.

One thread, the `FileReader`, reads every replayed file of a pipeline. A thread per file spent more on
handing the interpreter from thread to thread than on reading: libsndfile's calls release it, and with
128 files each 1 s block cost ~0.3 ms of CPU where one thread reads it in ~0.05 ms. The reader keeps each
replay's next block until it is due (real time) or until the pipeline has room for it (as fast as
possible: `Offer` refuses a block while the stream's backlog is full, and the worker's inbox says when it
has taken that backlog), so one slow stream never holds another back and nothing is ever dropped.

A file that cannot be read (missing, being copied in, truncated, unreadable mid-way) makes its stream
`lost`, and it is tried again with back-off, as an unplugged microphone is; other files read on. A file
on a stalled network share would hold up the reader for every file: replay from local disk.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque

import numpy as np
import soundfile as sf

from anomalyd.audio import check_readable
from anomalyd.config import FileSource, HealthConfig
from anomalyd.errors import AudioError
from anomalyd.inbox import MAX_MERGED_SECONDS
from anomalyd.records import SourceState
from anomalyd.sources.base import AudioBlock, Backoff, Offer, SourceNotice

logger = logging.getLogger(__name__)

# Taken as fast as the pipeline takes it, a file is read this much at a time: fewer reads and worker
# steps per second of audio, and no more than the worker merges into one step anyway.
FAST_BLOCK_SECONDS = MAX_MERGED_SECONDS
ROOM = math.inf  # `FileReplay._replay`: serve again once the pipeline has room
# Blocks one replay hands on in a turn: a sink that always has room must not keep the reader to one file.
TURN_BLOCKS = 8
_READ_ERRORS = (sf.LibsndfileError, OSError)  # a file changed, truncated or gone while being read


class FileReader:
    """The thread that reads a pipeline's (or a recording's) replayed files; started by the first."""

    def __init__(self, name: str = "files") -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._added: list[FileReplay] = []
        self._stopped: list[FileReplay] = []
        self._room = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, replay: FileReplay) -> None:
        with self._lock:
            self._added.append(replay)
            if not self._thread.is_alive() and not self._closing:
                self._thread.start()
        self._wake.set()

    def stop(self, replay: FileReplay) -> None:
        """Close `replay` and hand on nothing more of it (its `closed` is set once done)."""
        with self._lock:
            self._stopped.append(replay)
        self._wake.set()

    def room(self) -> None:
        """The pipeline has room again (an inbox's `on_room`): replays refused room are served anew."""
        self._room = True
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """End the thread (after its replays are stopped)."""
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        ready: deque[FileReplay] = deque()  # to serve now
        # Refused room, served again once there is room: first those that handed nothing on last time, so
        # that when the pipeline cannot take every stream's audio the same streams do not always miss out.
        starved: list[FileReplay] = []
        waiting: list[FileReplay] = []
        due: list[tuple[float, int, FileReplay]] = []  # (when, tie-break, replay): real-time blocks, retries
        order = itertools.count()
        while True:
            self._wake.clear()
            with self._lock:
                added, self._added = self._added, []
                stopped, self._stopped = self._stopped, []
                closing = self._closing
            for replay in stopped:
                replay.close()
            if closing:
                for replay in itertools.chain(ready, starved, waiting, (r for _, _, r in due), added):
                    replay.close()
                return
            ready.extend(added)
            if self._room:
                self._room = False
                ready.extend(starved)
                ready.extend(waiting)
                starved.clear()
                waiting.clear()
            now = time.monotonic()
            while due and due[0][0] <= now:
                ready.append(heapq.heappop(due)[2])
            while ready:
                replay = ready.popleft()
                if replay.closed.is_set():
                    continue
                again = replay._replay(time.monotonic())
                if again is None:
                    replay.close()
                elif again == ROOM:
                    (starved if replay.starved else waiting).append(replay)
                else:
                    heapq.heappush(due, (again, next(order), replay))
            # A missed `room` cannot stall a replay for long: refused ones are tried again at least this
            # often.
            timeout = 0.1 if waiting or starved else 1.0
            if due:
                timeout = min(timeout, due[0][0] - time.monotonic())
            if timeout > 0:
                self._wake.wait(timeout)
            if (waiting or starved) and not self._wake.is_set():
                self._room = True


class FileReplay:
    """One stream's replayed file, read by a `FileReader`."""

    def __init__(
        self, stream: str, config: FileSource, health: HealthConfig, offer: Offer, reader: FileReader
    ) -> None:
        self.stream = stream
        self.config = config
        self._offer = offer
        self._reader = reader
        self._stopping = threading.Event()
        self.closed = threading.Event()  # the reader has closed the file and hands on nothing more
        self._backoff = Backoff(health.retry_initial_seconds, health.retry_max_seconds, self._stopping)
        self._file: sf.SoundFile | None = None
        self._pending: AudioBlock | None = None  # read, not yet handed on
        self._started = 0.0  # monotonic time of the pass's first sample (real time)
        self._passed = 0  # samples of this pass read so far
        self.starved = False  # refused room in its last turn before handing anything on

    def start(self) -> None:
        self._reader.add(self)

    def request_stop(self) -> None:
        """Ask the reader to end this replay, without waiting (a pipeline stops all its sources at once)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._reader.stop(self)

    def stop(self, timeout: float = 2.0) -> None:
        self.request_stop()
        self.closed.wait(timeout)

    def close(self) -> None:
        """Reader thread: the file closed; nothing more is handed on."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending = None
        self.closed.set()

    def _replay(self, now: float) -> float | None:
        """Reader thread: hand on what is due and fits; return when to be served again (a monotonic
        time, or ROOM), or None when the replay has ended."""
        for handed in range(TURN_BLOCKS):
            if self._stopping.is_set():
                return None
            retry = self._fill(now)
            if self._pending is None:
                return retry
            if self.config.realtime:
                # Each block when its audio would have ended, as a microphone hands it on.
                at = self._started + self._passed / self._pending.rate
                if at > now:
                    return at
            block = self._pending
            if not self._offer(AudioBlock(block.stream, block.samples, block.rate, time.monotonic())):
                self.starved = handed == 0
                return ROOM
            self._pending = None
        return now  # its turn is over: the other replays, and requests to stop, come first

    def _fill(self, now: float) -> float | None:
        """Read the next block, opening the file first (and again at the end of a pass, with `loop`).
        Without a block, returns when to try again, or None once the replay has ended."""
        while self._pending is None:
            if self._file is None:
                retry = self._open(now)
                if retry is not None:
                    return retry
            try:
                self._pending = self._read()
            except _READ_ERRORS as exc:
                return self._lost(f"{self.config.path}: reading failed ({exc})", now)
            if self._pending is not None:
                break
            if self._passed == 0:  # emptied since its header was checked: no tight loop
                return self._lost(f"{self.config.path}: holds no audio samples", now)
            if not self._end():
                return None
        return None

    def _open(self, now: float) -> float | None:
        """Open the file for a pass; None when open, else when to try again."""
        path = self.config.path
        try:
            check_readable(path, self.config.channel)
            self._file = sf.SoundFile(path)
        except AudioError as exc:
            return self._lost(str(exc), now)
        except _READ_ERRORS as exc:
            return self._lost(f"{path}: not a readable audio file ({exc})", now)
        self._backoff.reset()
        self._offer(SourceNotice(self.stream, SourceState.OK, f"replaying {path}"))
        self._started, self._passed = time.monotonic(), 0
        return None

    def _read(self) -> AudioBlock | None:
        """The pass's next block, or None at its end."""
        assert self._file is not None
        rate = self._file.samplerate
        seconds = self.config.block_seconds
        seconds = seconds if self.config.realtime else max(seconds, FAST_BLOCK_SECONDS)
        data = self._file.read(max(1, int(seconds * rate)), dtype="float32", always_2d=True)
        if not len(data):
            return None
        self._passed += len(data)
        samples = np.ascontiguousarray(data[:, self.config.channel])
        return AudioBlock(self.stream, samples, rate, 0.0)

    def _end(self) -> bool:
        """At the end of a pass: True to replay the file again (`loop`)."""
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.config.loop:
            return True
        self._offer(SourceNotice(self.stream, SourceState.ENDED, f"end of {self.config.path}"))
        return False

    def _lost(self, detail: str, now: float) -> float:
        """The file cannot be read now (it may be being copied in): tried again, with back-off."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending = None
        self._offer(SourceNotice(self.stream, SourceState.LOST, detail))
        delay = self._backoff.take()
        logger.error("stream %s: %s; retrying in %.0f s", self.stream, detail, delay)
        return now + delay
