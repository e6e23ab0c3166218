"""`anomalyd record` through the real capture path: sounddevice -> PortAudio -> ALSA's file plugin.

The daemon's microphone is ALSA's `filemic` reading a FIFO that this test fills one device block at a time
at a few times real time (a regular file would be read thousands of times faster than real time, and
past its end gives stale data). A block written whole into an empty FIFO is read whole, so the daemon
captures the test's audio sample for sample, and what `record` writes can be held to it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from fixtures.synth import SAMPLE_RATE, render
from tests.conftest import ROOT
from tests.daemon_helpers import DaemonProcess
from tests.mqtt_helpers import PASSWORD, USER, Broker, Subscriber
from tests.test_capture import alsa_file_device

pytestmark = pytest.mark.slow

CAPTURE_RATE = 48_000  # Hz: the device runs at 3x the model's rate, so record goes through resampling
BLOCK = 4_800  # frames per device read: the daemon's 0.1 s blocks at 48 kHz
SPEED = 4.0  # the FIFO is filled this many times faster than real time
NOBODY = 65534
SEGMENT_NAME = re.compile(r"^fan-\d{8}T\d{6}Z-\d{4}\.wav$")


def machine_audio(seconds: float, index: int = 7) -> npt.NDArray[np.float32]:
    """Normal machine sound at the capture rate (rendered at 16 kHz, then upsampled)."""
    audio = render("normal", seed=1, index=index, seconds=seconds)
    return np.asarray(soxr.resample(audio, SAMPLE_RATE, CAPTURE_RATE), dtype=np.float32)


def at_model_rate(capture: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """What the daemon's streaming resampler makes of the capture (soxr's one-shot output is the same)."""
    return np.asarray(soxr.resample(capture, CAPTURE_RATE, SAMPLE_RATE), dtype=np.float32)


def read_segment(path: Path) -> npt.NDArray[np.float32]:
    data, rate = sf.read(path, dtype="int16")
    assert rate == SAMPLE_RATE
    return np.asarray(data, dtype=np.float32) / 32767


def locate(segment: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> int:
    """Where `segment` lies in `reference`: the peak of their normalised cross-correlation (machine sound
    is nearly periodic, so a plain correlation can peak at a louder stretch that only looks alike)."""
    n = len(reference) + len(segment)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(reference, size) * np.conj(np.fft.rfft(segment, size)), size)
    places = len(reference) - len(segment) + 1
    energy = np.concatenate([[0.0], np.cumsum(reference.astype(np.float64) ** 2)])
    local = np.sqrt(np.maximum(energy[len(segment) :][:places] - energy[:places], 1e-12))
    return int(np.argmax(corr[:places] / local))


def assert_same_audio(segment: npt.NDArray[np.float32], reference: npt.NDArray[np.float32], at: int) -> None:
    expected = reference[at : at + len(segment)]
    # 16-bit quantisation (half a step) is all that separates them.
    assert np.max(np.abs(segment - expected)) < 2 / 32767


class PacedFifo:
    """Feeds ALSA's file plugin through a FIFO, one device block per write, at SPEED x real time.

    PortAudio opens and closes the device while it lists devices; each time the reader goes, the writer
    opens the FIFO again for the next reader and goes on where it was.
    """

    def __init__(self, folder: Path, audio: npt.NDArray[np.float32], loop: bool = False) -> None:
        """`loop`: start the audio again at its end (past the end, ALSA's file plugin would read stale data
        as fast as it can) until stopped."""
        self.fifo = folder / "capture.fifo"
        os.mkfifo(self.fifo)
        self.conf = folder / "asound.conf"
        self.conf.write_text(
            'pcm.filemic {\n  type file\n  slave.pcm { type null }\n  file "/dev/null"\n'
            f'  infile "{self.fifo}"\n  format "raw"\n}}\npcm.default {{ type plug; slave.pcm "filemic" }}\n'
        )
        self.audio = np.ascontiguousarray(audio, dtype="<f4")
        self.loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        position, started = 0, time.monotonic()
        while not self._stop.is_set() and (self.loop or position < len(self.audio)):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                self._stop.wait(0.005)
                continue
            os.set_blocking(fd, True)
            # Room for many blocks: a writer that fell behind (a busy machine) and catches up must never
            # find the FIFO full, or a block would go in two parts and a read could get half of one.
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
            try:
                while not self._stop.is_set() and (self.loop or position < len(self.audio)):
                    at = position % len(self.audio) if self.loop else position
                    os.write(fd, self.audio[at : at + BLOCK].tobytes())
                    position += BLOCK
                    self._stop.wait(max(0.0, started + position / CAPTURE_RATE / SPEED - time.monotonic()))
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)


@dataclass
class Running:
    daemon: DaemonProcess
    folder: Path
    config: Path
    socket: Path
    reference: npt.NDArray[np.float32]  # the capture at the model rate
    scores: Subscriber
    env: dict[str, str]


@pytest.fixture(scope="module")
def running(bundle_dir: Path, certs: dict[str, Path]) -> Iterator[Running]:
    """A daemon listening to `filemic` (its FIFO fed at SPEED x real time), scores over MQTT every 0.2 s."""
    folder = Path(tempfile.mkdtemp(prefix="anomalyd-record-"))  # not pytest's: `nobody` must reach it
    os.chmod(folder, 0o755)
    capture = machine_audio(200.0)
    fifo = PacedFifo(folder, capture)
    fifo.start()
    (folder / "broker").mkdir()
    broker = Broker(folder / "broker", certs)
    broker.start()
    (folder / "mqtt-password").write_text(PASSWORD + "\n")
    sock = folder / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # left by an earlier daemon that was killed
    stale.close()
    config = folder / "anomalyd.toml"
    config.write_text(
        f'node = "edge1"\n[storage]\ndatabase = "events.db"\n[control]\nsocket = "{sock}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{USER}"\n'
        'password_file = "mqtt-password"\nscore_interval_seconds = 0.2\n[mqtt.homeassistant]\nenabled = false\n'
        f'[[streams]]\nname = "fan"\nbundle = "{bundle_dir}"\n[streams.source]\ntype = "mic"\n'
        f'device = "filemic"\nsample_rate = {CAPTURE_RATE}\n'
    )
    env = {"ALSA_CONFIG_PATH": str(fifo.conf)}
    daemon = DaemonProcess(config, env)
    scores = Subscriber(broker, "anomalyd/edge1/fan/score")
    try:
        daemon.wait_log(f"control channel on {sock}", timeout=60)
        scores.wait_for("/score", 3, timeout=30)
        yield Running(daemon, folder, config, sock, at_model_rate(capture), scores, env)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(15) == 0, daemon.log
        assert not sock.exists()  # removed at stop
        assert "removed the stale control socket" in daemon.log
        assert "Traceback" not in daemon.log
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        scores.close()
        broker.stop()
        fifo.stop()
        shutil.rmtree(folder, ignore_errors=True)


def record_cmd(config: Path, out: Path, *extra: str, minutes: str = "0.1") -> list[str]:
    return [sys.executable, "-m", "anomalyd", "record", "--config", str(config), "--stream", "fan",
            "--minutes", minutes, "--out", str(out), *extra]  # fmt: skip


def run_record(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT,
                          env={**os.environ, **env})  # fmt: skip


def test_record_from_the_running_daemon_while_it_keeps_scoring(running: Running, tmp_path: Path) -> None:
    scored_before = len(running.scores.on("/score"))
    result = run_record(record_cmd(running.config, tmp_path / "rec", "--segment-seconds", "3"), running.env)
    assert result.returncode == 0, result.stderr
    assert "from the running daemon" in result.stderr
    assert "device 'filemic', captured at 48000 Hz, segments at the model's 16000 Hz" in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # 0.1 min = two segments of 3 s
    paths = [Path(line.split("\t")[0]) for line in lines]
    assert all(line.endswith("\t3.0 s\tok") for line in lines)
    assert all(SEGMENT_NAME.match(p.name) for p in paths)
    assert [p.name[-8:] for p in paths] == ["0000.wav", "0001.wav"]

    manifest = json.loads((tmp_path / "rec" / "recording.json").read_text())
    assert {k: manifest[k] for k in ("stream", "device", "capture_rate", "rate", "source")} == {
        "stream": "fan", "device": "filemic", "capture_rate": 48000, "rate": 16000, "source": "daemon",
    }  # fmt: skip
    assert [s["file"] for s in manifest["segments"]] == [p.name for p in paths]
    assert all(s["seconds"] == 3.0 and s["flags"] == [] for s in manifest["segments"])

    # Sample for sample what the daemon scores: the capture, resampled to the model's rate.
    first, second = (read_segment(p) for p in paths)
    assert len(first) == len(second) == 3 * SAMPLE_RATE
    at = locate(first, running.reference)
    assert_same_audio(first, running.reference, at)
    assert_same_audio(second, running.reference, at + len(first))  # contiguous: nothing lost between

    # The daemon scored all along (a score every 0.2 s of wall time, 6 s of audio at 4x = 1.5 s).
    running.scores.wait_for("/score", scored_before + 10, timeout=10)
    assert running.daemon.process.poll() is None
    assert "worker cannot keep up" not in running.daemon.log

    # A second run adds to the folder and its manifest.
    again = run_record(record_cmd(running.config, tmp_path / "rec", "--segment-seconds", "1", minutes="0.01"),
                       running.env)  # fmt: skip
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "rec" / "recording.json").read_text())
    assert [s["file"][-8:] for s in manifest["segments"]] == ["0000.wav", "0001.wav", "0002.wav"]
    assert manifest["segments"][2]["seconds"] == 1.0


def test_ctrl_c_keeps_every_complete_segment(running: Running, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    process = subprocess.Popen(
        record_cmd(running.config, out, "--segment-seconds", "1", minutes="5"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **running.env},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(list(out.glob("*.wav"))) < 2 or not list(out.glob("*.partial")):
            assert time.monotonic() < deadline, "two segments and a third begun"
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    kept = sorted(out.glob("*.wav"))
    assert len(kept) >= 2
    assert f"interrupted: {len(kept)} complete segment(s) kept in {out}" in stderr
    assert not list(out.glob("*.partial"))
    assert len(stdout.splitlines()) == len(kept)
    manifest = json.loads((out / "recording.json").read_text())
    assert [s["file"] for s in manifest["segments"]] == [p.name for p in kept]
    assert all(sf.info(p).frames == SAMPLE_RATE for p in kept)


def test_a_client_that_stops_reading_is_dropped_and_never_stalls_the_daemon(running: Running) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(running.socket))
        sock.sendall(b'{"op": "record", "stream": "fan"}\n')
        sock.settimeout(10)
        assert json.loads(sock.recv(4096).split(b"\n")[0])["ok"] is True
        scored = len(running.scores.on("/score"))
        # ... and reads nothing more: the daemon's buffers fill, then it gives up on this client.
        running.daemon.wait_log("recording of stream fan dropped", timeout=30)
        assert len(running.scores.on("/score")) >= scored + 10  # scoring went on meanwhile
    running.scores.wait_for("/score", len(running.scores.on("/score")) + 5, timeout=10)
    assert "worker cannot keep up" not in running.daemon.log
    assert re.search(r"recording of stream fan dropped: .*\(\d+ dropped so far\)", running.daemon.log)


def test_garbage_on_the_socket_gets_an_error_line_and_the_daemon_lives(running: Running) -> None:
    def ask(data: bytes) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(running.socket))
            sock.sendall(data)
            return dict(json.loads(sock.recv(65536).split(b"\n")[0]))

    assert "not a JSON request" in str(ask(b"\x00\xff\xfe GET / HTTP/1.1\r\n\n")["error"])
    assert ask(b'{"op": "reboot"}\n')["error"] == "unknown op 'reboot'; known: mark, record"
    assert ask(b'{"op": "record", "stream": "pump"}\n')["error"] == (
        "record: this daemon runs no stream 'pump'; it runs: fan"
    )
    assert ask(b'{"op": "record"}\n')["error"] == 'record: give "stream", the name of a configured stream'
    assert ask(b'{"op": "record", "stream": "fan"}\n')["ok"] is True
    assert running.daemon.process.poll() is None


def test_a_user_who_is_not_the_daemons_is_refused(running: Running) -> None:
    out = running.folder / "nobody-out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = run_record([*as_nobody, *record_cmd(running.config, out)], running.env)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"anomalyd: error: cannot reach the daemon at {running.socket}: Permission denied (run as root or "
        "as a member of the daemon's group)"
    )
    os.chmod(running.socket, 0o666)  # loosened by mistake: the daemon still checks who is calling
    try:
        result = run_record([*as_nobody, *record_cmd(running.config, out)], running.env)
    finally:
        os.chmod(running.socket, 0o660)
    assert result.returncode == 2
    assert (
        f"anomalyd: error: the daemon refused: refused: uid {NOBODY} is neither root, the daemon's user "
        "(uid 0) nor in its group (gid 0)"
    ) in result.stderr
    assert not list(out.iterdir())
    assert "control channel: refused pid" in running.daemon.log


# ---- without a daemon ----------------------------------------------------------------------------------


def local_config(folder: Path, bundle: Path) -> Path:
    config = folder / "anomalyd.toml"
    config.write_text(
        f'[control]\nsocket = "{folder / "none.sock"}"\n'
        f'[[streams]]\nname = "fan"\nbundle = "{bundle}"\n[streams.source]\ntype = "mic"\n'
        f'device = "filemic"\nsample_rate = {CAPTURE_RATE}\n'
        '[[streams]]\nname = "pump"\nbundle = "b"\n[streams.source]\ntype = "mic"\ndevice = "x"\n'
    )
    return config


def test_without_a_daemon_record_opens_the_device_and_flags_silence_and_clipping(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """Two seconds of machine sound, one of digital silence (a dead microphone), one clipped, from ALSA."""
    second = CAPTURE_RATE
    t = np.arange(second) / CAPTURE_RATE
    capture = np.concatenate([
        machine_audio(2.0),
        np.zeros(second, dtype=np.float32),
        np.clip(1.6 * np.sin(2 * np.pi * 440 * t), -1, 1).astype(np.float32),
        machine_audio(3.0, index=8),  # beyond what is recorded: ALSA reads ahead
    ])  # fmt: skip
    conf = alsa_file_device(tmp_path, capture[:, None])
    config = local_config(tmp_path, bundle_dir)
    out = tmp_path / "rec"
    result = run_record(record_cmd(config, out, "--segment-seconds", "1", minutes=str(4 / 60)),
                        {"ALSA_CONFIG_PATH": str(conf)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        f"no daemon listens on {tmp_path / 'none.sock'}: recording stream fan from its source "
        in result.stderr
    )
    flags = [line.split("\t")[2] for line in result.stdout.splitlines()]
    assert flags == ["ok", "ok", "silent", "clipping"]
    manifest = json.loads((out / "recording.json").read_text())
    assert [s["flags"] for s in manifest["segments"]] == [[], [], ["silent"], ["clipping"]]
    assert manifest["source"] == "device"
    assert manifest["device"] == "filemic"
    assert manifest["capture_rate"] == CAPTURE_RATE
    # The device's audio from its first sample, resampled as the daemon does.
    reference = at_model_rate(capture)
    segments = [read_segment(out / s["file"]) for s in manifest["segments"]]
    assert_same_audio(np.concatenate(segments[:2]), reference, 0)


def test_record_refuses_an_unknown_stream_and_an_unwritable_folder(bundle_dir: Path, tmp_path: Path) -> None:
    config = local_config(tmp_path, bundle_dir)
    result = run_record([*record_cmd(config, tmp_path / "rec")[:7], "pumpp", "--minutes", "1", "--out",
                         str(tmp_path / "rec")], {})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"anomalyd: error: {config}: no stream 'pumpp'; configured streams: fan, pump\n"
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_record(record_cmd(config, blocker / "rec"), {})
    assert result.returncode == 2
    assert result.stderr == f"anomalyd: error: --out {blocker / 'rec'}: cannot write there: Not a directory\n"
    result = run_record(record_cmd(config, tmp_path / "rec", minutes="0"), {})
    assert result.returncode == 2
    assert "minutes must be above 0" in result.stderr
