"""The DCASE 2020 Task 2 baseline, re-implemented to be run on the same split and seeds as anomalyd's model.

The published baseline (Koizumi et al., "Description and discussion on DCASE 2020 Challenge Task 2",
and its reference code `dcase2020_task2_baseline`): a dense autoencoder on 5 stacked log-mel frames.

- Features: 128 mel bands, n_fft 1024, hop 512, power 2, 10 * log10(mel + eps); 5 consecutive frames
  concatenated into one 640-dimensional vector, every frame a start (stride 1).
- Model: 640-128-128-128-128-8-128-128-128-128-640, each hidden layer Dense + BatchNorm + ReLU, the
  output linear.
- Training: Adam (lr 0.001), MSE, 100 epochs, batch 512, shuffled, the last 10 % of the vectors held out
  (the reference code's Keras `validation_split`, which only reports a loss on them). Keras's defaults
  where they differ from torch's: Glorot-uniform weights and zero biases, BatchNorm momentum 0.99 and
  epsilon 1e-3, Adam epsilon 1e-7.
- Clip score: the mean over the clip's vectors of their mean squared error.

This is a yardstick only: nothing in the daemon uses it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from anomalyd.audio import read_audio

SAMPLE_RATE = 16_000
N_MELS, FRAMES, N_FFT, HOP, POWER = 128, 5, 1024, 512, 2.0
EPOCHS, BATCH, LEARNING_RATE, VALIDATION = 100, 512, 1e-3, 0.1
HIDDEN, BOTTLENECK = 128, 8

Vectors = npt.NDArray[np.float32]


def clip_vectors(path: Path) -> Vectors:
    """The clip's stacked log-mel vectors, (n, 640), as the baseline computes them."""
    audio, rate = read_audio(path)
    if rate != SAMPLE_RATE:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE)
    mel = librosa.feature.melspectrogram(
        y=audio, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, power=POWER
    )
    log_mel = 20.0 / POWER * np.log10(mel + np.finfo(np.float32).eps)
    count = log_mel.shape[1] - FRAMES + 1
    if count < 1:
        return np.zeros((0, N_MELS * FRAMES), np.float32)
    # Frame-major, as the reference code: vector[t] = frames t..t+4, each 128 bands.
    stacked = np.concatenate([log_mel[:, t : t + count] for t in range(FRAMES)], axis=0)
    return np.ascontiguousarray(stacked.T, dtype=np.float32)


class DenseAE(nn.Module):
    def __init__(self, dims: int = N_MELS * FRAMES) -> None:
        super().__init__()
        widths = [dims, HIDDEN, HIDDEN, HIDDEN, HIDDEN, BOTTLENECK, HIDDEN, HIDDEN, HIDDEN, HIDDEN]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            # Keras's BatchNormalization defaults: momentum 0.99 (torch counts it the other way), eps 1e-3.
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b, eps=1e-3, momentum=0.01), nn.ReLU()]
        layers.append(nn.Linear(HIDDEN, dims))
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):  # Keras's Dense defaults
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


@dataclass
class Baseline:
    model: DenseAE

    def clip_score(self, path: Path) -> float:
        """Mean over the clip's vectors of their mean squared reconstruction error."""
        vectors = torch.from_numpy(clip_vectors(path))
        self.model.eval()
        with torch.no_grad():
            errors = ((self.model(vectors) - vectors) ** 2).mean(dim=1)
        return float(errors.mean())


def train_baseline(files: list[Path], seed: int, epochs: int = EPOCHS) -> Baseline:
    """Train the dense autoencoder on the files' vectors (deterministic for a seed)."""
    torch.manual_seed(seed)
    data = np.concatenate([clip_vectors(f) for f in files])
    # Keras's validation_split holds out the last 10 % of the rows as given (the last file's), unshuffled.
    train = torch.from_numpy(data[: len(data) - int(len(data) * VALIDATION)])
    model = DenseAE()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, eps=1e-7)  # Keras's epsilon
    loss_fn = nn.MSELoss()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), BATCH):
            batch = order[start : start + BATCH]
            if len(batch) < 2:  # BatchNorm needs two rows
                continue
            x = train[batch]
            optimiser.zero_grad()
            loss = loss_fn(model(x), x)
            loss.backward()
            optimiser.step()
    return Baseline(model)
