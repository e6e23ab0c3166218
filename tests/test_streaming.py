"""Streaming equals offline: blocks of any size give the windows and scores `anomalyd score` computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from anomalyd.audio import load_audio, read_audio
from anomalyd.bundle import load_bundle
from anomalyd.features import FeatureParams, LogMel
from anomalyd.scoring import ClipScorer
from anomalyd.streaming import Resampler, StreamingWindows
from anomalyd.windows import Normalisation, WindowGeometry, slice_windows, window_errors
from tests.conftest import MIMII
from training.dataset import make_filterbank


def chunks(samples: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(samples):
        n = int(rng.integers(1, 6000))
        out.append(samples[i : i + n])
        i += n
    return out


def stream_windows(streamer: StreamingWindows, samples: np.ndarray, seed: int = 0) -> list:  # type: ignore[type-arg]
    return [w for block in chunks(samples, seed) for w in streamer.push(block)]


def test_streamed_windows_equal_offline_windows_on_real_audio() -> None:
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    geometry = WindowGeometry()
    audio = load_audio(MIMII / "normal" / "00000001.wav", 16_000)
    offline = slice_windows(logmel(audio), geometry.n_frames, geometry.hop_frames)
    norm = Normalisation(np.zeros(128, np.float32), np.ones(128, np.float32))
    streamed = stream_windows(StreamingWindows(logmel, geometry, norm), audio)
    assert len(streamed) == len(offline) == 16
    for i, window in enumerate(streamed):
        assert window.index == i
        assert window.start_sample == i * geometry.hop_frames * params.hop_length
        assert window.end_sample - window.start_sample == params.n_samples(geometry.n_frames)
        np.testing.assert_allclose(window.values, offline[i], atol=1e-4)


def test_window_level_reports_silence() -> None:
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    norm = Normalisation(np.zeros(128, np.float32), np.ones(128, np.float32))
    streamer = StreamingWindows(logmel, WindowGeometry(), norm)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 16_000).astype(np.float32)
    windows = streamer.push(np.concatenate([tone, np.zeros(48_000, np.float32)]))
    assert windows[0].level_dbfs == pytest.approx(10 * np.log10(0.125), abs=0.1)  # sine RMS 0.5/sqrt(2)
    assert windows[-1].level_dbfs < -150
    straddling = [w for w in windows if w.start_sample < 48_000 < w.end_sample]
    assert straddling
    for window in straddling:  # loud on average, but holding digital silence
        assert window.level_dbfs > -20
        assert window.quietest_dbfs < -150
    assert windows[0].quietest_dbfs == pytest.approx(windows[0].level_dbfs, abs=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_streamed_scores_equal_anomalyd_score(
    bundle_dir: Path, synth_test: Path, tmp_path: Path, rate: int
) -> None:
    """Scores through the streaming path (resampling included) match the offline scorer window by window."""
    bundle = load_bundle(bundle_dir)
    scorer = ClipScorer.from_bundle(bundle)
    source = sorted((synth_test / "anomaly").glob("bearing_*.wav"))[0]
    samples, _ = read_audio(source)
    path = tmp_path / f"clip{rate}.wav"
    sf.write(path, Resampler(16_000, rate)(samples, last=True), rate, subtype="FLOAT")

    offline = scorer.score_file(path).window_errors
    file_samples, file_rate = read_audio(path)
    resampler = Resampler(file_rate, 16_000)
    streamer = StreamingWindows(scorer.logmel, bundle.meta.window, bundle.meta.normalisation)
    windows = []
    for i, block in enumerate(chunks(file_samples, seed=rate)):
        last = i == len(chunks(file_samples, seed=rate)) - 1
        windows += streamer.push(resampler(block, last=last))
    values = np.stack([w.values for w in windows])
    streamed = window_errors(
        values, scorer.autoencoder.reconstruct(values), bundle.meta.window.pool_frames, bundle.meta.residual
    )
    assert len(streamed) == len(offline)
    np.testing.assert_allclose(streamed, offline, rtol=1e-4, atol=1e-6)
