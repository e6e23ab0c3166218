"""Training data: audio files -> log-mel arrays, with bad files skipped and the data fingerprinted."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import numpy.typing as npt

from anomalyd.audio import load_audio
from anomalyd.bundle import sha256_file
from anomalyd.errors import AudioError
from anomalyd.features import FeatureParams, LogMel

logger = logging.getLogger(__name__)


def make_filterbank(params: FeatureParams) -> npt.NDArray[np.float32]:
    """The (n_mels, n_fft//2+1) mel filterbank, scale and norm chosen explicitly (librosa's defaults)."""
    fb = librosa.filters.mel(
        sr=params.sample_rate,
        n_fft=params.n_fft,
        n_mels=params.n_mels,
        fmin=params.fmin,
        fmax=params.fmax,
        htk=params.mel_scale == "htk",
        norm="slaney" if params.mel_norm == "slaney" else None,
    )
    return np.asarray(fb, dtype=np.float32)


@dataclass(frozen=True)
class Clip:
    path: Path
    sha256: str
    logmel: npt.NDArray[np.float32]  # (n_mels, n_frames), dB


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def load_clips(
    paths: list[Path], logmel: LogMel, min_samples: int, channel: int = 0
) -> tuple[list[Clip], list[Skipped]]:
    """Features of every usable file; unusable ones are logged, counted and returned, never fatal."""
    clips, skipped = [], []
    rate = logmel.params.sample_rate
    for path in paths:
        try:
            samples = load_audio(path, rate, channel)
            if len(samples) < min_samples:
                raise AudioError(
                    f"{path}: too short ({len(samples) / rate:.2f} s, one window needs "
                    f"{min_samples / rate:.2f} s)"
                )
        except AudioError as exc:
            logger.warning("skipping %s", exc)
            skipped.append(Skipped(path, str(exc)))
            continue
        clips.append(Clip(path, sha256_file(path), logmel(samples)))
    return clips, skipped


def _by_path(clip: Clip) -> Path:
    return clip.path


def split_clips(clips: list[Clip], val_fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """File-level split, so no validation window shares a recording with a training window.

    At least 2 validation files (a standard deviation needs two) and at least 1 training file.
    """
    if len(clips) < 3:
        raise ValueError(
            f"need at least 3 usable files (1 to train on, 2 to validate and set the threshold), "
            f"got {len(clips)}"
        )
    shuffled = sorted(clips, key=_by_path)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(clips) - 1, max(2, round(len(clips) * val_fraction)))
    return sorted(shuffled[n_val:], key=_by_path), sorted(shuffled[:n_val], key=_by_path)


def fingerprint(clips: list[Clip]) -> str:
    """SHA-256 over the sorted content hashes: the same files give the same print, whatever their names."""
    digest = hashlib.sha256()
    for sha in sorted(c.sha256 for c in clips):
        digest.update(bytes.fromhex(sha))
    return digest.hexdigest()
