"""The convolutional autoencoder: three stride-2 Conv2d + ReLU down, three ConvTranspose2d up.

Input and output are (batch, 1, n_mels, n_frames) normalised log-mel windows; both dimensions must be
multiples of 8. Each stage halves both axes, so the default 128 x 64 window becomes a
channels[-1] x 16 x 8 code. The code is kept smaller than the input (the bottleneck); an autoencoder
that can copy its input reconstructs faults as well as normal sound and detects nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    channels: tuple[int, int, int] = (32, 64, 8)  # encoder output channels per stage; the last is the code
    kernel_size: int = 5  # odd, so "same" padding keeps the halving exact

    def to_dict(self) -> dict[str, object]:
        return {"name": "conv_autoencoder", **asdict(self), "channels": list(self.channels)}

    def code_size(self, n_mels: int, n_frames: int) -> int:
        return self.channels[-1] * (n_mels // 8) * (n_frames // 8)


class ConvAutoencoder(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        k, pad = arch.kernel_size, arch.kernel_size // 2
        c1, c2, c3 = arch.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, k, stride=2, padding=pad),
            nn.ReLU(),
            nn.Conv2d(c1, c2, k, stride=2, padding=pad),
            nn.ReLU(),
            nn.Conv2d(c2, c3, k, stride=2, padding=pad),
            nn.ReLU(),
        )
        # output_padding=1 makes each transposed convolution exactly double its input again.
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, k, stride=2, padding=pad, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, k, stride=2, padding=pad, output_padding=1),
            nn.ReLU(),
            # No activation at the end: normalised log-mel values are signed.
            nn.ConvTranspose2d(c1, 1, k, stride=2, padding=pad, output_padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # type: ignore[no-any-return]


def active_code_share(model: ConvAutoencoder, batches: Iterable[torch.Tensor]) -> float:
    """Share of code values above zero over the windows of `batches`.

    0 is a dead code: the last ReLU of the encoder is negative on every normal window, so no gradient
    reaches the encoder again and the decoder rebuilds one fixed template whatever comes in. Such a model
    still scores how far a window's average spectrum lies from that template, but nothing finer; with a
    one-channel code it happens on some seeds within the first epochs.
    """
    model.eval()
    active, total = 0, 0
    with torch.no_grad():
        for batch in batches:
            code = model.encoder(batch)
            active += int((code > 0).sum())
            total += code.numel()
    return active / total if total else 0.0


def reconstruct(model: ConvAutoencoder, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """torch's reconstructions of (n, n_mels, n_frames) windows: what an exported model is held to."""
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(windows))[:, None])[:, 0].numpy()
    return np.asarray(out, dtype=np.float32)
