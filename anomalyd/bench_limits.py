"""What the model alone would allow (a benchmark's yardstick, not a test): its FLOPs per window, counted
from the bundle's architecture, over the single-core float32 matmul peak measured on this machine.

Two limits: every overlapping window reconstructed anew (what the daemon does today: a frame goes through
the model n_frames / hop_frames times), and each frame reconstructed once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalyd.bundle import Bundle

MATMUL_N = 1024  # square float32 matrices: large enough for the BLAS kernel's peak, small for the cache


def conv_autoencoder_flops(architecture: dict[str, Any], n_mels: int, n_frames: int) -> float:
    """Multiply-adds x 2 of one window through training/model.py's ConvAE: three stride-2 convolutions
    down, three stride-2 transposed convolutions up (each input element scatters k*k*c_out products)."""
    c1, c2, c3 = architecture["channels"]
    k2 = architecture["kernel_size"] ** 2
    h, w = n_mels, n_frames
    down = [(1, c1, h // 2, w // 2), (c1, c2, h // 4, w // 4), (c2, c3, h // 8, w // 8)]
    flops = sum(2.0 * cin * cout * k2 * ho * wo for cin, cout, ho, wo in down)
    up = [(c3, c2, h // 8, w // 8), (c2, c1, h // 4, w // 4), (c1, 1, h // 2, w // 2)]
    flops += sum(2.0 * cin * cout * k2 * hi * wi for cin, cout, hi, wi in up)
    return float(flops)


def matmul_peak_gflops(repeats: int = 5) -> float:
    """The best single-threaded float32 matmul rate of this machine, GFLOP/s."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (a benchmark-only dependency)

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32) for _ in range(2))
    best = float("inf")
    with threadpool_limits(limits=1):
        a @ b  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    return 2.0 * MATMUL_N**3 / best / 1e9


@dataclass(frozen=True)
class Limits:
    flops_per_window: float
    windows_per_audio_second: float
    frames_per_audio_second: float
    n_frames: int
    peak_gflops: float

    @property
    def every_window(self) -> float:
        """Real-time streams per core if every overlapping window is reconstructed anew."""
        return self.peak_gflops * 1e9 / (self.flops_per_window * self.windows_per_audio_second)

    @property
    def frame_once(self) -> float:
        """Real-time streams per core if each frame is reconstructed once."""
        per_frame = self.flops_per_window / self.n_frames
        return self.peak_gflops * 1e9 / (per_frame * self.frames_per_audio_second)


def limits(bundle: Bundle) -> Limits:
    f, g = bundle.meta.features, bundle.meta.window
    flops = conv_autoencoder_flops(bundle.meta.architecture, f.n_mels, g.n_frames)
    frames_per_s = f.sample_rate / f.hop_length
    return Limits(flops, frames_per_s / g.hop_frames, frames_per_s, g.n_frames, matmul_peak_gflops())
