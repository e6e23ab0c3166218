"""`anomalyd record`: normal audio of a configured stream, in fixed-length segments, for training.

When a daemon listens on the config's control socket, it owns the device: it streams the stream's audio
at the model's rate (the very samples it scores, after its source and resampling) while it keeps
monitoring. Otherwise the stream's source is opened here, with the daemon's source classes, sanitising and
resampling. Either way this process writes the files, as the user who runs it: the daemon (often another
user) never writes into the user's folders.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import logging
import math
import os
import queue
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from anomalyd.bundle import load_bundle
from anomalyd.config import DaemonConfig, StreamConfig
from anomalyd.control import ControlClient
from anomalyd.errors import AnomalydError, ControlError
from anomalyd.features import SAMPLE_RATE
from anomalyd.health import sanitise
from anomalyd.records import SourceState, utc_now
from anomalyd.segments import Manifest, RecordingSource, Segment, SegmentWriter, remove_partials
from anomalyd.sources.base import AudioBlock, SourceMessage, SourceNotice
from anomalyd.streaming import Resampler

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
POLL_S = 0.25  # the longest the loop waits before it looks at Ctrl-C again
NO_AUDIO_TIMEOUT_S = 30.0  # nothing at all from the daemon for this long: give up
MAX_LINE_BYTES = 4_000_000  # an audio line from the daemon is ~45 kB
LOCAL_QUEUE_BLOCKS = 600  # captured blocks waiting to be written (60 s at 0.1 s blocks)


@dataclass(frozen=True)
class RecordOptions:
    stream: str
    seconds: float  # how much audio is asked for (rounded up to whole segments)
    out: Path
    segment_seconds: int


@dataclass(frozen=True)
class Audio:
    samples: npt.NDArray[np.float32]  # at the model rate
    capture_rate: int  # Hz


@dataclass(frozen=True)
class Gap:
    """The source was lost (or ended): the audio before and after does not join up."""

    state: SourceState
    detail: str


class Feed(Protocol):
    """Where the audio comes from: the running daemon or the stream's own source."""

    source: RecordingSource

    def next(self, timeout: float) -> Audio | Gap | None: ...
    def close(self) -> None: ...


class DaemonFeed:
    """The stream's audio from the running daemon over its control socket."""

    def __init__(self, client: ControlClient, stream: str) -> None:
        self._client = client
        client.send({"op": "record", "stream": stream})
        header = self._receive(NO_AUDIO_TIMEOUT_S)
        if header.get("ok") is not True:
            raise ControlError(f"the daemon refused: {header.get('error', header)}")
        self.source = RecordingSource(stream, str(header.get("device", "")), _int(header.get("capture_rate")),
                                      int(header["rate"]), "daemon")  # fmt: skip
        self._quiet_s = 0.0

    def _receive(self, timeout: float) -> dict[str, Any]:
        message = self._client.receive(timeout)
        if message is None:
            raise ControlError("the daemon closed the connection (did it stop?)")
        return message

    def next(self, timeout: float) -> Audio | Gap | None:
        try:
            message = self._receive(timeout)
        except TimeoutError:
            self._quiet_s += timeout
            if self._quiet_s > NO_AUDIO_TIMEOUT_S:
                raise ControlError(f"nothing from the daemon for {NO_AUDIO_TIMEOUT_S:.0f} s") from None
            return None
        self._quiet_s = 0.0
        kind = message.get("type")
        if kind == "audio":
            try:
                data = base64.b64decode(str(message["pcm"]), validate=True)
            except (KeyError, binascii.Error) as exc:
                raise ControlError("the daemon sent audio that cannot be decoded") from exc
            samples = np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4").astype(np.float32)
            return Audio(samples, _int(message.get("capture_rate")) or 0)
        if kind == "source":
            return Gap(SourceState(str(message.get("state"))), str(message.get("detail", "")))
        if kind == "end":
            raise ControlError(f"the daemon ended the recording: {message.get('reason')}")
        return None  # a kind this client does not know: newer daemons may say more

    def close(self) -> None:
        self._client.close()


