"""Helpers for tests that run `anomalyd run` as a real process on replayed recordings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import soundfile as sf

from fixtures.synth import SAMPLE_RATE, get_machine
from tests.conftest import ROOT


def write_recording(
    path: Path,
    kind: str,
    seconds: float,
    onset: float = 0.0,
    until: float | None = None,
    *,
    index: int = 4,
    machine: str = "fan",
) -> Path:
    """A synthetic recording of a held-out machine run (seed 1; index 4 is a typical one), `kind` from
    onset to until."""
    render = get_machine(machine).render
    audio = render(kind, seed=1, index=index, seconds=seconds, onset=onset, until=until)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path


STREAM_KEYS = (
    "area",
    "mute_minutes",
)  # keys of the stream's own table; the rest are the source's or detector's


def write_config(
    path: Path, bundle: Path, streams: dict[str, dict[str, object]], extra: str = "", clips: str = ""
) -> Path:
    """A daemon config with file-replay streams: {name: {path, realtime, loop, area, detector keys...}};
    `clips`: more lines for [storage.clips]."""
    lines = [extra, "[storage]", 'database = "events.db"', "[storage.clips]", 'directory = "clips"', clips]
    if "[control]" not in extra:  # its own control socket: never another test's daemon
        lines += ["[control]", 'socket = "control.sock"']
    for name, spec in streams.items():
        lines += ["[[streams]]", f'name = "{name}"', f'bundle = "{bundle}"']
        lines += [f"{k} = {json.dumps(spec[k])}" for k in STREAM_KEYS if k in spec]
        lines += ["[streams.source]", 'type = "file"']
        lines += [f'path = "{spec["path"]}"', f"realtime = {str(spec.get('realtime', False)).lower()}"]
        lines += [f"loop = {str(spec.get('loop', False)).lower()}"]
        detector = {k: v for k, v in spec.items() if k not in ("path", "realtime", "loop", *STREAM_KEYS)}
        if detector:
            lines.append("[streams.detector]")
            lines += [f"{k} = {v}" for k, v in detector.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """`anomalyd run` in its own process, its log in a file that tests can wait on."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, uid: int | None = None) -> None:
        """`uid`: run the daemon as this user and group id (with no supplementary groups), as systemd's
        DynamicUser would."""
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("w")
        user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        self.process = subprocess.Popen(
            [*user, sys.executable, "-m", "anomalyd", "run", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:  # a failed test: leave no daemon behind
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM, as systemd stops it: it must exit 0 within `timeout`, without a traceback. Its log."""
        self.signal(signal.SIGTERM)
        status = self.wait_exit(timeout)
        log = self.log
        assert status == 0, log
        assert "Traceback" not in log, log
        return log

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {what}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.log}")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        self.wait_for(lambda: text in self.log, timeout, repr(text))

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()
