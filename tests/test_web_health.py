"""/healthz and `anomalyd_healthy` say what the watchdog says: a thread that makes no progress is named,
and the answer is 503 until it moves again. The daemon's real threads run in this process so that one
of them, the store's writer, can be held for real (inside the answer to a command it handles)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from anomalyd.config import parse_config
from anomalyd.live import LiveView, watched_beats
from anomalyd.marks import MarkCommand
from anomalyd.pipeline import Pipeline
from anomalyd.records import utc_now
from anomalyd.store import StoreWriter
from anomalyd.web.server import WebServer
from tests.daemon_helpers import write_recording
from tests.mqtt_helpers import free_port
from tests.web_helpers import Client

pytestmark = pytest.mark.slow

STALE_S = 1.0


def test_healthz_names_a_stalled_thread_until_it_moves_again(bundle_dir: Path, tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "fan.wav", "normal", 20.0)
    port = free_port()
    config = parse_config(
        f'[storage]\ndatabase = "events.db"\n[web]\nenabled = true\nport = {port}\n'
        f'[[streams]]\nname = "fan"\nbundle = "{bundle_dir}"\n'
        f'[streams.source]\ntype = "file"\npath = "{recording}"\nrealtime = true\nloop = true\n',
        "test", tmp_path,
    )  # fmt: skip
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store)
    pipeline.start(config)
    view = LiveView(
        "edge1", pipeline, store=store, publisher=None,
        beats=lambda: watched_beats(time.monotonic(), pipeline, store, None),
        stale_seconds=STALE_S, stopping=lambda: False,
    )  # fmt: skip
    server = WebServer(config.web, view)
    server.start()
    client = Client(f"http://127.0.0.1:{port}")
    release = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while client.get("/healthz").status != 200:
            assert time.monotonic() < deadline, client.get("/healthz").body
            time.sleep(0.1)

        def hold(marked: object, refused: str) -> None:  # runs on the store's writer thread
            release.wait(30)

        store.put(MarkCommand(None, "0123456789abcdef", utc_now(), answer=hold))
        deadline = time.monotonic() + 10
        while (answer := client.get("/healthz")).status == 200:
            assert time.monotonic() < deadline, "the held writer never showed as stalled"
            time.sleep(0.1)
        assert answer.status == 503
        body = answer.json()
        assert body["status"] == "stalled"
        assert body["stalled"] == ["store writer"]  # the worker and the main loop go on
        assert b"anomalyd_healthy 0.0" in client.get("/metrics").body
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/healthz").status != 200:
            assert time.monotonic() < deadline, "healthz did not recover once the writer moved"
            time.sleep(0.1)
        assert b"anomalyd_healthy 1.0" in client.get("/metrics").body
    finally:
        release.set()
        server.stop()
        pipeline.stop()
        store.stop(2.0)
