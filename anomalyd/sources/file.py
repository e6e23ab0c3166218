"""Replay of a WAV or FLAC file as a stream: paced in real time or as fast as the pipeline takes it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from anomalyd.audio import check_readable
from anomalyd.config import FileSource, HealthConfig
from anomalyd.errors import AudioError
from anomalyd.records import SourceState
from anomalyd.sources.base import AudioBlock, Backoff, Sink, SourceNotice

logger = logging.getLogger(__name__)

# Taken as fast as the pipeline takes it, a file is read at least this much at a time: fewer steps per
# second of audio, and the worker merges a stream's waiting blocks anyway.
FAST_BLOCK_SECONDS = 0.5


class FileReplay:
    def __init__(self, stream: str, config: FileSource, health: HealthConfig, sink: Sink) -> None:
        self.stream = stream
        self.config = config
        self._sink = sink
        self._stop = threading.Event()
        self._backoff = Backoff(health.retry_initial_seconds, health.retry_max_seconds, self._stop)
        self._thread = threading.Thread(target=self._run, name=f"file-{stream}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end, without waiting (a pipeline stops all its sources at once)."""
        self._stop.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        path = self.config.path
        while not self._stop.is_set():
            try:
                check_readable(path, self.config.channel)
            except AudioError as exc:
                # The file may be being copied in; keep trying, as for a microphone that is unplugged.
                self._sink(SourceNotice(self.stream, SourceState.LOST, str(exc)))
                logger.error("stream %s: %s; retrying in %.0f s", self.stream, exc, self._backoff.next_delay)
                if not self._backoff.wait():
                    return
                continue
            self._sink(SourceNotice(self.stream, SourceState.OK, f"replaying {path}"))
            self._replay(path)
            if not self.config.loop:
                break
        if not self._stop.is_set():
            self._sink(SourceNotice(self.stream, SourceState.ENDED, f"end of {path}"))

    def _replay(self, path: Path) -> None:
        """Hand the file on block by block; in real time, each block when its audio would have ended."""
        passes = 0
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            seconds = self.config.block_seconds
            seconds = seconds if self.config.realtime else max(seconds, FAST_BLOCK_SECONDS)
            block = max(1, int(seconds * rate))
            started = time.monotonic()
            for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                if self._stop.is_set():
                    return
                samples = np.ascontiguousarray(data[:, self.config.channel])
                passes += len(samples)
                if self.config.realtime:
                    self._stop.wait(max(0.0, started + passes / rate - time.monotonic()))
                self._sink(AudioBlock(self.stream, samples, rate, time.monotonic()))
