"""Recorded audio on disk: fixed-length 16-bit WAV segments and the folder's `recording.json` manifest.

A segment is written to `<name>.wav.partial` as its audio arrives (memory does not depend on its length)
and renamed to `<name>.wav` when complete, so that a folder never holds a half segment under a real name.
Names are `<stream>-<UTC yyyymmddThhmmssZ>-<nnnn>.wav`, the time that of the segment's first sample and
nnnn counting on from the segments already in the folder. Each segment is judged by the daemon's own
source health rules (`anomalyd.health`): a segment during which the audio was `silent` (a dropout or a dead
microphone) or `clipping` carries that flag, on its output line and in the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf

from anomalyd.config import HealthConfig
from anomalyd.errors import AnomalydError
from anomalyd.health import HealthMonitor
from anomalyd.records import SourceState, iso

MANIFEST = "recording.json"
PARTIAL_SUFFIX = ".partial"
FLAGGED = {SourceState.SILENT: "silent", SourceState.CLIPPING: "clipping"}
INT16_SCALE = 32767  # float full scale -> 16-bit full scale


@dataclass(frozen=True)
class RecordingSource:
    """Where the audio of one run came from (the manifest's top level describes the latest run)."""

    stream: str
    device: str
    capture_rate: int | None  # Hz
    rate: int  # Hz, the model's rate: the segments' rate
    source: str  # "daemon" (from the running daemon) or "device" (opened by `record` itself)


@dataclass(frozen=True)
class Segment:
    path: Path
    seconds: float
    started_at: dt.datetime
    flags: tuple[str, ...]


def to_int16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """Float audio to 16-bit PCM, clipped at full scale (never wrapped round)."""
    return np.round(np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


class Manifest:
    """`recording.json`: what the folder's segments are and where they came from; merged on every run."""

    def __init__(self, folder: Path, source: RecordingSource) -> None:
        self.path = folder / MANIFEST
        self.source = source
        self.segments: list[dict[str, Any]] = []
        if self.path.exists():
            self._merge(self._read())

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AnomalydError(
                f"{self.path}: cannot read it ({exc}); move it away or use another --out"
            ) from exc
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise AnomalydError(f"{self.path}: not a recording manifest; move it away or use another --out")
        return data

    def _merge(self, data: dict[str, Any]) -> None:
        if data.get("stream") != self.source.stream:
            raise AnomalydError(
                f"{self.path}: this folder holds stream {data.get('stream')!r}, not "
                f"{self.source.stream!r}; use another --out"
            )
        if data.get("rate") != self.source.rate:
            raise AnomalydError(
                f"{self.path}: this folder holds audio at {data.get('rate')} Hz, the model's rate is now "
                f"{self.source.rate} Hz; use another --out"
            )
        self.segments = list(data["segments"])

    def add(self, segment: Segment) -> None:
        self.segments.append({
            "file": segment.path.name,
            "seconds": segment.seconds,
            "started_at": iso(segment.started_at),
            "flags": list(segment.flags),
            "device": self.source.device,
            "capture_rate": self.source.capture_rate,
            "source": self.source.source,
        })  # fmt: skip
        self.save()

    def save(self) -> None:
        """Written whole to a temporary file and renamed: an interruption leaves the previous manifest."""
        s = self.source
        data = {"stream": s.stream, "device": s.device, "capture_rate": s.capture_rate, "rate": s.rate,
                "source": s.source, "segments": self.segments}  # fmt: skip
        tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)


class SegmentWriter:
    """Audio at the model rate in, complete segments out."""

    def __init__(self, folder: Path, manifest: Manifest, segment_seconds: int, health: HealthConfig) -> None:
        self.folder = folder
        self.manifest = manifest
        self.stream = manifest.source.stream
        self.rate = manifest.source.rate
        self.segment_samples = segment_seconds * self.rate
        self.health = health
        self.next_index = len(manifest.segments)
        self.kept: list[Segment] = []
        self._file: sf.SoundFile | None = None
        self._partial: Path | None = None
        self._written = 0
        self._started_at: dt.datetime | None = None
        self._monitor = HealthMonitor(health)
        self._flags: set[str] = set()

    def push(self, samples: npt.NDArray[np.float32], captured_at: dt.datetime) -> list[Segment]:
        """Add audio whose first sample was captured at `captured_at`; return the segments it completes."""
        done = []
        offset = 0
        while offset < len(samples):
            if self._file is None:
                self._open(captured_at + dt.timedelta(seconds=offset / self.rate))
            assert self._file is not None
            piece = samples[offset : offset + self.segment_samples - self._written]
            self._file.write(to_int16(piece))
            change = self._monitor.observe(piece.astype(np.float32, copy=False), self.rate)
            if change is not None and change[0] in FLAGGED:
                self._flags.add(FLAGGED[change[0]])
            self._written += len(piece)
            offset += len(piece)
            if self._written == self.segment_samples:
                done.append(self._finish())
        return done

    def _open(self, started_at: dt.datetime) -> None:
        stamp = started_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        final = self.folder / f"{self.stream}-{stamp}-{self.next_index:04d}.wav"
        self._partial = final.with_name(final.name + PARTIAL_SUFFIX)
        self._file = sf.SoundFile(self._partial, "w", samplerate=self.rate, channels=1, subtype="PCM_16",
                                  format="WAV")  # fmt: skip
        self._written = 0
        self._started_at = started_at
        self._monitor = HealthMonitor(self.health)  # judged afresh: a segment's flags are its own
        self._flags = set()

    def _finish(self) -> Segment:
        assert self._file is not None
        assert self._partial is not None
        assert self._started_at is not None
        self._file.close()
        final = self._partial.with_name(self._partial.name.removesuffix(PARTIAL_SUFFIX))
        os.replace(self._partial, final)
        segment = Segment(final, self._written / self.rate, self._started_at,
                          tuple(f for f in ("silent", "clipping") if f in self._flags))  # fmt: skip
        self._file = self._partial = self._started_at = None
        self._written = 0
        self.next_index += 1
        self.manifest.add(segment)
        self.kept.append(segment)
        return segment

    def samples_to(self, segments: int) -> int:
        """Samples still to write until `segments` segments are complete."""
        return (segments - len(self.kept)) * self.segment_samples - self._written

    @property
    def partial_seconds(self) -> float:
        return self._written / self.rate if self._file is not None else 0.0

    def discard(self) -> None:
        """Remove the unfinished segment (an interruption, or a gap in the audio)."""
        if self._file is not None:
            with contextlib.suppress(RuntimeError, OSError):
                self._file.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        self._file = self._partial = self._started_at = None
        self._written = 0


def remove_partials(folder: Path, stream: str) -> int:
    """Unfinished segments of this stream an interrupted or killed run left; returns how many."""
    count = 0
    for partial in folder.glob(f"{stream}-*.wav{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)
        count += 1
    return count