class LocalFeed:
    """The stream's source opened here, with the daemon's classes, sanitising and resampling."""

    def __init__(self, config: DaemonConfig, stream: StreamConfig, rate: int) -> None:
        # PortAudio starts (and lists devices) only now: a client of the daemon never touches the devices.
        from anomalyd.sources.file import FileReader  # noqa: PLC0415
        from anomalyd.sources.make import make_source  # noqa: PLC0415
        from anomalyd.sources.mic import DeviceCapture, MicIO, PortAudioHost  # noqa: PLC0415

        self._queue: queue.Queue[SourceMessage] = queue.Queue(maxsize=LOCAL_QUEUE_BLOCKS)
        self.dropped = 0
        self._closed = False
        self._rate = rate
        self._resampler: Resampler | None = None
        self._files = FileReader(f"files-{stream.name}")
        self._source = make_source(
            (stream,), config.health, capture_sink=self._put_nowait, replay_offer=self._offer,
            files=self._files, host=PortAudioHost(), io=MicIO(),
        )  # fmt: skip
        self._capture = self._source if isinstance(self._source, DeviceCapture) else None
        device = str(getattr(stream.source, "device", getattr(stream.source, "path", "")))
        self.source = RecordingSource(stream.name, device, None, rate, "device")
        self._source.start()

    def _put_nowait(self, message: SourceMessage) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1

    def _offer(self, message: SourceMessage) -> bool:
        if isinstance(message, AudioBlock):
            try:
                self._queue.put_nowait(message)
                return True
            except queue.Full:
                return False
        while not self._closed:  # a notice is never refused: few, and each one tells the truth
            try:
                self._queue.put(message, timeout=POLL_S)
                break
            except queue.Full:
                continue
        return True

    def next(self, timeout: float) -> Audio | Gap | None:
        try:
            message = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._files.room()
        if isinstance(message, SourceNotice):
            if message.state == SourceState.OK and self._capture is not None:
                self.source = RecordingSource(self.source.stream, self._capture.device_name,
                                              self._capture.capture_rate, self._rate, "device")  # fmt: skip
            else:
                self._resampler = None  # as in the daemon: after a loss the audio starts afresh
            return Gap(message.state, message.detail)
        assert isinstance(message, AudioBlock)
        samples, _ = sanitise(message.samples)
        if self._resampler is None or self._resampler.in_rate != message.rate:
            self._resampler = Resampler(message.rate, self._rate)
        return Audio(self._resampler(samples), message.rate)

    def close(self) -> None:
        self._closed = True
        self._source.stop(2.0)
        self._files.close()


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def find_stream(config: DaemonConfig, name: str, config_path: Path) -> StreamConfig:
    for stream in config.streams:
        if stream.name == name:
            return stream
    names = ", ".join(s.name for s in config.streams)
    raise AnomalydError(f"{config_path}: no stream {name!r}; configured streams: {names}")


def check_writable(folder: Path) -> None:
    """Create the folder if needed and prove that a file can be written there, before anything is opened."""
    probe = folder / f".anomalyd-record-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AnomalydError(f"--out {folder}: cannot write there: {exc.strerror or exc}") from exc


def model_rate(stream: StreamConfig) -> tuple[int, str]:
    """The stream's model rate from its bundle; a machine not yet trained has none: the default rate."""
    try:
        return load_bundle(stream.bundle).meta.features.sample_rate, ""
    except AnomalydError as exc:
        return SAMPLE_RATE, f" (no usable bundle yet: {exc}; recording at the default {SAMPLE_RATE} Hz)"


def open_feed(config: DaemonConfig, stream: StreamConfig) -> tuple[Feed, str]:
    """The daemon's audio when one listens, else the stream's source; and a line saying which."""
    client = ControlClient.connect(config.control.socket, MAX_LINE_BYTES)
    if client is not None:
        try:
            feed: Feed = DaemonFeed(client, stream.name)
        except BaseException:
            client.close()
            raise
        s = feed.source
        capture = f", captured at {s.capture_rate} Hz" if s.capture_rate else ""
        return feed, (f"recording stream {stream.name} from the running daemon ({config.control.socket}): "
                      f"device {s.device!r}{capture}, segments at the model's {s.rate} Hz")  # fmt: skip
    rate, note = model_rate(stream)
    feed = LocalFeed(config, stream, rate)
    return feed, (f"no daemon listens on {config.control.socket}: recording stream {stream.name} from its "
                  f"source {feed.source.device!r} opened here, at the model's {rate} Hz{note}")  # fmt: skip


