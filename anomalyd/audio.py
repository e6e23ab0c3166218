"""Audio in: the one loader used by training, evaluation, `anomalyd score` and file replay.

Whatever the file holds (int16/24/32 or float WAV, WAVE_FORMAT_EXTENSIBLE, FLAC, Ogg Vorbis/Opus, MP3 where
libsndfile decodes it: `SUPPORTED_FORMATS`; any supported rate, any channel count), callers get float32 mono
samples at the rate they ask for. Files that cannot be trusted
(missing, empty, truncated, not audio, a sample rate outside the supported range, NaN/inf or absurd sample
values) raise `AudioError` with one line naming the file.

Files are decoded block by block into one reused buffer and resampled chunk by chunk, so memory does not
depend on what a header declares (length, channel count) nor on how long the file really is:
`stream_audio` holds at most one block; `load_audio` (whole files, for training) refuses files longer
than `MAX_LOAD_SECONDS`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from anomalyd.errors import AudioError


@dataclass(frozen=True)
class AudioFormat:
    """A container anomalyd accepts: libsndfile's name for it, the file name suffixes, and whether its
    usual codecs are lossy (they change the spectrum the model learns and scores)."""

    name: str  # as `soundfile.info(...).format` reports it
    suffixes: tuple[str, ...]  # lower case, with the dot
    lossy: bool


# What libsndfile decodes that anomalyd accepts. MP3 needs libsndfile >= 1.1 (built with mpg123): it is
# listed only where this libsndfile has it. Other formats libsndfile knows (AIFF, CAF, ...) are refused by
# training's folder listing, so that a folder's content never depends on the library build.
_FORMATS = (
    AudioFormat("WAV", (".wav",), lossy=False),
    AudioFormat("FLAC", (".flac",), lossy=False),
    AudioFormat("OGG", (".ogg", ".oga", ".opus"), lossy=True),  # Vorbis or Opus
    AudioFormat("MP3", (".mp3",), lossy=True),
)
SUPPORTED_FORMATS = tuple(f for f in _FORMATS if f.name in sf.available_formats())
# Extensions the loader is asked to handle; libsndfile decides the real format from the header.
AUDIO_SUFFIXES = tuple(s for f in SUPPORTED_FORMATS for s in f.suffixes)
# Codecs (libsndfile subtypes) that throw information away, whatever the container says.
LOSSY_SUBTYPES = frozenset(
    {"VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "GSM610", "IMA_ADPCM",
     "MS_ADPCM", "VOX_ADPCM", "G721_32", "G723_24", "G723_40", "ULAW", "ALAW"}
)  # fmt: skip

MIN_SAMPLE_RATE = 1_000  # Hz; a lower declared rate is a damaged header, refused before decoding
MAX_SAMPLE_RATE = 384_000  # Hz; the highest rate of common audio interfaces
MAX_ABS_SAMPLE = 16.0  # +24 dBFS: float files may exceed full scale a little; beyond this it is damage
MAX_LOAD_SECONDS = 600.0  # longest file loaded whole (training input); `anomalyd score` streams instead
BLOCK_SECONDS = 1.0  # audio decoded per step
BLOCK_BYTES = 8 << 20  # and at most this much of it, all channels as float32 (a header may claim 1024)

# Streaming WAV writers put this in a size field they never come back to fill in.
_UNKNOWN_RIFF_SIZE = 0xFFFFFFFF
_DECODE_ERRORS = (sf.LibsndfileError, RuntimeError, OSError, struct.error)


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
    """Header checks without decoding: exists, is audio, not truncated, a supported rate, has the channel."""
    try:
        if not path.is_file():
            raise AudioError(f"{path}: no such file")
        _check_not_truncated(path)
        info = sf.info(str(path))
    except _DECODE_ERRORS as exc:
        raise AudioError(f"{path}: not a readable audio file ({exc})") from exc
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{path}: declares a sample rate of {info.samplerate} Hz; "
            f"supported: {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
        )
    if info.frames == 0:
        raise AudioError(f"{path}: holds no audio samples")
    if not 0 <= channel < info.channels:
        raise AudioError(
            f"{path}: channel {channel} requested, file has {info.channels} (0..{info.channels - 1})"
        )
    return info


@dataclass(frozen=True)
class AudioFileInfo:
    """What a file's header says: enough to tell where audio came from and whether it was altered."""

    path: Path
    format: str  # libsndfile's container name: WAV, FLAC, OGG, MP3, ...
    subtype: str  # libsndfile's codec name: PCM_16, FLOAT, VORBIS, MPEG_LAYER_III, ...
    sample_rate: int  # Hz, the file's own
    channels: int
    frames: int  # per channel, as declared

    @property
    def lossy(self) -> bool:
        return self.subtype in LOSSY_SUBTYPES

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def describe_audio(path: str | Path, channel: int = 0) -> AudioFileInfo:
    """The header of a file `check_readable` accepts; raises AudioError naming the file otherwise."""
    path = Path(path)
    info = check_readable(path, channel)
    return AudioFileInfo(
        path, str(info.format), str(info.subtype), int(info.samplerate), int(info.channels), int(info.frames)
    )


def supported_names() -> str:
    """'WAV, FLAC, OGG, MP3': for messages."""
    return ", ".join(f.name for f in SUPPORTED_FORMATS)


