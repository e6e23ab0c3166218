"""Speed and memory of the runtime path, printed as a table (a benchmark, not a test).

    python -m anomalyd.bench --bundle BUNDLE [--seconds 60]

Measures, on one thread: log-mel cost per second of audio, ONNX Runtime cost per window alone and in
batches, the streams one core could score in real time, and the start-up cost (import + bundle load) and
peak memory of a fresh process that scores one clip.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer

_STARTUP_PROBE = """
import resource, sys, time
t0 = time.perf_counter()
from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer
import numpy as np
scorer = ClipScorer.from_bundle(load_bundle(sys.argv[1]))
t1 = time.perf_counter()
scorer.score_samples(np.zeros(16000 * 10, dtype=np.float32) + 1e-3)
print(t1 - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'torch' in sys.modules)
"""


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest of `repeats` runs, in seconds: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomalyd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length for the feature timing")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    scorer = ClipScorer.from_bundle(bundle, threads=1)
    p, g = bundle.meta.features, bundle.meta.window
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(args.seconds * p.sample_rate))).astype(np.float32)

    feature_s = best_of(lambda: scorer.logmel(audio)) / args.seconds  # per second of audio
    windows = rng.standard_normal((64, p.n_mels, g.n_frames)).astype(np.float32)
    single_s = best_of(lambda: scorer.autoencoder.reconstruct(windows[:1]), 20)
    batch_s = best_of(lambda: scorer.autoencoder.reconstruct(windows)) / len(windows)
    windows_per_audio_s = p.sample_rate / (g.hop_frames * p.hop_length)
    per_stream_s = feature_s + windows_per_audio_s * batch_s  # CPU seconds per second of one stream

    probe = subprocess.run(
        [sys.executable, "-c", _STARTUP_PROBE, str(args.bundle)], capture_output=True, text=True, check=True
    )
    startup_s, rss_mb, torch_loaded = probe.stdout.split()

    rows = [
        ("log-mel, per second of audio", f"{feature_s * 1e3:.3f} ms"),
        ("inference, 1 window (batch 1)", f"{single_s * 1e3:.3f} ms"),
        ("inference, per window in batches of 64", f"{batch_s * 1e3:.3f} ms"),
        ("windows per second of audio per stream", f"{windows_per_audio_s:.2f}"),
        ("streams per core in real time", f"{1 / per_stream_s:.0f}"),
        ("start-up: import + load bundle", f"{float(startup_s):.2f} s"),
        ("peak RSS scoring a 10 s clip", f"{float(rss_mb):.0f} MB"),
        ("torch imported by the runtime", torch_loaded),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"model {bundle.meta.model_id}, 1 thread")
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  ----------")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
