"""Where training audio comes from: the --normal folders' files, their recording manifests, and the
provenance written into model.json (`training.audio`).

A folder is listed once: files of a supported format (`anomalyd.audio.SUPPORTED_FORMATS`) are used, any
other file is named and counted, never silently ignored. A `recording.json` written by `anomalyd record`
tells the device and its capture rate; it is optional, and a damaged one costs one warning, nothing more.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyd.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, list_folder, supported_names
from anomalyd.segments import MANIFEST as MANIFEST_FILE  # written by `anomalyd record` beside its segments
from training.dataset import Recording

logger = logging.getLogger(__name__)

RECORDED_BY = "anomalyd record"
NAMES_SHOWN = 3  # unsupported files named in the warning line; all of them at debug level (-v)
MAX_DEVICE_CHARS = 256


@dataclass(frozen=True)
class Manifest:
    """What a folder's recording.json says about its capture; None where it says nothing usable."""

    device: str | None
    capture_rate: int | None  # Hz, the device's, before resampling to the model rate
    flagged: tuple[tuple[str, str], ...] = ()  # (segment file, "silent"/"clipping"...) as record saw it


@dataclass(frozen=True)
class Folder:
    path: Path
    audio: list[Path]  # files of a supported format, by name
    unsupported: list[Path]  # every other (non-hidden) file but the manifest
    manifest: Manifest | None


def _manifest_values(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    device, rate = data.get("device"), data.get("capture_rate")
    device_ok = isinstance(device, str) and 0 < len(device) <= MAX_DEVICE_CHARS and device.isprintable()
    rate_ok = type(rate) is int and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE
    if not (device_ok or rate_ok):
        raise ValueError(
            f"neither a device name nor a capture_rate within {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    return Manifest(device if device_ok else None, rate if rate_ok else None, _flagged(data.get("segments")))


def _flagged(segments: Any) -> tuple[tuple[str, str], ...]:
    """Segments that `anomalyd record` flagged (silence, clipping); anything malformed is passed over."""
    if not isinstance(segments, list):
        return ()
    found = []
    for segment in segments:
        if not isinstance(segment, dict):
            continue
        name, flags = segment.get("file"), segment.get("flags")
        if isinstance(name, str) and isinstance(flags, list) and flags:
            found.append((name, ",".join(str(f)[:20] for f in flags[:4])))
    return tuple(found)


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's recording manifest, or None when it has none or one that cannot be used (warned)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return _manifest_values(json.loads(path.read_bytes()))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8 too
        logger.warning(
            "%s: not a usable recording manifest (%s); device and capture rate of this folder unknown",
            path,
            str(exc)[:120],
        )
        return None


def list_normal(folder: Path) -> Folder:
    audio, others = list_folder(folder)
    unsupported = [p for p in others if p.name != MANIFEST_FILE]
    return Folder(folder, audio, unsupported, read_manifest(folder))


def report_flagged(folders: list[Folder]) -> int:
    """One warning naming the recorded segments flagged silent or clipping that training will use."""
    used = [
        (folder.path / name, flags)
        for folder in folders
        if folder.manifest is not None
        for name, flags in folder.manifest.flagged
        if folder.path / name in folder.audio
    ]
    if used:
        shown = ", ".join(f"{p.name} ({flags})" for p, flags in used[:NAMES_SHOWN])
        more = f" and {len(used) - NAMES_SHOWN} more" if len(used) > NAMES_SHOWN else ""
        logger.warning(
            "%d recorded segment(s) flagged by `anomalyd record` are trained on: %s%s; move them out of the "
            "folder unless the machine really sounds like that when healthy",
            len(used), shown, more,
        )  # fmt: skip
    return len(used)


def report_unsupported(folders: list[Folder]) -> int:
    """One warning line for all files of other formats (count and a few names), each at debug level."""
    unsupported = [p for f in folders for p in f.unsupported]
    if not unsupported:
        return 0
    shown = ", ".join(p.name for p in unsupported[:NAMES_SHOWN])
    more = (
        f" and {len(unsupported) - NAMES_SHOWN} more (all named with -v)"
        if len(unsupported) > NAMES_SHOWN
        else ""
    )
    logger.warning(
        "not used: %d files not of a supported audio format (%s): %s%s",
        len(unsupported), supported_names(), shown, more,
    )  # fmt: skip
    for path in unsupported:
        logger.debug("not a supported audio format: %s", path)
    return len(unsupported)


def report_lossy(recordings: list[Recording]) -> None:
    """Lossy codecs drop what the ear misses, which a machine's fault may be made of: say so, once."""
    lossy = Counter(r.info.format for r in recordings if r.info.lossy)
    if lossy:
        kinds = ", ".join(f"{n} {name}" for name, n in sorted(lossy.items()))
        logger.warning(
            "%d of %d training files are lossy (%s): lossy compression changes the spectrum the model "
            "learns, and audio monitored live is not compressed; record WAV or FLAC where you can",
            lossy.total(), len(recordings), kinds,
        )  # fmt: skip


def audio_provenance(recordings: list[Recording], folders: list[Folder], sample_rate: int) -> dict[str, Any]:
    """model.json's `training.audio`: formats, native sample rates, lossy or not, seconds, files, and the
    devices and capture rates the folders' manifests name."""
    manifests = [f.manifest for f in folders if f.manifest is not None]
    provenance: dict[str, Any] = {
        "files": len(recordings),
        "seconds": round(sum(r.seconds(sample_rate) for r in recordings), 1),
        "formats": dict(sorted(Counter(r.info.format for r in recordings).items())),
        "sample_rates": {
            str(rate): n for rate, n in sorted(Counter(r.info.sample_rate for r in recordings).items())
        },
        "lossy": any(r.info.lossy for r in recordings),
        "devices": sorted({m.device for m in manifests if m.device is not None}),
        "capture_rates": sorted({m.capture_rate for m in manifests if m.capture_rate is not None}),
    }
    if manifests:
        provenance["recorded_by"] = RECORDED_BY
    return provenance
