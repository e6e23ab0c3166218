"""The field loop end to end, as an engineer runs it on the box: a running daemon listening to a real
capture device (PortAudio -> ALSA's file plugin), `anomalyd record` from it, train on what was recorded,
calibrate to a false-alarm budget, install the bundle where the daemon reads it, reload, see the new
model's id on the next event, and mark that event a false alarm through the running daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from anomalyd.bundle import load_bundle
from anomalyd.database import read_events
from fixtures.synth import SAMPLE_RATE, render
from tests.conftest import ROOT, SMALL_PRESET
from tests.daemon_helpers import DaemonProcess
from tests.test_record import CAPTURE_RATE, PacedFifo, machine_audio

pytestmark = pytest.mark.slow


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="anomalyd-loop-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def at_capture_rate(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(soxr.resample(audio, SAMPLE_RATE, CAPTURE_RATE), dtype=np.float32)


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """A command of the loop; it must succeed. Returns its stdout."""
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_record_train_calibrate_install_reload_mark(bundle_dir: Path, folder: Path) -> None:
    served = folder / "state" / "models" / "fan"
    run("-m", "anomalyd", "bundle", "install", bundle_dir, "--into", served)
    old_id = load_bundle(served).meta.model_id

    fifo = PacedFifo(folder, machine_audio(240.0), loop=True)  # the line's microphone, at 4x real time
    fifo.start()
    env = {"ALSA_CONFIG_PATH": str(fifo.conf)}
    # A second microphone of the same chain (48 kHz) on a machine of the same kind, replayed from a file:
    # its bearing fault comes and goes every 24 s.
    fault = folder / "fan.wav"
    sf.write(fault, at_capture_rate(render("bearing", seed=1, index=7, seconds=24.0, onset=6.0, until=14.0)),
             CAPTURE_RATE, subtype="PCM_16")  # fmt: skip
    sock = folder / "control.sock"
    config = folder / "anomalyd.toml"
    config.write_text(
        f'[storage]\ndatabase = "state/events.db"\n[storage.clips]\ndirectory = "state/clips"\nmin_free_mb = 0\n'
        f'[control]\nsocket = "{sock}"\n'
        f'[[streams]]\nname = "line"\nbundle = "{served}"\n[streams.source]\ntype = "mic"\ndevice = "filemic"\n'
        f"sample_rate = {CAPTURE_RATE}\n"
        f'[[streams]]\nname = "fan"\nbundle = "{served}"\n[streams.source]\ntype = "file"\npath = "{fault}"\n'
        "realtime = true\nloop = true\n[streams.detector]\ncooldown_seconds = 0\n"
    )
    daemon = DaemonProcess(config, env)
    try:
        daemon.wait_log(f"control channel on {sock}", timeout=120)

        # 1. Record a minute of the line's normal sound from the running daemon.
        recorded = folder / "rec"
        out = run("-m", "anomalyd", "record", "--config", config, "--stream", "line", "--minutes", "1",
                  "--out", recorded, env=env, timeout=180)  # fmt: skip
        segments = sorted(recorded.glob("line-*.wav"))
        assert len(segments) == 6, out
        assert all(line.endswith("\t10.0 s\tok") for line in out.splitlines()), out
        manifest = json.loads((recorded / "recording.json").read_text())
        assert (manifest["source"], manifest["device"], manifest["capture_rate"]) == (
            "daemon",
            "filemic",
            48_000,
        )

        # 2. Train on it (a short run: the loop, not the model, is under test here).
        fresh = folder / "fan-v2"
        run("-m", "training.train", "--normal", recorded, "--out", fresh, "--preset", SMALL_PRESET,
            "--epochs", "8", "--name", "fan-v2", "--quiet")  # fmt: skip
        new_id = load_bundle(fresh).meta.model_id
        assert new_id != old_id
        audio = load_bundle(fresh).meta.training_audio
        assert audio is not None
        assert (audio.devices, audio.capture_rates, audio.files) == (("filemic",), (48_000,), 6)

        # 3. Calibrate on normal audio it has never heard, recorded later through the same chain (audio
        #    of another chain or rate would need its own model: see the field guide).
        later = folder / "later"
        run("-m", "anomalyd", "record", "--config", config, "--stream", "line", "--minutes", "1",
            "--out", later, env=env, timeout=180)  # fmt: skip
        run(
            "-m", "anomalyd", "calibrate", "--bundle", fresh, "--normal", later, "--false-alarms-per-day", "1"
        )
        calibration = json.loads((fresh / "model.json").read_text())["threshold"]["calibration"]
        assert calibration["false_alarms_per_day"] == 1.0
        assert calibration["events"] == 0

        # 4. Install where the daemon reads it, reload, and the next event is the new model's.
        run("-m", "anomalyd", "bundle", "install", fresh, "--into", served)
        seen = len(daemon.log)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda: "reloaded" in daemon.log[seen:], 60, "the reload")
        database = folder / "state" / "events.db"

        daemon.wait_for(
            lambda: any((e["stream"], e["model_id"]) == ("fan", new_id) for e in read_events(database)),
            120, "an event of the new model",
        )  # fmt: skip

        # 5. An operator says it was normal: the running daemon marks it and keeps its clip as normal audio.
        # (any event that has ended and kept its clip: the old model's, on the fan's replayed fault)
        event = next(e for e in read_events(database) if e["state"] == "closed" and e["clip_path"])
        event_id, stream = str(event["event_id"]), str(event["stream"])
        out = run("-m", "anomalyd", "events", "mark", event_id[:8], "--normal", "--config", config)
        assert f"event {event_id} ({stream}) marked a false alarm" in out
        daemon.wait_log(f"event {event_id} marked a false alarm")  # done by the daemon's own writer
        marked = next(e for e in read_events(database) if e["event_id"] == event_id)
        assert marked["marked_normal_at"]
        copy = Path(out.strip().rsplit(": ", 1)[1])
        assert copy.is_file()
        assert copy.parent == folder / "state" / "normal" / stream

        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(15) == 0, daemon.log
        assert "Traceback" not in daemon.log
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        fifo.stop()
