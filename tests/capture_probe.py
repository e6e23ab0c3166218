"""Run in a child process by tests/test_capture.py: real capture through sounddevice -> PortAudio -> ALSA.

ALSA's file plugin hands over a raw file as fast as it is read and, past its end, stale buffer data; so
this harness lets each stream's first `seconds` of audio into the real pipeline and nothing after it.
Usage: python -m tests.capture_probe CONFIG SECONDS. Prints one JSON object: events, statuses, opens, scored, workers.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
import threading
from collections import defaultdict
from pathlib import Path

from anomalyd.config import load_config
from anomalyd.pipeline import Pipeline
from anomalyd.sources.base import AudioBlock, SourceMessage
from anomalyd.sources.mic import DeviceCapture
from anomalyd.store import StoreWriter, read_events


class FirstSecondsPipeline(Pipeline):
    def __init__(self, sink: StoreWriter, seconds: float, streams: int) -> None:
        super().__init__(sink)
        self._limit_s = seconds
        self._seen: dict[str, int] = defaultdict(int)
        self._full: set[str] = set()
        self._streams = streams
        self.done = threading.Event()

    def put_nowait(self, message: SourceMessage) -> None:
        if isinstance(message, AudioBlock):
            limit = int(self._limit_s * message.rate)
            room = limit - self._seen[message.stream]
            if room <= 0:
                self._full.add(message.stream)
                if len(self._full) == self._streams:
                    self.done.set()
                return
            message = dataclasses.replace(message, samples=message.samples[:room])
            self._seen[message.stream] += len(message.samples)
        super().put_nowait(message)


def main() -> int:
    config = load_config(Path(sys.argv[1]))
    store = StoreWriter(config.storage)
    store.start()
    pipeline = FirstSecondsPipeline(store, float(sys.argv[2]), len(config.streams))
    pipeline.start(config)
    finished = pipeline.done.wait(60.0)
    opens = [s.opened for s in pipeline._sources.values() if isinstance(s, DeviceCapture)]
    pipeline.stop(3.0)
    store.stop(3.0)
    conn = sqlite3.connect(config.storage.database)
    statuses = conn.execute("SELECT stream, state FROM source_status ORDER BY id").fetchall()
    print(json.dumps({
        "finished": finished,
        "events": read_events(config.storage.database),
        "statuses": statuses,
        "opens": opens,
        "scored": pipeline.windows_scored,
        "workers": pipeline.workers,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