def check_samples(samples: npt.NDArray[np.float32], source: str, offset: int = 0) -> None:
    """Refuse NaN, infinite or absurd (|x| > MAX_ABS_SAMPLE) samples; `offset` numbers the first one."""
    good = np.abs(samples) <= MAX_ABS_SAMPLE  # False for NaN too
    if not good.all():
        first = int(np.argmin(good))
        raise AudioError(
            f"{source}: sample {offset + first} is {float(samples[first])!r}; allowed: finite values "
            f"(no NaN or inf) within +-{MAX_ABS_SAMPLE:g} (+24 dBFS)"
        )


def _decode(path: Path, info: sf._SoundFileInfo, channel: int) -> Iterator[npt.NDArray[np.float32]]:
    """One channel of the file as float32 blocks at its own rate, checked, until the data really ends."""
    frames = max(1, min(int(info.samplerate * BLOCK_SECONDS), BLOCK_BYTES // (4 * info.channels)))
    position = 0
    try:
        with sf.SoundFile(str(path)) as f:
            buffer = np.empty((frames, f.channels), dtype=np.float32)
            while True:
                # Reads into the one buffer and stops at the real end of the data, whatever the header
                # declared (soundfile's `blocks` trusts the declared length).
                data = f.read(out=buffer)
                if len(data) == 0:
                    return
                samples = data[:, channel].copy()  # the buffer is reused for the next block
                check_samples(samples, str(path), position)
                position += len(samples)
                yield samples
    except _DECODE_ERRORS as exc:
        raise AudioError(f"{path}: not a readable audio file ({exc})") from exc


def resample_blocks(
    blocks: Iterable[npt.NDArray[np.float32]], rate: int, target_rate: int
) -> Iterator[npt.NDArray[np.float32]]:
    """Resample a sequence of (n,) float32 blocks chunk by chunk; the output equals one-shot resampling."""
    if rate == target_rate:
        yield from blocks
        return
    stream = soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
    for block in blocks:
        out = np.asarray(stream.resample_chunk(block), dtype=np.float32)
        if len(out):
            yield out
    tail = np.asarray(stream.resample_chunk(np.empty(0, dtype=np.float32), last=True), dtype=np.float32)
    if len(tail):
        yield tail


def stream_audio(path: str | Path, sample_rate: int, channel: int = 0) -> Iterator[npt.NDArray[np.float32]]:
    """One channel of an audio file as float32 blocks at `sample_rate` Hz, in memory bounded by one block.

    Raises AudioError (when iterated) for a file that cannot be used, naming the file.
    """
    path = Path(path)
    info = check_readable(path, channel)
    yield from resample_blocks(_decode(path, info, channel), info.samplerate, sample_rate)


def _concatenate(
    path: Path, blocks: Iterator[npt.NDArray[np.float32]], limit: int, rate: int, max_seconds: float
) -> npt.NDArray[np.float32]:
    parts, total = [], 0
    for block in blocks:
        total += len(block)
        if total > limit:
            raise AudioError(_too_long(path, total / rate, max_seconds))
        parts.append(block)
    if total == 0:
        raise AudioError(f"{path}: holds no audio samples")
    return np.concatenate(parts)


def _too_long(path: Path, seconds: float, max_seconds: float) -> str:
    return (
        f"{path}: {seconds:.0f} s of audio, longer than the {max_seconds:.0f} s a file may hold to be "
        "loaded whole; split it into shorter files"
    )


def read_audio(
    path: str | Path, channel: int = 0, max_seconds: float = MAX_LOAD_SECONDS
) -> tuple[npt.NDArray[np.float32], int]:
    """Read one channel of an audio file as float32 samples at the file's own rate.

    Returns (samples, sample_rate) with samples of shape (n_samples,).
    """
    path = Path(path)
    info = check_readable(path, channel)
    rate = int(info.samplerate)
    if info.frames > max_seconds * rate:
        raise AudioError(_too_long(path, info.frames / rate, max_seconds))
    return _concatenate(path, _decode(path, info, channel), int(max_seconds * rate), rate, max_seconds), rate


def load_audio(
    path: str | Path, sample_rate: int, channel: int = 0, max_seconds: float = MAX_LOAD_SECONDS
) -> npt.NDArray[np.float32]:
    """Load one channel of an audio file as float32 mono at `sample_rate` Hz, shape (n_samples,).

    Files longer than `max_seconds` are refused: the whole file is held in memory.
    """
    path = Path(path)
    info = check_readable(path, channel)
    if info.frames > max_seconds * info.samplerate:
        raise AudioError(_too_long(path, info.frames / info.samplerate, max_seconds))
    blocks = resample_blocks(_decode(path, info, channel), info.samplerate, sample_rate)
    # One second of slack: the resampler's last block may round up.
    return _concatenate(path, blocks, int((max_seconds + 1) * sample_rate), sample_rate, max_seconds)


def list_audio_files(directory: str | Path) -> list[Path]:
    """Audio files (by suffix) directly inside `directory`, sorted by name for reproducible splits."""
    return list_folder(directory)[0]


def list_folder(directory: str | Path) -> tuple[list[Path], list[Path]]:
    """(audio files of a supported format by suffix, other files) directly inside `directory`, each sorted
    by name. Hidden files (a leading dot: partial writes, editor files) are neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AudioError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    return audio, [p for p in files if p.suffix.lower() not in AUDIO_SUFFIXES]
