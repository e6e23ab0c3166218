"""An event clip's log-mel spectrogram as a PNG, with the event's span marked, for its page.

The mel bands are the stream's own (its bundle's filterbank, so the picture is what the model heard);
a clip whose stream is no longer configured falls back to a plain log-power STFT. Time runs left to
right, low frequencies at the bottom, colours from the viridis map over the top 80 dB of the clip.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
from PIL import Image

from anomalyd.features import LogMel

MAX_WIDTH = 1600  # px: columns beyond are merged (their maximum) so a 2-minute clip stays light
ROW_PX = 2  # each mel band is this many pixels high
DYNAMIC_RANGE_DB = 80.0
FALLBACK_N_FFT = 1024
FALLBACK_HOP = 512
MARK_PX = 6  # height of the bar that marks the event's span along the top
MAX_CLIP_SECONDS = 3600.0  # a clip folder's file longer than this is not an event clip: not drawn

# Viridis as a 6th-degree polynomial per channel (a fit to matplotlib's table, within 2 % of full scale).
_VIRIDIS = np.array([
    [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
    [0.1050930431085774, 1.404613529898575, 1.384590162594685],
    [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
    [-4.634230498983486, -5.799100973351585, -19.33244095627987],
    [6.228269936347081, 14.17993336680509, 56.69055260068105],
    [4.776384997670288, -13.74514537774601, -65.35303263337234],
    [-5.435455855934631, 4.645852612178535, 26.3124352495832],
])  # fmt: skip


def viridis(x: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Values in [0, 1], any shape -> RGB bytes, shape + (3,)."""
    t = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.zeros((*x.shape, 3))
    for power in range(len(_VIRIDIS) - 1, -1, -1):  # Horner
        rgb = rgb * t + _VIRIDIS[power]
    return np.asarray(np.clip(rgb * 255.0 + 0.5, 0, 255), dtype=np.uint8)


def _stft_db(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Log power of a plain STFT, (n_fft // 2 + 1, n_frames), when no mel front end is at hand."""
    if len(samples) < FALLBACK_N_FFT:
        samples = np.pad(samples, (0, FALLBACK_N_FFT - len(samples)))
    n = 1 + (len(samples) - FALLBACK_N_FFT) // FALLBACK_HOP
    frames = np.lib.stride_tricks.sliding_window_view(samples, FALLBACK_N_FFT)[::FALLBACK_HOP][:n]
    power = np.abs(np.fft.rfft(frames * np.hanning(FALLBACK_N_FFT), axis=1)) ** 2
    return np.asarray(10.0 * np.log10(np.maximum(power.T, 1e-10)), dtype=np.float32)


def _merge_columns(db: npt.NDArray[np.float32], width: int) -> npt.NDArray[np.float32]:
    """At most `width` columns, each the maximum of the frames it stands for."""
    n = db.shape[1]
    if n <= width:
        return db
    edges = np.linspace(0, n, width + 1).astype(int)
    return np.maximum.reduceat(db, edges[:-1], axis=1)


def render(clip: Path, logmel: LogMel | None, span: tuple[float, float | None] | None) -> tuple[bytes, float]:
    """(PNG bytes, the clip's length in seconds). `span`: the event's (start, end) in seconds from the
    clip's start (end None: still open, to the clip's end). Raises OSError / soundfile's error for a
    file that cannot be read, ValueError for one too long to be an event clip."""
    info = sf.info(str(clip))
    if info.duration > MAX_CLIP_SECONDS:
        raise ValueError(f"{clip.name}: {info.duration:.0f} s is not an event clip")
    samples, rate = sf.read(str(clip), dtype="float32", always_2d=True)
    mono = np.ascontiguousarray(samples[:, 0])
    seconds = len(mono) / rate
    own_bands = logmel is not None and logmel.params.sample_rate == rate
    db = logmel(mono) if logmel is not None and own_bands else _stft_db(mono)
    if db.shape[1] == 0:  # shorter than one frame: one silent column rather than no picture
        db = np.full((db.shape[0], 1), -100.0, dtype=np.float32)
    db = _merge_columns(db, MAX_WIDTH)
    top = float(db.max()) if db.size else 0.0
    scaled = (db - (top - DYNAMIC_RANGE_DB)) / DYNAMIC_RANGE_DB
    pixels = viridis(np.repeat(scaled[::-1], ROW_PX, axis=0))  # low bands at the bottom
    if span is not None and seconds > 0:
        width = pixels.shape[1]
        start = int(np.clip(span[0] / seconds, 0, 1) * width)
        end = int(np.clip((span[1] if span[1] is not None else seconds) / seconds, 0, 1) * width)
        pixels[:MARK_PX, start : max(end, start + 1)] = (230, 57, 70)  # the event: a red bar on top
        for column in (start, end - 1):
            if 0 <= column < width:
                pixels[:, column] = (255, 255, 255)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", optimize=False)
    return out.getvalue(), seconds
