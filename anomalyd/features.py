"""Log-mel spectrogram in numpy: the one feature function that training, scoring and the daemon share.

Defaults follow the DCASE Task 2 baselines: 16 kHz, 1024-sample FFT (64 ms), 512-sample hop (32 ms),
128 mel bands, power spectrum, decibels. The mel filterbank is not computed here: training builds it with
`librosa.filters.mel` and stores it in the model bundle, so the daemon needs neither librosa nor torch and
can never drift from what the model was trained on.

Two choices differ from librosa's defaults, both so that streaming equals offline sample for sample:
- no centre padding (`center=False`): frame t covers samples [t*hop, t*hop + n_fft), so a frame's time is
  an exact sample offset and a stream never needs audio from before it started;
- no `top_db` clipping: it is relative to the loudest frame of the whole clip, which a stream does not know.

And one differs from the DCASE baselines: the filterbank stops at 7300 Hz, not at 8 kHz. Any chain that
resamples (a 44.1 or 48 kHz microphone brought to 16 kHz, or 16 kHz audio sent through a 48 kHz sound
server) keeps only what lies inside the resampler's passband: soxr's, which anomalyd uses, ends at 91.3 %
of Nyquist, 7304 Hz at 16 kHz. Measured on MIMII fan audio, a 16 -> 44.1 or 48 -> 16 kHz round trip lowers
the three bands above it by 0.6, 5.5 and 23 dB and leaves the others within 0.02 dB: with those bands a
model trained on 16 kHz recordings would call a 48 kHz microphone's normal sound a fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000  # Hz
N_FFT = 1024  # samples, 64 ms at 16 kHz
HOP_LENGTH = 512  # samples, 32 ms at 16 kHz
N_MELS = 128  # mel bands
AMIN = 1e-10  # power floor before log10, as librosa.power_to_db
FMAX = 7300.0  # Hz, highest filterbank edge: inside any resampler's passband (module docstring)


@dataclass(frozen=True)
class FeatureParams:
    """Everything that defines the features; stored in model.json and checked on load."""

    sample_rate: int = SAMPLE_RATE  # Hz, audio is resampled to this on entry
    n_fft: int = N_FFT  # samples per FFT frame
    hop_length: int = HOP_LENGTH  # samples between frame starts
    n_mels: int = N_MELS  # mel bands
    fmin: float = 0.0  # Hz, lowest filterbank edge
    fmax: float = FMAX  # Hz, highest filterbank edge
    power: float = 2.0  # exponent of the magnitude spectrum; 2 = power, required by the dB step
    amin: float = AMIN  # floor before 10*log10
    window: str = "hann"  # periodic Hann, as scipy.signal.get_window("hann", n_fft)
    center: bool = False  # see module docstring
    mel_scale: str = "slaney"  # librosa.filters.mel(htk=False)
    mel_norm: str = "slaney"  # librosa.filters.mel(norm="slaney"): area-normalised triangles

    @property
    def n_freqs(self) -> int:
        """FFT bins per frame (n_fft // 2 + 1)."""
        return self.n_fft // 2 + 1

    def problems(self) -> list[str]:
        """Reasons these parameters cannot be used by this version; empty when they can."""
        found = []
        if self.sample_rate <= 0:
            found.append(f"sample_rate must be positive, got {self.sample_rate}")
        if self.n_fft <= 0 or self.hop_length <= 0 or self.n_mels <= 0:
            found.append(
                f"n_fft, hop_length and n_mels must be positive, got {self.n_fft}, {self.hop_length}, "
                f"{self.n_mels}"
            )
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            found.append(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}")
        if self.power != 2.0:
            found.append(f"power must be 2.0 (power spectrum in dB), got {self.power}")
        if self.window != "hann":
            found.append(f"window must be 'hann', got {self.window!r}")
        if self.center:
            found.append("center=true is not supported: streaming needs frames at exact sample offsets")
        return found

    def n_frames(self, n_samples: int) -> int:
        """Number of whole frames in `n_samples` samples (no padding)."""
        if n_samples < self.n_fft:
            return 0
        return 1 + (n_samples - self.n_fft) // self.hop_length

    def n_samples(self, n_frames: int) -> int:
        """Fewest samples that hold `n_frames` whole frames."""
        return self.n_fft + (n_frames - 1) * self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureParams:
        """Build from model.json's `features`; unknown keys raise KeyError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KeyError(f"unknown feature parameters: {', '.join(unknown)}")
        return cls(**data)


def hann_window(n: int) -> npt.NDArray[np.float32]:
    """Periodic Hann window of n samples (the FFT-friendly one; scipy's fftbins=True)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


class LogMel:
    """Log-mel spectrogram of float32 mono audio at `params.sample_rate`.

    `filterbank` has shape (n_mels, n_fft // 2 + 1) and comes from the model bundle.
    """

    def __init__(self, params: FeatureParams, filterbank: npt.NDArray[np.floating[Any]]) -> None:
        problems = params.problems()
        if problems:
            raise ValueError("; ".join(problems))
        expected = (params.n_mels, params.n_freqs)
        if filterbank.shape != expected:
            raise ValueError(f"mel filterbank has shape {filterbank.shape}, parameters need {expected}")
        self.params = params
        self.filterbank = np.asarray(filterbank, dtype=np.float32)
        self._weights, self._terms = _sparse_bands(self.filterbank)
        self._window = hann_window(params.n_fft)

    def __call__(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n_samples,) float32 audio -> (n_mels, n_frames) float32 log-mel in dB.

        A frame's values do not depend on the other frames of the call, to the bit: streamed audio, framed
        a few frames at a time, gives what the whole clip gives. (The FFT transforms each frame alone; a
        BLAS matrix product would not do: its kernels, and so its rounding, change with the frame count.)
        """
        p = self.params
        n_frames = p.n_frames(len(samples))
        if n_frames == 0:
            return np.empty((p.n_mels, 0), dtype=np.float32)
        # A strided view, frame t starting t * hop samples in (as_strided costs several times more).
        samples = np.ascontiguousarray(samples)
        step = samples.itemsize
        frames = np.ndarray(
            (n_frames, p.n_fft), samples.dtype, buffer=samples, strides=(p.hop_length * step, step)
        )
        # numpy >= 2 transforms float32 in single precision (complex64): all that float32 features need.
        spectrum = np.fft.rfft(frames * self._window)
        parts = spectrum.view(spectrum.real.dtype)  # real and imaginary parts, interleaved
        np.square(parts, out=parts)
        power = parts[:, 0::2] + parts[:, 1::2]
        # Each band sums its own bins' weighted powers, term by term in a fixed order (see _sparse_bands):
        # the filterbank is under 2 % non-zero, and the order is the same however many frames there are.
        n_layers, n_freqs = self._weights.shape
        weighted = np.empty((n_layers * n_freqs + 1, n_frames), dtype=np.float32)
        weighted[-1] = 0.0
        rows = weighted[:-1].reshape(n_layers, n_freqs, n_frames)
        # The same products either way; looping over frames innermost only pays with many of them.
        if n_frames < 16:
            np.multiply(power[:, None, :], self._weights, out=rows.transpose(2, 0, 1))
        else:
            np.multiply(self._weights[:, :, None], np.ascontiguousarray(power.T), out=rows)
        mel: npt.NDArray[np.float32] = np.take(weighted, self._terms, axis=0).sum(axis=0)
        np.maximum(mel, p.amin, out=mel)
        np.log10(mel, out=mel)
        mel *= 10.0
        return mel


def _sparse_bands(
    filterbank: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """The filterbank as a few rows of bin weights and, for each band, the rows of their products that
    it sums.

    Mel triangles overlap, so a bin feeds up to two bands: `weights[l, k]` is bin k's weight in the l-th
    band it feeds. With the weighted powers stacked as rows `l * n_freqs + k`, and one row of zeros last,
    band m is the sum of rows `terms[:, m]`: its bins in order, padded with the zero row to the widest
    band's count.
    """
    n_mels, n_freqs = filterbank.shape
    nonzero = filterbank != 0
    band, freq = np.nonzero(nonzero)  # band by band, bins ascending
    layer = (np.cumsum(nonzero, axis=0) - 1)[band, freq]  # earlier bands that the bin also feeds
    term = (np.cumsum(nonzero, axis=1) - 1)[band, freq]  # earlier bins of the band
    n_layers = max(1, int(nonzero.sum(axis=0).max()))
    weights = np.zeros((n_layers, n_freqs), dtype=np.float32)
    weights[layer, freq] = filterbank[band, freq]
    terms = np.full((max(1, int(nonzero.sum(axis=1).max())), n_mels), n_layers * n_freqs, dtype=np.intp)
    terms[term, band] = layer * n_freqs + freq
    return weights, terms
