"""The textbook pipeline, the yardstick `make bench` measures the daemon against: each window on its own,
as tutorials and the DCASE baselines score clips: librosa's mel spectrogram of the window's audio, dB,
the bundle's normalisation, the torch ConvAE with batch 1, the mean squared error. The same bundle, the
same window geometry and the same audio as the daemon's measurement; one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import librosa
import numpy as np
import torch

from anomalyd.bundle import load_bundle
from training.finetune import load_parent
from training.model import ConvAutoencoder

WARM_UP_WINDOWS = 5


def cpu_seconds_per_window(bundle_path: Path, windows: int = 100, seed: int = 0) -> float:
    """CPU seconds (this process, one thread) to score one window the textbook way."""
    bundle = load_bundle(bundle_path)
    f, g = bundle.meta.features, bundle.meta.window
    parent = load_parent(bundle_path, f)
    model = ConvAutoencoder(parent.arch)
    parent.load_weights(model)
    model.eval()
    torch.set_num_threads(1)
    size, hop = f.n_samples(g.n_frames), g.hop_frames * f.hop_length
    total = WARM_UP_WINDOWS + windows
    audio = (0.1 * np.random.default_rng(seed).standard_normal(size + hop * total)).astype(np.float32)

    def score(i: int) -> float:
        chunk = audio[i * hop : i * hop + size]
        mel = librosa.feature.melspectrogram(
            y=chunk, sr=f.sample_rate, n_fft=f.n_fft, hop_length=f.hop_length, n_mels=f.n_mels,
            fmax=f.fmax, center=False, power=2.0,
        )  # fmt: skip
        db = librosa.power_to_db(mel, amin=f.amin, top_db=None)[:, : g.n_frames]
        x = torch.from_numpy(bundle.meta.normalisation.apply(db[None].astype(np.float32))[:, None])
        with torch.no_grad():
            return float(((model(x) - x) ** 2).mean())

    for i in range(WARM_UP_WINDOWS):
        score(i)
    started = time.process_time()
    for i in range(WARM_UP_WINDOWS, total):
        score(i)
    return (time.process_time() - started) / windows
