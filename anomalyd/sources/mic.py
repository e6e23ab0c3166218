"""Microphones through sounddevice/PortAudio: devices chosen by name, shared between streams, supervised.

One `DeviceCapture` per device opens it once with as many channels as its streams need and hands each
stream its channel. A supervisor thread watches it: a device that errors, stops, or delivers no audio for
`stall_seconds` is reported lost, closed and reopened with capped exponential back-off. PortAudio lists
devices only when it starts, so a device that was unplugged is looked for by a short-lived probe process;
when the probe sees it again, PortAudio is restarted once (the other devices reopen at once) and the
device is picked up.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sounddevice as sd

from anomalyd.config import HealthConfig
from anomalyd.errors import AnomalydError
from anomalyd.records import SourceState
from anomalyd.sources.base import AudioBlock, Backoff, Sink, SourceNotice

logger = logging.getLogger(__name__)


class DeviceError(AnomalydError):
    """An input device that is missing, ambiguous or cannot provide what a stream asks for."""


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    host_api: str
    channels: int
    default_rate: int


def input_devices() -> list[InputDevice]:
    """The input devices PortAudio knows of now."""
    apis = sd.query_hostapis()
    return [
        InputDevice(
            index=int(d["index"]),
            name=str(d["name"]),
            host_api=str(apis[d["hostapi"]]["name"]),
            channels=int(d["max_input_channels"]),
            default_rate=int(d["default_samplerate"]),
        )
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def resolve_device(spec: str | int, devices: list[InputDevice]) -> InputDevice:
    """An index, an exact name, or a case-insensitive substring that matches exactly one device."""
    if isinstance(spec, int):
        for device in devices:
            if device.index == spec:
                return device
        raise DeviceError(f"no input device with index {spec}")
    exact = [d for d in devices if d.name == spec]
    if exact:
        return exact[0]
    matches = [d for d in devices if spec.lower() in d.name.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        names = ", ".join(repr(d.name) for d in devices) or "none"
        raise DeviceError(f"no input device matches {spec!r} (input devices: {names})")
    names = ", ".join(repr(d.name) for d in matches)
    raise DeviceError(f"input device {spec!r} is ambiguous: matches {names}")


_PROBE = (
    "import json, sounddevice as sd; "
    "print(json.dumps([d['name'] for d in sd.query_devices() if d['max_input_channels'] > 0]))"
)


def probe_device_names(timeout: float = 15.0) -> list[str]:
    """Input device names as a fresh PortAudio sees them, from a child process (this one's list is fixed)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=True
        )
        return [str(n) for n in json.loads(result.stdout)]
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        logger.warning("device probe failed: %s", exc)
        return []


