"""The detector's rules on hand-made score sequences."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalyd.config import DetectorConfig, parse_config
from anomalyd.detector import Detector, Phase, Transition, WindowScore
from anomalyd.stream import Model, StreamRuntime

RATE = 16_000
HOP = 8192  # samples between windows (16 frames of 512)
LENGTH = 33_280  # samples per window (64 frames)


def run(scores: list[float], **settings: float) -> list[tuple[int, Transition]]:
    config = DetectorConfig(**{"cooldown_seconds": 0.0, "update_seconds": 1000.0, **settings})  # type: ignore[arg-type]
    detector = Detector(config, threshold=1.0, sample_rate=RATE)
    out = []
    for i, score in enumerate(scores):
        for t in detector.push(WindowScore(i, i * HOP, i * HOP + LENGTH, score)):
            out.append((i, t))
    return out


def test_n_of_m_opens_at_the_first_over_window() -> None:
    transitions = run([0, 2, 0, 2, 0, 2, 2, 2], n=3, m=5)
    (at, start), = transitions  # fmt: skip
    assert at == 5  # windows 1, 3, 5 are the first three over within five
    assert start.phase == Phase.START
    assert start.start_sample == 1 * HOP
    assert start.windows_over == 3
    assert start.peak_score == 2


def test_isolated_spikes_never_open() -> None:
    assert run([2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0], n=2, m=3) == []


def test_hold_off_closes_and_end_is_the_last_over_window() -> None:
    transitions = run([2, 2, 2, 3, 0, 2, 0, 0, 0, 0, 0], n=3, m=3, hold_off_windows=4)
    phases = [(i, t.phase) for i, t in transitions]
    assert phases == [(2, Phase.START), (9, Phase.END)]
    end = transitions[1][1]
    assert end.end_sample == 5 * HOP + LENGTH  # window 5 was the last one over
    assert end.reason == "recovered"
    assert end.peak_score == 3
    assert end.windows == 10  # windows 0..9
    assert end.windows_over == 5
    assert end.mean_score == sum([2, 2, 2, 3, 0, 2, 0, 0, 0, 0]) / 10


def test_cooldown_keeps_a_second_event_from_opening_too_soon() -> None:
    scores = [2, 2, 0, 0] + [2] * 6
    hop_s = HOP / RATE
    quick = run(scores, n=2, m=2, hold_off_windows=2, cooldown_seconds=0.0)
    slow = run(scores, n=2, m=2, hold_off_windows=2, cooldown_seconds=4 * hop_s)
    assert [t.phase for _, t in quick] == [Phase.START, Phase.END, Phase.START]
    assert [(i, t.phase) for i, t in slow] == [(1, Phase.START), (3, Phase.END), (7, Phase.START)]


def test_updates_while_open() -> None:
    transitions = run([2] * 12, n=1, m=1, update_seconds=2 * HOP / RATE)
    phases = [t.phase for _, t in transitions]
    assert phases[0] == Phase.START
    assert phases.count(Phase.UPDATE) == 5  # every second window after the start


def test_forced_close_reports_its_reason() -> None:
    config = DetectorConfig(n=1, m=1)
    detector = Detector(config, threshold=1.0, sample_rate=RATE)
    assert detector.close(100, "shutdown") == []
    detector.push(WindowScore(0, 0, LENGTH, 5.0))
    assert detector.is_open
    (end,) = detector.close(LENGTH, "shutdown")
    assert (end.phase, end.reason) == (Phase.END, "shutdown")
    assert not detector.is_open


@pytest.mark.slow
def test_stream_threshold_from_bundle_k_override_or_absolute(bundle_dir: Path, tmp_path: Path) -> None:
    model = Model.load(bundle_dir, threads=1)
    stats = model.bundle.meta.threshold.window_scores
    base = 'name = "s"\nbundle = "b"\n[streams.source]\ntype = "file"\npath = "x.wav"\n'

    def runtime(detector: str) -> StreamRuntime:
        config = parse_config(f"[[streams]]\n{base}[streams.detector]\n{detector}\n", "t", tmp_path)
        return StreamRuntime(config.streams[0], model, "n", config.health, config.storage.clips)

    default = runtime("")
    assert default.k == model.bundle.meta.threshold.k == 3.0
    assert default.threshold == pytest.approx(stats.mean + 3.0 * stats.std)
    assert runtime("k = 5.0").threshold == pytest.approx(stats.mean + 5.0 * stats.std)
    absolute = runtime("threshold = 0.5\nk = 5.0")
    assert (absolute.threshold, absolute.k) == (0.5, None)
    assert absolute.detector.threshold == 0.5
