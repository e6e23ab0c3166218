"""Training data: audio files -> log-mel arrays, with bad files skipped and the data fingerprinted.

Files are decoded as a stream (`anomalyd.audio.stream_audio`) and only their log-mel frames are kept, about
30x smaller than the audio at 48 kHz (128 mel bands every 512 samples at 16 kHz): an hour of recording is
~58 MB of features, whatever its rate or channel count.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import numpy.typing as npt

from anomalyd.audio import AudioFileInfo, describe_audio, stream_audio
from anomalyd.bundle import sha256_file
from anomalyd.errors import AudioError
from anomalyd.features import FeatureParams, LogMel
from anomalyd.scoring import FRAMES_PER_STEP, rechunk

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
    """Log-mel frames of one stretch of audio: a whole file, or one block of it."""

    path: Path
    sha256: str
    logmel: npt.NDArray[np.float32]  # (n_mels, n_frames), dB


@dataclass(frozen=True)
class Recording:
    """One usable training file: where it came from and its log-mel frames at the model rate."""

    path: Path
    folder: int  # index of its --normal folder
    sha256: str
    info: AudioFileInfo  # the file's header: format, rate, ...
    n_samples: int  # at the model rate
    logmel: npt.NDArray[np.float32]  # (n_mels, n_frames), dB

    def seconds(self, sample_rate: int) -> float:
        return self.n_samples / sample_rate


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def stream_logmel(
    blocks: Iterable[npt.NDArray[np.float32]], logmel: LogMel
) -> tuple[npt.NDArray[np.float32], int]:
    """(n_mels, n_frames) log-mel of consecutive (n,) blocks at the model rate, and the samples seen.

    Frames equal `logmel(all samples)`: each step frames what it can and keeps the samples of the frames
    to come (frame t covers samples [t*hop, t*hop + n_fft)).
    """
    p = logmel.params
    pending = np.empty(0, dtype=np.float32)
    parts: list[npt.NDArray[np.float32]] = []
    n_in = 0
    for block in rechunk(blocks, FRAMES_PER_STEP * p.hop_length):
        n_in += len(block)
        pending = np.concatenate([pending, block])
        n_frames = p.n_frames(len(pending))
        if n_frames:
            parts.append(logmel(pending[: p.n_samples(n_frames)]))
            pending = pending[n_frames * p.hop_length :]
    if not parts:
        return np.empty((p.n_mels, 0), dtype=np.float32), n_in
    return np.concatenate(parts, axis=1), n_in


def load_recordings(
    folders: list[list[Path]], logmel: LogMel, min_samples: int, channel: int = 0
) -> tuple[list[Recording], list[Skipped]]:
    """Features of every usable file, per --normal folder; unusable ones are logged, counted and returned,
    never fatal. Files of any length: they are streamed."""
    recordings, skipped = [], []
    rate = logmel.params.sample_rate
    for folder, paths in enumerate(folders):
        for path in paths:
            try:
                info = describe_audio(path, channel)
                frames, n_samples = stream_logmel(stream_audio(path, rate, channel), logmel)
                if n_samples < min_samples:
                    raise AudioError(
                        f"{path}: too short ({n_samples / rate:.2f} s, one window needs "
                        f"{min_samples / rate:.2f} s)"
                    )
            except AudioError as exc:
                logger.warning("skipping %s", exc)
                skipped.append(Skipped(path, str(exc)))
                continue
            recordings.append(Recording(path, folder, sha256_file(path), info, n_samples, frames))
    return recordings, skipped


def fingerprint(recordings: list[Recording]) -> str:
    """SHA-256 over the sorted content hashes: the same files give the same print, whatever their names."""
    digest = hashlib.sha256()
    for sha in sorted(r.sha256 for r in recordings):
        digest.update(bytes.fromhex(sha))
    return digest.hexdigest()