class Interrupt:
    """Ctrl-C (and SIGTERM) end the loop between two blocks: nothing is left half-done by the signal."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Interrupt:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def record(config: DaemonConfig, config_path: Path, options: RecordOptions,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:  # fmt: skip
    """Record; 0 when every segment asked for is written, 130 when interrupted, errors raise."""
    stream = find_stream(config, options.stream, config_path)
    check_writable(options.out)
    with Interrupt() as interrupt:
        feed, how = open_feed(config, stream)
        try:
            print(how, file=err, flush=True)
            manifest = Manifest(options.out, feed.source)
            left = remove_partials(options.out, stream.name)
            if left:
                print(f"removed {left} unfinished segment(s) of an earlier run", file=err)
            writer = SegmentWriter(options.out, manifest, options.segment_seconds, config.health)
            return _loop(feed, writer, options, interrupt, Console(out, err))
        finally:
            feed.close()


@dataclass(frozen=True)
class Console:
    out: TextIO  # a line per complete segment
    err: TextIO  # the progress bar (on a terminal) and what happens


def _loop(feed: Feed, writer: SegmentWriter, options: RecordOptions, interrupt: Interrupt,
          console: Console) -> int:  # fmt: skip
    out, err = console.out, console.err
    wanted = max(1, math.ceil(options.seconds / options.segment_seconds))
    bar = tqdm(total=wanted * options.segment_seconds, unit="s", file=err, disable=not err.isatty(),
               desc=options.stream, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
               "[{elapsed}<{remaining}]")  # fmt: skip

    def say(line: str) -> None:
        with tqdm.external_write_mode(file=err):
            print(line, file=out, flush=True)

    anchor: tuple[int, dt.datetime] | None = None  # (samples received, UTC time of the first of them)
    received = 0
    try:
        while len(writer.kept) < wanted:
            if interrupt.requested:
                writer.discard()
                print(f"interrupted: {len(writer.kept)} complete segment(s) kept in {options.out}, the "
                      "unfinished one removed", file=err)  # fmt: skip
                return EXIT_INTERRUPTED
            try:
                item = feed.next(POLL_S)
            except AnomalydError:
                writer.discard()
                print(f"{len(writer.kept)} complete segment(s) kept in {options.out}", file=err)
                raise
            if item is None:
                continue
            if isinstance(item, Gap):
                anchor = None
                if item.state == SourceState.OK:
                    writer.manifest.source = feed.source  # the device as it opened
                    continue
                if writer.partial_seconds:
                    print(f"source {item.state.value} ({item.detail}): the unfinished segment is removed",
                          file=err)  # fmt: skip
                writer.discard()
                if item.state == SourceState.ENDED:
                    raise AnomalydError(f"the stream's source ended after {len(writer.kept)} segment(s)")
                continue
            if item.capture_rate and item.capture_rate != writer.manifest.source.capture_rate:
                source = dataclasses.replace(writer.manifest.source, capture_rate=item.capture_rate)
                writer.manifest.source = source
            samples = item.samples[: writer.samples_to(wanted)]
            if anchor is None:
                # The block's last sample was captured about now; sample counts carry time from there.
                anchor = (received, utc_now() - dt.timedelta(seconds=len(samples) / writer.rate))
            at = anchor[1] + dt.timedelta(seconds=(received - anchor[0]) / writer.rate)
            received += len(samples)
            for segment in writer.push(samples, at):
                say(_segment_line(segment))
            bar.update(len(samples) / writer.rate)
    finally:
        bar.close()
    print(f"recorded {len(writer.kept)} segment(s) of {options.segment_seconds} s of stream "
          f"{options.stream} in {options.out} (manifest {writer.manifest.path.name})", file=err)  # fmt: skip
    return EXIT_OK


def _segment_line(segment: Segment) -> str:
    flags = ",".join(segment.flags) or "ok"
    return f"{segment.path}\t{segment.seconds:.1f} s\t{flags}"
