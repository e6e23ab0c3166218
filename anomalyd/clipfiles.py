"""Clip files of anomaly events on disk: written as `.wav.partial` and renamed when complete, kept under
a quota, never written when the disk is short. Clips are the first thing given up when space runs out."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
from pathlib import Path

import soundfile as sf

from anomalyd.config import ClipsConfig
from anomalyd.records import ClipJob
from anomalyd.throttle import Throttle

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_floor_log = Throttle(60.0)


def _clip_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wav"), key=lambda p: p.stat().st_mtime)


def clip_name(stream: str, started_at: dt.datetime, event_id: str) -> str:
    """The file name of an event's clip (event messages name it before it is written)."""
    return f"{stream}-{started_at.strftime('%Y%m%dT%H%M%S')}-{event_id[:8]}.wav"


def save_clip(job: ClipJob, config: ClipsConfig) -> Path | None:
    """Write the clip as 16-bit WAV unless the disk is short; then keep all clips under the quota.

    Raises OSError or soundfile's error when the write itself fails (the partial file is removed).
    """
    job.directory.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(job.directory).free / 1e6
    if free_mb < config.min_free_mb:
        if _floor_log.ready():
            logger.warning(
                "clip of event %s not saved: %.0f MB free in %s, floor is %.0f MB%s",
                job.event_id, free_mb, job.directory, config.min_free_mb, _floor_log.take_suppressed(),
            )  # fmt: skip
        return None
    path = job.directory / clip_name(job.stream, job.started_at, job.event_id)
    tmp = path.with_suffix(".wav" + PARTIAL_SUFFIX)
    try:
        sf.write(tmp, job.samples, job.sample_rate, subtype="PCM_16", format="WAV")
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    files = _clip_files(job.directory)
    total = sum(p.stat().st_size for p in files)
    quota = config.quota_mb * 1e6
    for old in files:
        if total <= quota:
            break
        total -= old.stat().st_size
        old.unlink()
        logger.info("clip quota (%.0f MB): deleted %s", config.quota_mb, old.name)
    return path if path.exists() else None


def remove_partial_clips(directory: Path) -> int:
    """Delete clips a crash left half-written; returns how many."""
    removed = 0
    try:
        for partial in directory.glob(f"*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)
            removed += 1
    except OSError as exc:
        logger.warning("%s: cannot remove half-written clips: %s", directory, exc.strerror or exc)
    if removed:
        logger.info("%s: removed %d half-written clip(s) left by an earlier run", directory, removed)
    return removed
