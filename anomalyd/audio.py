"""Audio in: the one loader used by training, evaluation, `anomalyd score` and file replay.

Whatever the file holds (int16/24/32 or float WAV, WAVE_FORMAT_EXTENSIBLE, FLAC, any rate, any channel
count), callers get float32 mono samples in [-1, 1] at the rate they ask for. Files that cannot be trusted
(missing, empty, truncated, not audio) raise `AudioError` with one line naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from anomalyd.errors import AudioError

# Extensions the loader is asked to handle; libsndfile decides the real format from the header.
AUDIO_SUFFIXES = (".wav", ".flac")

# Streaming WAV writers put this in a size field they never come back to fill in.
_UNKNOWN_RIFF_SIZE = 0xFFFFFFFF


def _declared_wav_data_bytes(path: Path) -> tuple[int, int] | None:
    """(declared, present) byte counts of a RIFF/WAVE file's `data` chunk, or None if not a RIFF WAV.

    libsndfile reads a truncated WAV without complaint and returns fewer frames than the header
    promised; a cut-off recording must not be scored as if it were complete, so the sizes are compared here.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                return chunk_size, size - offset - 8
            # RIFF chunks are padded to an even number of bytes.
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


def _check_not_truncated(path: Path) -> None:
    sizes = _declared_wav_data_bytes(path)
    if sizes is None:
        return
    declared, present = sizes
    if declared not in (0, _UNKNOWN_RIFF_SIZE) and present < declared:
        raise AudioError(
            f"{path}: truncated WAV: header declares {declared} bytes of audio, file holds {present}"
        )


def check_readable(path: Path, channel: int = 0) -> sf._SoundFileInfo:
    """Header checks without decoding: exists, is audio, not truncated, has samples and the channel."""
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        _check_not_truncated(path)
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError, struct.error) as exc:
        raise AudioError(f"{path}: not a readable audio file ({exc})") from exc
    if info.frames == 0:
        raise AudioError(f"{path}: holds no audio samples")
    if not 0 <= channel < info.channels:
        raise AudioError(
            f"{path}: channel {channel} requested, file has {info.channels} (0..{info.channels - 1})"
        )
    return info


def read_audio(path: str | Path, channel: int = 0) -> tuple[npt.NDArray[np.float32], int]:
    """Read one channel of an audio file as float32 samples at the file's own rate.

    Returns (samples, sample_rate) with samples of shape (n_samples,).
    """
    path = Path(path)
    check_readable(path, channel)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({exc})") from exc
    if len(data) == 0:
        raise AudioError(f"{path}: holds no audio samples")
    samples = np.ascontiguousarray(data[:, channel])
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{path}: holds NaN or infinite samples")
    return samples, int(rate)


def resample(samples: npt.NDArray[np.float32], rate: int, target_rate: int) -> npt.NDArray[np.float32]:
    """Resample (n_samples,) float32 audio from `rate` Hz to `target_rate` Hz (soxr, high quality)."""
    if rate == target_rate:
        return samples
    out = soxr.resample(samples, rate, target_rate, quality="HQ")
    return np.asarray(out, dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int, channel: int = 0) -> npt.NDArray[np.float32]:
    """Load one channel of an audio file as float32 mono at `sample_rate` Hz, shape (n_samples,)."""
    samples, rate = read_audio(path, channel)
    return resample(samples, rate, sample_rate)


def list_audio_files(directory: str | Path) -> list[Path]:
    """Audio files (by suffix) directly inside `directory`, sorted by name for reproducible splits."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AudioError(f"{directory}: not a directory")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
