"""Speed and memory of the runtime path, printed as a table (a benchmark, not a test).

    python -m anomalyd.bench --bundle BUNDLE [--json OUT]

In one process and one run, on the same synthetic audio and window geometry:
- the parts, on one thread: log-mel per second of audio, ONNX Runtime per model input alone and in
  batches, and the real-time streams per core they add up to;
- the whole daemon pipeline (sources, streaming features, batched inference, detectors, event store) on
  N = 1, 16, 128 and 512 file replays taken as fast as it takes them: seconds of audio per CPU-second of
  the whole process, i.e. real-time streams per core (anomalyd/bench_pipeline.py);
- how long windows wait for their scores with 128 real-time streams (p50, p99);
- the yardsticks: the textbook pipeline (librosa log-mel and the torch model per window, batch 1:
  training/textbook.py, needs the train extra) and the model's own limits (its FLOPs over this machine's
  single-core matmul peak: anomalyd/bench_limits.py);
- behaviour under overload: how long a stop takes with 256 fast streams and a full queue, and how far
  scores trail the audio (the lag the daemon reports) with more real-time streams than the box can score;
- the daemon as a service: launch to READY=1, memory and CPU with 16 real-time streams, without and with
  the dashboard (a page open and Prometheus scraping): anomalyd/bench_web.py.
`--json OUT` writes the headline figures for scripts (docs/benchmarks.md lists them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyd.bench_limits import limits
from anomalyd.bench_pipeline import (
    Latency,
    Throughput,
    lag_under_overload,
    latency,
    stop_under_load,
    throughput,
)
from anomalyd.bench_web import web_cost
from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer

# A fresh process scoring one clip: the runtime's peak memory, and whether anything the daemon imports
# pulls in torch (it must run without it).
_CLIP_PROBE = """
import sys
import anomalyd.service
from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer
import numpy as np
scorer = ClipScorer.from_bundle(load_bundle(sys.argv[1]))
scorer.score_samples(np.zeros(16000 * 10, dtype=np.float32) + 1e-3)
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(peak / 1024, 'torch' in sys.modules)
"""

WEB_STREAMS = 16  # the dashboard's cost (and the daemon's memory) is measured with this many streams
SWEEP = (1, 16, 128, 512)  # replayed streams, as fast as the pipeline takes them
HEADLINE = 512  # the sweep's figure that `streams_per_core` reports: the most streams, the least idle
LATENCY_STREAMS = 128  # real-time streams for the latency figures


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest of `repeats` runs, in seconds: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _textbook(bundle: Path) -> float | None:
    """CPU seconds per window of the textbook pipeline, or None without the train extra (torch)."""
    try:
        from training.textbook import cpu_seconds_per_window  # noqa: PLC0415  (torch: benchmark only)
    except ImportError:
        return None
    return cpu_seconds_per_window(bundle)


@dataclass(frozen=True)
class ModelFigures:
    """What one bundle costs: its parts alone, the whole pipeline's sweep, and window latency."""

    label: str
    feature_s: float  # log-mel CPU seconds per second of audio
    single_s: float  # one model input, batch 1
    batch_s: float  # per model input in batches of 64
    inputs_per_audio_s: float
    sweep: list[Throughput]
    latency: Latency  # independent microphones
    latency_aligned: Latency  # the same, file replays started together

    @property
    def parts_streams_per_core(self) -> float:
        return 1 / (self.feature_s + self.inputs_per_audio_s * self.batch_s)

    @property
    def headline(self) -> Throughput:
        return next(t for t in self.sweep if t.streams == HEADLINE)

    def rows(self) -> list[tuple[str, str]]:
        mics, aligned = self.latency, self.latency_aligned
        return [
            ("log-mel, per second of audio", f"{self.feature_s * 1e3:.3f} ms"),
            ("inference, 1 model input (batch 1)", f"{self.single_s * 1e3:.3f} ms"),
            ("inference, per model input in batches of 64", f"{self.batch_s * 1e3:.3f} ms"),
            ("model inputs per second of audio per stream", f"{self.inputs_per_audio_s:.2f}"),
            ("parts alone (log-mel + model): streams per core", f"{self.parts_streams_per_core:.0f}"),
            *[(f"pipeline, {t.streams} fast replays: real-time streams per core (audio s per CPU-s)",
               f"{t.audio_per_cpu_second:.0f} ({t.audio_per_second:.0f} audio s/s)") for t in self.sweep],
            (f"window latency, {LATENCY_STREAMS} real-time microphones: p50 / p99",
             f"{mics.p50_ms:.1f} / {mics.p99_ms:.1f} ms ({mics.windows} windows)"),
            ("  the same: real-time streams per core (0.1 s blocks)", f"{mics.streams_per_core:.0f}"),
            (f"  the same, {LATENCY_STREAMS} file replays started together",
             f"{aligned.p50_ms:.1f} / {aligned.p99_ms:.1f} ms ({aligned.windows} windows)"),
        ]  # fmt: skip


def model_figures(path: Path, seconds: float) -> ModelFigures:
    bundle = load_bundle(path)
    scorer = ClipScorer.from_bundle(bundle, threads=1)
    p, g = bundle.meta.features, bundle.meta.window
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(seconds * p.sample_rate))).astype(np.float32)
    tiles = rng.standard_normal((64, p.n_mels, g.model_frames)).astype(np.float32)
    inputs = f"{g.model_frames}-frame {'tiles' if g.tile_frames else 'whole windows'}"
    return ModelFigures(
        label=f"{bundle.meta.model_id} ({inputs}, channels {bundle.meta.architecture.get('channels')}, "
        f"{bundle.meta.export.get('precision', 'float32')})",
        feature_s=best_of(lambda: scorer.logmel(audio)) / seconds,
        single_s=best_of(lambda: scorer.autoencoder.reconstruct(tiles[:1]), 20),
        batch_s=best_of(lambda: scorer.autoencoder.reconstruct(tiles)) / len(tiles),
        inputs_per_audio_s=p.sample_rate / (g.tile_hop * p.hop_length),
        sweep=[throughput(path, n) for n in SWEEP],
        latency=latency(path, LATENCY_STREAMS),
        latency_aligned=latency(path, LATENCY_STREAMS, microphones=False),
    )


