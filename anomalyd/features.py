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
        # Transposed once so that (n_frames, n_freqs) @ (n_freqs, n_mels) needs no copy per call.
        self._filterbank_t = np.ascontiguousarray(filterbank.T, dtype=np.float32)
        self._window = hann_window(params.n_fft)

    def __call__(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n_samples,) float32 audio -> (n_mels, n_frames) float32 log-mel in dB."""
        p = self.params
        n_frames = p.n_frames(len(samples))
        if n_frames == 0:
            return np.empty((p.n_mels, 0), dtype=np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(samples, p.n_fft)[:: p.hop_length][:n_frames]
        spectrum = np.fft.rfft(frames * self._window, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = power.astype(np.float32) @ self._filterbank_t
        db: npt.NDArray[np.float32] = (10.0 * np.log10(np.maximum(mel, p.amin))).T.astype(np.float32)
        return db
