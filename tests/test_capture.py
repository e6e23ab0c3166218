"""Microphone streams: real capture through PortAudio from an ALSA file device, and a device that
vanishes mid-run and comes back (faked at the PortAudio seam only)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sounddevice as sd

from anomalyd.config import parse_config
from anomalyd.pipeline import Pipeline
from anomalyd.sources.mic import DeviceError, InputDevice, MicIO, resolve_device
from anomalyd.store import StoreWriter
from fixtures.synth import render
from tests.conftest import ROOT


def alsa_file_device(folder: Path, channels: np.ndarray) -> Path:
    """An ALSA config whose device 'filemic' plays back `channels` (n, c) float32 as captured input."""
    raw = folder / "capture.raw"
    np.ascontiguousarray(channels, dtype="<f4").tofile(raw)
    conf = folder / "asound.conf"
    conf.write_text(
        'pcm.filemic {\n  type file\n  slave.pcm { type null }\n  file "/dev/null"\n'
        f'  infile "{raw}"\n  format "raw"\n}}\n'
        'pcm.default { type plug; slave.pcm "filemic" }\n'
    )
    return conf


@pytest.mark.slow
def test_capture_through_portaudio_into_events(bundle_dir: Path, tmp_path: Path) -> None:
    """Two streams share one 2-channel device: channel 0 hears a fault from 12 s, channel 1 stays normal.

    The device runs at the model's rate: resampling from other capture rates is held to offline scoring in
    test_streaming.py (a 16 -> 48 -> 16 kHz round trip here would itself dull the top mel bands).
    """
    seconds, onset = 30.0, 12.0
    faulty = render("rubbing", seed=1, index=4, seconds=seconds + 10, onset=onset)
    normal = render("normal", seed=1, index=5, seconds=seconds + 10)
    conf = alsa_file_device(tmp_path, np.stack([faulty, normal], axis=1))
    config = tmp_path / "d.toml"
    stream = '[[streams]]\nname = "{name}"\nbundle = "{bundle}"\n[streams.source]\ntype = "mic"\ndevice = "filemic"\nchannel = {ch}\nsample_rate = 16000\n'
    config.write_text(
        '[storage]\ndatabase = "events.db"\n[storage.clips]\ndirectory = "clips"\n'
        + stream.format(name="fan", bundle=bundle_dir, ch=0)
        + stream.format(name="pump", bundle=bundle_dir, ch=1)
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests.capture_probe", str(config), str(seconds)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={**os.environ, "ALSA_CONFIG_PATH": str(conf)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["finished"], result.stderr
    assert report["opens"] == [1]  # one device, opened once for both streams
    # The opening `ok` of each stream is told once; no loss, so no recovery to report. Streams are told
    # apart, not ordered: streams on different workers report independently.
    assert sorted(report["statuses"]) == [["fan", "ok"], ["pump", "ok"]], (report, result.stderr)
    (event,) = report["events"]
    assert event["stream"] == "fan"
    conn = sqlite3.connect(tmp_path / "events.db")
    (start_sample,) = conn.execute("SELECT start_sample FROM events").fetchone()
    assert abs(start_sample / 16_000 - onset) <= (1024 + 63 * 512) / 16_000
    assert report["scored"] >= 2 * 50  # about 55 windows per stream in 30 s


def test_device_names_resolve_by_substring_index_and_refuse_ambiguity() -> None:
    devices = [InputDevice(0, "HDA Intel PCH: ALC3232 Analog", "ALSA", 2, 48000),
               InputDevice(3, "USB Audio Device: - (hw:1,0)", "ALSA", 8, 16000),
               InputDevice(4, "USB Audio Device #2", "ALSA", 1, 16000)]  # fmt: skip
    assert resolve_device("alc3232", devices).index == 0
    assert resolve_device(3, devices).index == 3
    assert resolve_device("USB Audio Device #2", devices).index == 4  # exact name wins
    with pytest.raises(
        DeviceError, match="ambiguous: matches 'USB Audio Device: - \\(hw:1,0\\)', 'USB Audio Device #2'"
    ):
        resolve_device("usb", devices)
    with pytest.raises(DeviceError, match="no input device matches 'Focusrite'"):
        resolve_device("Focusrite", devices)
    with pytest.raises(DeviceError, match="no input device with index 9"):
        resolve_device(9, devices)


class FakeDevice:
    """A USB microphone that can be unplugged: audio from a recording at 20x real time while plugged."""

    def __init__(self, name: str, audio: np.ndarray) -> None:
        self.name = name
        self.audio = audio
        self.plugged = True


class FakeStream:
    def __init__(
        self, device: FakeDevice, channels: int, samplerate: int, blocksize: int, callback, **_: object
    ) -> None:  # type: ignore[no-untyped-def]
        self.device, self.blocksize, self.callback = device, blocksize, callback
        self.channels = channels
        self.active = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if not self.device.plugged:
            raise sd.PortAudioError("Error opening InputStream: Device unavailable")
        self.active = True
        self._thread.start()

    def _run(self) -> None:
        position = 0
        while not self._stop.wait(self.blocksize / 16_000 / 20):
            if not self.device.plugged:
                self.active = False  # what PortAudio reports once the ALSA device has gone
                return
            block = np.take(self.device.audio, range(position, position + self.blocksize), mode="wrap")
            position += self.blocksize
            self.callback(
                np.repeat(block[:, None], self.channels, axis=1), self.blocksize, None, sd.CallbackFlags()
            )

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()


@pytest.mark.slow
def test_a_device_that_vanishes_is_reported_and_picked_up_again(bundle_dir: Path, tmp_path: Path) -> None:
    devices = {
        n: FakeDevice(n, render("normal", seed=1, index=i, seconds=20.0))
        for i, n in enumerate(["Fake A", "Fake B"], 6)
    }
    # Like PortAudio, this process's device list is taken when the library (re)starts, never in between.
    listing: dict[str, object] = {"generation": -1, "names": list(devices)}

    def list_devices() -> list[InputDevice]:
        if pipeline._host.generation != listing["generation"]:
            listing["generation"] = pipeline._host.generation
            listing["names"] = [n for n, d in devices.items() if d.plugged]
        names = listing["names"]
        assert isinstance(names, list)
        return [InputDevice(i, n, "fake", 2, 16_000) for i, n in enumerate(devices) if n in names]

    io = MicIO(
        stream_factory=lambda device, **kw: FakeStream(devices[["Fake A", "Fake B"][device]], **kw),
        list_devices=list_devices,
        probe=lambda: [n for n, d in devices.items() if d.plugged],  # a fresh PortAudio sees what is plugged
    )
    text = '[health]\nretry_initial_seconds = 0.05\nretry_max_seconds = 0.2\nstall_seconds = 1.0\n[storage]\ndatabase = "events.db"\n'
    for name, device in (("a", "Fake A"), ("b", "Fake B")):
        text += f'[[streams]]\nname = "{name}"\nbundle = "{bundle_dir}"\n[streams.source]\ntype = "mic"\ndevice = "{device}"\n'
    config = parse_config(text, "test", tmp_path)
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store, io)
    devices["Fake A"].plugged = False  # unplugged when the daemon starts: this process never lists it
    pipeline.start(config)
    runtimes = {r.name: r for r in pipeline.streams()}
    try:
        wait_until(lambda: runtimes["a"].health.state.value == "lost", "stream a reported lost at start")
        wait_until(lambda: runtimes["b"].windows_scored > 3, "stream b scoring")
        time.sleep(0.5)
        assert runtimes["a"].windows_scored == 0

        devices["Fake A"].plugged = True  # plugged in: only a fresh PortAudio lists it
        wait_until(lambda: runtimes["a"].health.state.value == "ok", "stream a picked up")
        assert pipeline._host.generation == 1  # by one restart of PortAudio, after a probe saw it
        wait_until(lambda: runtimes["a"].windows_scored > 3, "stream a scoring")

        devices["Fake A"].plugged = False  # pulled out mid-run
        wait_until(lambda: runtimes["a"].health.state.value == "lost", "stream a reported lost")
        a_at_loss, b_at_loss = runtimes["a"].windows_scored, runtimes["b"].windows_scored
        time.sleep(1.0)
        assert runtimes["a"].windows_scored == a_at_loss
        assert runtimes["b"].windows_scored > b_at_loss + 5  # the other stream keeps running

        devices["Fake A"].plugged = True  # back where it was: reopened by the retries alone
        wait_until(lambda: runtimes["a"].health.state.value == "ok", "stream a recovered")
        resumed = runtimes["a"].windows_scored
        wait_until(lambda: runtimes["a"].windows_scored > resumed + 3, "stream a scoring again")
        assert pipeline._host.generation == 1
    finally:
        pipeline.stop(3.0)
        store.stop(3.0)
    conn = sqlite3.connect(tmp_path / "events.db")
    history = conn.execute("SELECT state FROM source_status WHERE stream = 'a' ORDER BY id").fetchall()
    assert [s for (s,) in history] == ["lost", "ok", "lost", "ok"]
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0  # an outage is not an anomaly


def wait_until(condition, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_devices_command_lists_the_alsa_device(tmp_path: Path) -> None:
    conf = alsa_file_device(tmp_path, np.zeros((16_000, 2), dtype=np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "anomalyd", "devices"], capture_output=True, text=True, timeout=60,
        check=False, cwd=ROOT, env={**os.environ, "ALSA_CONFIG_PATH": str(conf)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["index", "channels", "rate", "host", "API", "name"]
    assert any(line.split()[-1] == "filemic" and "ALSA" in line for line in lines[1:])
