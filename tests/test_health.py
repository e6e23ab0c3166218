"""Source health from captured audio: silence, clipping, and what the source itself reports."""

from __future__ import annotations

import numpy as np

from anomalyd.config import HealthConfig
from anomalyd.health import FULL_SCALE, HealthMonitor, count_clipped, sanitise
from anomalyd.records import SourceState

RATE = 16_000


def feed(monitor: HealthMonitor, samples: np.ndarray, block: int = 1600) -> list[SourceState]:
    changes = []
    for i in range(0, len(samples), block):
        change = monitor.observe(samples[i : i + block].astype(np.float32), RATE)
        if change:
            changes.append(change[0])
    return changes


def noise(seconds: float, level: float) -> np.ndarray:
    return level * np.random.default_rng(0).standard_normal(int(seconds * RATE))


def test_a_dead_microphone_is_silent_at_once_dead_after_silence_seconds_and_ok_when_it_returns() -> None:
    monitor = HealthMonitor(HealthConfig(silence_seconds=3.0, silence_dbfs=-70.0))
    assert feed(monitor, noise(5, 0.05)) == [SourceState.OK]  # -26 dBFS: the first state is always told
    assert feed(monitor, np.zeros(2 * RATE)) == [SourceState.SILENT]  # digital silence: at once
    assert "dropout" in monitor.detail
    assert feed(monitor, np.zeros(2 * RATE)) == [SourceState.SILENT]  # then it is called a dead microphone
    assert "dead or muted" in monitor.detail
    assert feed(monitor, noise(2, 0.05)) == [SourceState.OK]


def test_a_short_dropout_inside_a_second_is_silent_then_ok() -> None:
    monitor = HealthMonitor(HealthConfig())
    audio = noise(4, 0.05)
    audio[int(1.3 * RATE) : int(1.5 * RATE)] = 0.0  # 200 ms of digital silence
    assert feed(monitor, audio) == [SourceState.OK, SourceState.SILENT, SourceState.OK]
    quiet_but_alive = noise(3, 0.001)  # -60 dBFS: a quiet machine, not a dropout
    assert feed(monitor, quiet_but_alive) == []


def test_samples_that_are_not_audio_are_invalid_and_zeroed() -> None:
    block = noise(1, 0.05).astype(np.float32)
    block[[10, 500, 9000]] = [np.nan, np.inf, 1e20]
    clean, count = sanitise(block)
    assert count == 3
    assert np.all(np.isfinite(clean))
    assert clean[10] == clean[500] == clean[9000] == 0.0
    monitor = HealthMonitor(HealthConfig())
    assert monitor.observe(clean, RATE, invalid=count) == (
        SourceState.INVALID,
        "3 sample(s) NaN, infinite or beyond +24 dBFS",
    )
    assert feed(monitor, noise(1, 0.05)) == [SourceState.OK]


def test_clipping() -> None:
    monitor = HealthMonitor(HealthConfig(clipping_fraction=0.01))
    clipped = np.clip(noise(2, 0.5), -1.0, 1.0)  # about 5 % of samples beyond +-1
    assert feed(monitor, clipped) == [SourceState.CLIPPING]  # the first state told is clipping
    assert "at full scale" in monitor.detail
    assert feed(monitor, noise(1, 0.1)) == [SourceState.OK]


def test_loss_is_not_undone_by_audio_still_queued_from_before_it() -> None:
    monitor = HealthMonitor(HealthConfig())
    assert monitor.source_reports(SourceState.LOST, "unplugged") == (SourceState.LOST, "unplugged")
    assert feed(monitor, noise(3, 0.05)) == []
    assert monitor.state == SourceState.LOST
    assert monitor.source_reports(SourceState.OK, "capturing") == (SourceState.OK, "capturing")


def test_the_limits_are_kept_exactly() -> None:
    """+-MAX_ABS_SAMPLE is still audio, a hair beyond is not; FULL_SCALE itself is clipped."""
    block = noise(0.1, 0.05).astype(np.float32)
    block[[3, 4]] = [16.0, -16.0]
    clean, count = sanitise(block)
    assert count == 0
    assert clean is block
    block[5] = np.nextafter(np.float32(16.0), np.float32(np.inf))
    assert sanitise(block)[1] == 1
    assert sanitise(np.empty(0, dtype=np.float32))[1] == 0
    assert count_clipped(block) == 3
    block[[3, 4, 5]] = [FULL_SCALE, -FULL_SCALE, np.nextafter(np.float32(FULL_SCALE), np.float32(0.0))]
    assert count_clipped(block) == 2
    assert count_clipped(np.empty(0, dtype=np.float32)) == 0
