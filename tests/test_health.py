"""Source health from captured audio: silence, clipping, and what the source itself reports."""

from __future__ import annotations

import numpy as np

from anomalyd.config import HealthConfig
from anomalyd.health import HealthMonitor
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


def test_a_dead_microphone_becomes_silent_after_silence_seconds_and_ok_when_it_returns() -> None:
    monitor = HealthMonitor(HealthConfig(silence_seconds=3.0, silence_dbfs=-70.0))
    assert feed(monitor, noise(5, 0.05)) == []  # -26 dBFS: fine, and already ok
    assert feed(monitor, np.zeros(2 * RATE)) == []  # 2 s of silence: not yet
    assert feed(monitor, np.zeros(2 * RATE)) == [SourceState.SILENT]
    assert "dead or muted" in monitor.detail
    assert feed(monitor, noise(2, 0.05)) == [SourceState.OK]


def test_clipping() -> None:
    monitor = HealthMonitor(HealthConfig(clipping_fraction=0.01))
    clipped = np.clip(noise(2, 0.5), -1.0, 1.0)  # about 5 % of samples beyond +-1
    assert feed(monitor, clipped) == [SourceState.CLIPPING]
    assert "at full scale" in monitor.detail
    assert feed(monitor, noise(1, 0.1)) == [SourceState.OK]


def test_loss_is_not_undone_by_audio_still_queued_from_before_it() -> None:
    monitor = HealthMonitor(HealthConfig())
    assert monitor.source_reports(SourceState.LOST, "unplugged") == (SourceState.LOST, "unplugged")
    assert feed(monitor, noise(3, 0.05)) == []
    assert monitor.state == SourceState.LOST
    assert monitor.source_reports(SourceState.OK, "capturing") == (SourceState.OK, "capturing")
