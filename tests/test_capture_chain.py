"""What a plant's capture chain changes must not change a verdict: microphone gain and sample-rate conversion.

A levelled bundle sees each window's spectral shape, not its level, so a chain a few dB quieter or louder
scores the same; its filterbank stops inside the resampler's passband, so a 44.1 or 48 kHz microphone
scores as the 16 kHz training audio did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soxr

from anomalyd.audio import load_audio
from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer
from anomalyd.windows import Normalisation, level_windows, window_level_db
from training import robustness

SOXR_PASSBAND = 0.913  # soxr's passband end, as a share of Nyquist


def test_window_level_is_the_power_level_in_db() -> None:
    rng = np.random.default_rng(0)
    constant = np.full((1, 128, 64), -31.5, dtype=np.float32)
    assert window_level_db(constant)[0] == pytest.approx(-31.5, abs=1e-4)
    # Half the values 10 dB above the rest: the power mean, not the mean of decibels.
    halves = np.concatenate([np.full((1, 64, 64), -40.0), np.full((1, 64, 64), -30.0)], axis=1)
    expected = 10 * np.log10((10**-4 + 10**-3) / 2)
    assert window_level_db(halves.astype(np.float32))[0] == pytest.approx(expected, abs=1e-4)
    # Very loud and very quiet windows (the log-mel floor is -100 dB) stay finite.
    extremes = rng.uniform(-100, 200, size=(3, 128, 64)).astype(np.float32)
    assert np.all(np.isfinite(window_level_db(extremes)))


@pytest.mark.parametrize("gain_db", [-20.0, -6.0, -3.0, 3.0, 6.0])
def test_levelled_windows_do_not_see_a_gain(gain_db: float) -> None:
    rng = np.random.default_rng(1)
    windows = rng.normal(-40, 6, size=(5, 128, 64)).astype(np.float32)
    norm = Normalisation(np.zeros(128, np.float32), np.full(128, 4.0, np.float32), "window_power")
    np.testing.assert_allclose(norm.apply(windows + gain_db), norm.apply(windows), atol=1e-4)
    unlevelled = Normalisation(norm.mean, norm.std, "none")
    assert np.abs(unlevelled.apply(windows + gain_db) - unlevelled.apply(windows)).max() > 0.5
    np.testing.assert_array_equal(level_windows(windows, "none"), windows)


@pytest.mark.slow
def test_trained_bundle_is_levelled_and_inside_the_passband(bundle_dir: Path) -> None:
    meta = load_bundle(bundle_dir).meta
    assert meta.normalisation.levelling == "window_power"
    assert meta.features.fmax <= SOXR_PASSBAND * meta.features.sample_rate / 2


@pytest.mark.slow
@pytest.mark.parametrize("gain_db", [-6.0, -3.0, 3.0, 6.0])
def test_a_gain_does_not_change_a_clip_score(bundle_dir: Path, synth_test: Path, gain_db: float) -> None:
    scorer = ClipScorer.from_bundle(load_bundle(bundle_dir))
    for path in sorted((synth_test / "normal").glob("*.wav"))[:3]:
        samples = load_audio(path, 16_000)
        as_recorded = scorer.score_samples(samples).score
        changed = scorer.score_samples(samples * np.float32(10 ** (gain_db / 20))).score
        assert changed == pytest.approx(as_recorded, rel=1e-3), path.name


@pytest.mark.slow
@pytest.mark.parametrize("via", [44_100, 48_000])
def test_a_rate_round_trip_does_not_change_a_clip_score(bundle_dir: Path, synth_test: Path, via: int) -> None:
    bundle = load_bundle(bundle_dir)
    scorer = ClipScorer.from_bundle(bundle)
    for path in sorted((synth_test / "normal").glob("*.wav"))[:3]:
        samples = load_audio(path, 16_000)
        trip = soxr.resample(soxr.resample(samples, 16_000, via, quality="HQ"), via, 16_000, quality="HQ")
        as_recorded = scorer.score_samples(samples).score
        changed = scorer.score_samples(np.asarray(trip, dtype=np.float32)[: len(samples)]).score
        # Only the resampler's own ripple and its first and last milliseconds remain.
        assert changed == pytest.approx(as_recorded, rel=0.05), (path.name, as_recorded, changed)
        assert changed < bundle.meta.threshold.value or as_recorded >= bundle.meta.threshold.value


@pytest.mark.slow
def test_robustness_table_on_a_trained_bundle(bundle_dir: Path, synth_test: Path, tmp_path: Path) -> None:
    normal, anomaly = tmp_path / "normal", tmp_path / "anomaly"
    normal.mkdir()
    anomaly.mkdir()
    for path in sorted((synth_test / "normal").glob("*.wav"))[:6]:
        (normal / path.name).symlink_to(path)
    for path in sorted((synth_test / "anomaly").glob("bearing_*.wav"))[:3]:
        (anomaly / path.name).symlink_to(path)
    rows = robustness.robustness(load_bundle(bundle_dir), normal, anomaly)
    assert [r.condition for r in rows] == list(robustness.CONDITIONS)
    by_name = {r.condition: r for r in rows}
    reference = by_name["as recorded"]
    for name in ("-3 dB", "+3 dB", "16 -> 44.1 -> 16 kHz", "16 -> 48 -> 16 kHz"):
        assert by_name[name].quiet_share == reference.quiet_share, name
        assert by_name[name].auc == pytest.approx(reference.auc, abs=0.05), name
    table = robustness.table([rows])
    assert "| +3 dB |" in table
    assert "| 16 -> 48 -> 16 kHz |" in table