def _print(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(title)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  ----------")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomalyd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the model the headline figures are for")
    parser.add_argument(
        "--also", type=Path, action="append", default=[], metavar="BUNDLE",
        help="another model to measure side by side (its parts, the sweep and latency)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0, help="audio for the per-part timings")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    main_model = model_figures(args.bundle, args.seconds)
    others = [model_figures(path, args.seconds) for path in args.also]
    probe = subprocess.run(
        [sys.executable, "-c", _CLIP_PROBE, str(args.bundle)], capture_output=True, text=True, check=True
    )
    clip_rss_mb, torch_loaded = probe.stdout.split()
    limit = limits(bundle)
    textbook_s = _textbook(args.bundle)  # loads torch and librosa: after every figure of this process
    naive = 1 / (textbook_s * limit.windows_per_audio_second) if textbook_s else None
    stop_s, discarded = stop_under_load(args.bundle)
    per_core = main_model.headline.audio_per_cpu_second
    overload = int(1.5 * per_core * 1.8)  # more than the box's two cores can carry
    max_lag, lagging = lag_under_overload(args.bundle, overload)
    web_off, web_on = web_cost(args.bundle, WEB_STREAMS)

    rows = [
        *main_model.rows(),
        ("textbook (librosa + torch per window, batch 1): per window",
         f"{textbook_s * 1e3:.3f} ms" if textbook_s else "- (needs the train extra)"),
        ("textbook: real-time streams per core", f"{naive:.0f}" if naive else "-"),
        (f"pipeline ({HEADLINE} streams) over textbook", f"{per_core / naive:.1f} x" if naive else "-"),
        ("model per window; single-core float32 matmul peak",
         f"{limit.flops_per_window / 1e6:.1f} MFLOP; {limit.peak_gflops:.0f} GFLOP/s"),
        ("limit, every overlapping window reconstructed: streams/core", f"{limit.every_window:.0f}"),
        ("limit, each frame reconstructed once: streams/core", f"{limit.frame_once:.0f}"),
        (f"pipeline ({HEADLINE} streams) over the frame-once limit", f"{per_core / limit.frame_once:.0%}"),
        ("stop with 256 fast streams and a full queue", f"{stop_s:.2f} s ({discarded} blocks discarded)"),
        (f"lag after 20 s of {overload} real-time streams", f"{max_lag:.1f} s ({lagging} flagged lagging)"),
        ("daemon start: launch to READY=1", f"{web_off.ready_s:.2f} s"),
        ("peak RSS of a process scoring a 10 s clip; torch imported",
         f"{float(clip_rss_mb):.0f} MB; {torch_loaded}"),
        (f"daemon, {WEB_STREAMS} real-time streams: RSS, CPU", f"{web_off.rss_mb:.0f} MB, "
         f"{web_off.cpu_percent:.1f} % of a core"),
        ("  the same with the dashboard, a page open, scrapes", f"{web_on.rss_mb:.0f} MB, "
         f"{web_on.cpu_percent:.1f} % of a core"),
        ("  added by the dashboard", f"{web_on.rss_mb - web_off.rss_mb:+.1f} MB, "
         f"{web_on.cpu_percent - web_off.cpu_percent:+.2f} % of a core"),
    ]  # fmt: skip
    if args.json is not None:
        figures = {
            "model_id": bundle.meta.model_id,
            "model_frames": bundle.meta.window.model_frames,
            "streams_per_core": per_core,
            "streams_per_core_by_streams": {str(t.streams): t.audio_per_cpu_second for t in main_model.sweep},
            "speedup_vs_naive": per_core / naive if naive else None,
            "naive_streams_per_core": naive,
            "limit_streams_per_core": limit.frame_once,
            "limit_every_window_streams_per_core": limit.every_window,
            "limit_fraction": per_core / limit.frame_once,
            "flops_per_window": limit.flops_per_window,
            "matmul_peak_gflops": limit.peak_gflops,
            "p50_latency_ms_at_128": main_model.latency.p50_ms,
            "p99_latency_ms_at_128": main_model.latency.p99_ms,
            "capture_streams_per_core_at_128": main_model.latency.streams_per_core,
            "rss_mb_16_streams": web_off.rss_mb,
            "web_rss_mb": web_on.rss_mb - web_off.rss_mb,
            "startup_s": web_off.ready_s,
            "also": {
                m.label: {
                    "streams_per_core": m.headline.audio_per_cpu_second,
                    "streams_per_core_by_streams": {str(t.streams): t.audio_per_cpu_second for t in m.sweep},
                    "limit_fraction": m.headline.audio_per_cpu_second / limit.frame_once,
                    "p50_latency_ms_at_128": m.latency.p50_ms,
                    "p99_latency_ms_at_128": m.latency.p99_ms,
                    "capture_streams_per_core_at_128": m.latency.streams_per_core,
                }
                for m in others
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    _print(f"model {main_model.label}; 1 thread per worker", rows)
    for other in others:
        print()
        _print(f"model {other.label}", other.rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())
