"""Speed and memory of the runtime path, printed as a table (a benchmark, not a test).

    python -m anomalyd.bench --bundle BUNDLE [--seconds 60]

Measures, on one thread: log-mel cost per second of audio, ONNX Runtime cost per tile alone and in
batches, the streams one core could score in real time, and the start-up cost (import + bundle load) and
peak memory of a fresh process that scores one clip. Then the whole daemon pipeline (worker, detectors,
event store) on `--streams` files replayed as fast as it takes them: how many seconds of audio it gets
through per second, i.e. how many real-time streams its one worker thread could carry. Then two figures
of behaviour under overload: how long a stop takes with 256 fast streams and a full queue, and how far
scores trail the audio (the lag the daemon reports) with more real-time streams than the box can score.
Beside it, the yardsticks: the textbook pipeline (librosa log-mel and the torch model per window, batch 1:
training/textbook.py, needs the train extra) and the model's own limits (its FLOPs over this machine's
single-core matmul peak: anomalyd/bench_limits.py). Last, the daemon's memory and CPU with 16 real-time
streams, without and with the dashboard (a page open and Prometheus scraping): anomalyd/bench_web.py.
`--json OUT` writes the headline figures for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anomalyd.bench_limits import limits
from anomalyd.bench_replays import replays
from anomalyd.bench_web import web_cost
from anomalyd.bundle import load_bundle
from anomalyd.config import parse_config
from anomalyd.pipeline import Pipeline
from anomalyd.records import utc_now
from anomalyd.scoring import ClipScorer
from anomalyd.status import take_snapshot
from anomalyd.store import StoreWriter

_STARTUP_PROBE = """
import resource, sys, time
t0 = time.perf_counter()
from anomalyd.bench_limits import limits
from anomalyd.bench_replays import replays
from anomalyd.bench_web import web_cost
from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer
import numpy as np
scorer = ClipScorer.from_bundle(load_bundle(sys.argv[1]))
t1 = time.perf_counter()
scorer.score_samples(np.zeros(16000 * 10, dtype=np.float32) + 1e-3)
print(t1 - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'torch' in sys.modules)
"""


WEB_STREAMS = 16  # the dashboard's cost is measured with this many real-time streams


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest of `repeats` runs, in seconds: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _running(folder: Path, text: str) -> tuple[Pipeline, StoreWriter]:
    config = parse_config(text, "bench", folder)
    # Random noise is far from any machine: every stream raises events; their log lines are not news.
    logging.getLogger("anomalyd").setLevel(logging.CRITICAL)
    store = StoreWriter(config.storage)
    store.start()
    pipeline = Pipeline(store)
    pipeline.start(config)
    return pipeline, store


def pipeline_throughput(bundle: Path, streams: int, seconds: float) -> tuple[float, float]:
    """Seconds of audio the daemon's pipeline processes per wall-clock second and per CPU-second of this
    process (all its threads), over `streams` replays taken as fast as it can."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = replays(folder, bundle, streams, seconds, realtime=False, loop=False)
        started, cpu = time.perf_counter(), time.process_time()
        pipeline, store = _running(folder, text)
        while not pipeline.all_ended():
            time.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        pipeline.stop()
        store.stop(5.0)
    audio = streams * seconds
    return audio / elapsed, audio / cpu


def stop_under_load(bundle: Path, streams: int = 256) -> tuple[float, int]:
    """(seconds, blocks discarded) to stop with `streams` fast replays and a full queue."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline, store = _running(folder, replays(folder, bundle, streams, 10.0, realtime=False, loop=True))
        time.sleep(5.0)
        started = time.perf_counter()
        pipeline.stop(2.0)
        store.stop(2.0)
        return time.perf_counter() - started, pipeline.blocks_discarded


def lag_under_overload(bundle: Path, streams: int, seconds: float = 20.0) -> tuple[float, int]:
    """(largest lag in seconds, streams flagged lagging) after `seconds` of `streams` real-time replays."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = replays(folder, bundle, streams, 30.0, realtime=True, loop=True)
        pipeline, store = _running(folder, text)
        time.sleep(seconds)
        assert pipeline.config is not None
        snapshot = take_snapshot(
            pipeline.streams(), now=utc_now(), max_lag_seconds=pipeline.config.inference.max_lag_seconds,
            windows_scored=pipeline.windows_scored, blocks_dropped=pipeline.blocks_dropped,
            storage=store.status(), mqtt=None,
        )  # fmt: skip
        pipeline.stop(2.0)
        store.stop(2.0)
    lags = [s.lag_seconds for s in snapshot.streams if s.lag_seconds is not None]
    return max(lags, default=0.0), len(snapshot.lagging)