class PortAudioHost:
    """Process-wide PortAudio: opening streams and restarting the library (to re-list devices) exclude
    each other; `generation` counts restarts so that every capture knows to reopen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0

    def rescan(self) -> None:
        with self.lock:
            sd._terminate()
            sd._initialize()
            self.generation += 1
        logger.info("PortAudio restarted to re-list devices (generation %d)", self.generation)


class InputStreamLike(Protocol):
    active: bool

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


StreamFactory = Callable[..., InputStreamLike]


@dataclass(frozen=True)
class MicIO:
    """The three ways the capture reaches PortAudio; tests replace them to unplug a device on cue."""

    stream_factory: StreamFactory = sd.InputStream
    list_devices: Callable[[], list[InputDevice]] = input_devices
    probe: Callable[[], list[str]] = probe_device_names


@dataclass(frozen=True)
class Member:
    stream: str
    channel: int


class DeviceCapture:
    """One input device, opened once for all of its member streams, kept open by a supervisor thread."""

    def __init__(
        self,
        *,
        spec: str | int,
        sample_rate: int,
        block_seconds: float,
        members: list[Member],
        health: HealthConfig,
        sink: Sink,
        host: PortAudioHost,
        io: MicIO,
    ) -> None:
        self.spec = spec
        self.sample_rate = sample_rate
        self.block_seconds = block_seconds
        self.members = members
        self.health = health
        self._sink = sink
        self._host = host
        self._io = io
        self._stop = threading.Event()
        self._backoff = Backoff(health.retry_initial_seconds, health.retry_max_seconds, self._stop)
        self._thread = threading.Thread(target=self._run, name=f"mic-{spec}", daemon=True)
        self._last_audio = 0.0
        self._rate = 0
        self.device_name = str(spec)  # the device's full name once opened
        self.overflows = 0
        self.opened = 0  # how many times the device was opened: 1 + recoveries

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end, without waiting (a pipeline stops all its sources at once)."""
        self._stop.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def capture_rate(self) -> int | None:
        """Hz, the rate the device was opened at; None before it first opened."""
        return self._rate or None

    def _notify(self, state: SourceState, detail: str) -> None:
        for member in self.members:
            self._sink(SourceNotice(member.stream, state, detail))

    def _callback(self, indata: Any, frames: int, time_info: Any, status: sd.CallbackFlags) -> None:
        # Runs on PortAudio's thread: copy the channels out and enqueue, nothing more.
        now = time.monotonic()
        self._last_audio = now
        if status.input_overflow:
            self.overflows += 1
        for member in self.members:
            self._sink(AudioBlock(member.stream, indata[:, member.channel].copy(), self._rate, now))

    def _open(self) -> InputStreamLike:
        with self._host.lock:
            device = resolve_device(self.spec, self._io.list_devices())
            channels = max(m.channel for m in self.members) + 1
            if channels > device.channels:
                raise DeviceError(
                    f"device {device.name!r} has {device.channels} input channels, stream needs channel "
                    f"{channels - 1}"
                )
            self._rate = self.sample_rate or device.default_rate
            self.device_name = device.name
            stream = self._io.stream_factory(
                device=device.index,
                channels=channels,
                samplerate=self._rate,
                blocksize=max(1, int(self.block_seconds * self._rate)),
                dtype="float32",
                callback=self._callback,
            )
            self._last_audio = time.monotonic()
            stream.start()
        self.opened += 1
        logger.info(
            "device %r opened: %s, %d channel(s) at %d Hz for %s",
            self.spec, device.name, channels, self._rate, ", ".join(m.stream for m in self.members),
        )  # fmt: skip
        return stream

    def _watch(self, stream: InputStreamLike, generation: int) -> str:
        """Wait until the stream needs reopening; return why ('' when stopping)."""
        while not self._stop.wait(0.25):
            if self._host.generation != generation:
                return "rescan"
            if not stream.active:
                return "the device stopped delivering audio (stream no longer active)"
            silent_for = time.monotonic() - self._last_audio
            if silent_for > self.health.stall_seconds:
                return f"no audio from the device for {silent_for:.1f} s"
        return ""

    def _close(self, stream: InputStreamLike) -> None:
        try:
            stream.stop()
            stream.close()
        except (sd.PortAudioError, OSError) as exc:
            logger.debug("closing device %r: %s", self.spec, exc)

    def _device_returned(self) -> bool:
        """Whether a fresh PortAudio sees the device that this process's PortAudio no longer finds."""
        names = self._io.probe()
        devices = [InputDevice(i, n, "", 1 << 16, 0) for i, n in enumerate(names)]
        try:
            resolve_device(self.spec, devices)
        except DeviceError:
            return False
        return True

    def _run(self) -> None:
        # The supervisor must outlive anything a driver or a device list throws at it.
        while not self._stop.is_set():
            try:
                self._supervise()
            except Exception:
                logger.exception("device %r: supervisor failed; restarting it", self.spec)
                if not self._backoff.wait():
                    return

    def _supervise(self) -> None:
        lost = False
        rescanned = False  # one restart of PortAudio per back-off step, never a tight loop of them
        while not self._stop.is_set():
            generation = self._host.generation
            try:
                stream = self._open()
            except (DeviceError, sd.PortAudioError, ValueError, OSError) as exc:
                if not lost:
                    self._notify(SourceState.LOST, str(exc))
                    logger.error("device %r: %s", self.spec, exc)
                    lost = True
                missing = isinstance(exc, DeviceError) and "no input device" in str(exc)
                if missing and not rescanned and self._device_returned():
                    self._host.rescan()
                    rescanned = True
                    continue
                logger.info("device %r: next attempt in %.1f s", self.spec, self._backoff.next_delay)
                if not self._backoff.wait():
                    break
                rescanned = False
                continue
            self._backoff.reset()
            lost = False
            self._notify(SourceState.OK, f"capturing at {self._rate} Hz")
            why = self._watch(stream, generation)
            self._close(stream)
            if why and why != "rescan":
                self._notify(SourceState.LOST, why)
                logger.error("device %r lost: %s", self.spec, why)
                lost = True
                if not self._backoff.wait():
                    break
