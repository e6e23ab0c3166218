"""The benchmark's own harness works (its figures are not tested: speed is measured, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalyd.bench_pipeline import latency, throughput

pytestmark = pytest.mark.slow


def test_the_pipeline_sweep_gets_through_every_replay(bundle_dir: Path) -> None:
    result = throughput(bundle_dir, streams=3, seconds=5.0)
    assert result.streams == 3
    assert result.audio_per_second > 0
    assert result.audio_per_cpu_second > 0


def test_independent_microphones_feed_every_stream_and_windows_get_latencies(bundle_dir: Path) -> None:
    measured = latency(bundle_dir, streams=4, seconds=3.0)
    # Four streams for 3 s: about 1.95 windows a second each, all timed.
    assert 16 <= measured.windows <= 32
    assert 0 < measured.p50_ms <= measured.p99_ms < 1.0e3
    assert measured.streams_per_core > 0