def _textbook(bundle: Path) -> float | None:
    """CPU seconds per window of the textbook pipeline, or None without the train extra (torch)."""
    try:
        from training.textbook import cpu_seconds_per_window  # noqa: PLC0415  (torch: benchmark only)
    except ImportError:
        return None
    return cpu_seconds_per_window(bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomalyd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length per stream and clip")
    parser.add_argument("--streams", type=int, default=8, help="replayed streams for the pipeline timing")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    scorer = ClipScorer.from_bundle(bundle, threads=1)
    p, g = bundle.meta.features, bundle.meta.window
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(args.seconds * p.sample_rate))).astype(np.float32)

    feature_s = best_of(lambda: scorer.logmel(audio)) / args.seconds  # per second of audio
    tiles = rng.standard_normal((64, p.n_mels, g.model_frames)).astype(np.float32)
    single_s = best_of(lambda: scorer.autoencoder.reconstruct(tiles[:1]), 20)
    batch_s = best_of(lambda: scorer.autoencoder.reconstruct(tiles)) / len(tiles)
    tiles_per_audio_s = p.sample_rate / (g.tile_hop * p.hop_length)
    per_stream_s = feature_s + tiles_per_audio_s * batch_s  # CPU seconds per second of one stream

    probe = subprocess.run(
        [sys.executable, "-c", _STARTUP_PROBE, str(args.bundle)], capture_output=True, text=True, check=True
    )
    startup_s, rss_mb, torch_loaded = probe.stdout.split()
    throughput, per_cpu = pipeline_throughput(args.bundle, args.streams, args.seconds)
    pipeline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    limit = limits(bundle)
    textbook_s = _textbook(args.bundle)  # after the RSS reading: it loads torch and librosa
    naive = 1 / (textbook_s * limit.windows_per_audio_second) if textbook_s else None
    stop_s, discarded = stop_under_load(args.bundle)
    overload = min(512, max(16, int(1.5 * throughput)))
    max_lag, lagging = lag_under_overload(args.bundle, overload)
    web_off, web_on = web_cost(args.bundle, WEB_STREAMS)

    rows = [
        ("log-mel, per second of audio", f"{feature_s * 1e3:.3f} ms"),
        (f"inference, 1 model input of {g.model_frames} frames (batch 1)", f"{single_s * 1e3:.3f} ms"),
        ("inference, per model input in batches of 64", f"{batch_s * 1e3:.3f} ms"),
        ("model inputs per second of audio per stream", f"{tiles_per_audio_s:.2f}"),
        ("streams per core in real time", f"{1 / per_stream_s:.0f}"),
        ("start-up: import + load bundle", f"{float(startup_s):.2f} s"),
        ("peak RSS scoring a 10 s clip", f"{float(rss_mb):.0f} MB"),
        ("torch imported by the runtime", torch_loaded),
        (f"pipeline ({args.streams} replays): audio seconds per second", f"{throughput:.0f}"),
        (f"pipeline ({args.streams} replays): audio seconds per CPU-second", f"{per_cpu:.0f}"),
        ("peak RSS of the benchmark with the pipeline", f"{pipeline_rss:.0f} MB"),
        ("textbook (librosa + torch per window, batch 1): per window",
         f"{textbook_s * 1e3:.3f} ms" if textbook_s else "- (needs the train extra)"),
        ("textbook: real-time streams per core", f"{naive:.0f}" if naive else "-"),
        ("pipeline over textbook (per CPU-second)", f"{per_cpu / naive:.1f} x" if naive else "-"),
        ("model per window; single-core float32 matmul peak",
         f"{limit.flops_per_window / 1e6:.1f} MFLOP; {limit.peak_gflops:.0f} GFLOP/s"),
        ("limit, every overlapping window reconstructed: streams/core", f"{limit.every_window:.0f}"),
        ("limit, each frame reconstructed once: streams/core", f"{limit.frame_once:.0f}"),
        ("stop with 256 fast streams and a full queue", f"{stop_s:.2f} s ({discarded} blocks discarded)"),
        (f"lag after 20 s of {overload} real-time streams", f"{max_lag:.1f} s ({lagging} flagged lagging)"),
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
            "streams_per_core": per_cpu,
            "speedup_vs_naive": per_cpu / naive if naive else None,
            "naive_streams_per_core": naive,
            "limit_streams_per_core": limit.frame_once,
            "limit_every_window_streams_per_core": limit.every_window,
            "limit_fraction": per_cpu / limit.frame_once,
            "flops_per_window": limit.flops_per_window,
            "matmul_peak_gflops": limit.peak_gflops,
            "rss_mb_16_streams": web_off.rss_mb,
            "web_rss_mb": web_on.rss_mb - web_off.rss_mb,
            "startup_s": float(startup_s),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    width = max(len(name) for name, _ in rows)
    print(f"model {bundle.meta.model_id}, 1 thread")
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  ----------")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
