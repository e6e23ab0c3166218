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
from anomalyd.streaming import Resampler, Step, StreamingWindows
from anomalyd.tiles import TileStore, reconstruct_into, score_windows
from anomalyd.windows import Normalisation, WindowGeometry, slice_windows
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


def stream_steps(streamer: StreamingWindows, samples: np.ndarray, seed: int = 0) -> Step:
    steps = [streamer.push(block) for block in chunks(samples, seed)]
    return Step([t for s in steps for t in s.tiles], [w for s in steps for w in s.windows])


@pytest.mark.parametrize("tile_frames", [16, 0])
def test_streamed_tiles_and_windows_equal_offline_ones_on_real_audio(tile_frames: int) -> None:
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    geometry = WindowGeometry(tile_frames=tile_frames)
    audio = load_audio(MIMII / "normal" / "00000001.wav", 16_000)
    frames = logmel(audio)
    norm = Normalisation(np.zeros(128, np.float32), np.ones(128, np.float32), "window_power")
    offline = norm.apply(
        np.ascontiguousarray(slice_windows(frames, geometry.model_frames, geometry.tile_hop))
    )
    streamed = stream_steps(StreamingWindows(logmel, geometry), audio)
    assert len(streamed.windows) == geometry.n_windows(frames.shape[1]) == 16
    assert len(streamed.tiles) == len(offline) == (frames.shape[1] // 16 if tile_frames else 16)
    # Levelled and normalised as the worker does it: in a batch of several streams' tiles.
    normalised = norm.apply(np.stack([tile.values for tile in streamed.tiles]))
    for i, tile in enumerate(streamed.tiles):
        assert tile.index == i
        np.testing.assert_allclose(normalised[i], offline[i], atol=1e-4)
    for i, window in enumerate(streamed.windows):
        assert window.index == i
        assert window.start_sample == i * geometry.hop_frames * params.hop_length
        assert window.end_sample - window.start_sample == params.n_samples(geometry.n_frames)
        # A window's tiles have all come out by the time it does.
        assert geometry.first_tile(i) + geometry.tiles_per_window <= len(streamed.tiles)


def test_streamed_frames_and_levels_equal_offline_ones_to_the_bit() -> None:
    """However the audio is cut into blocks, the frames are those of the whole clip, and the windows'
    levels are the same."""
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    geometry = WindowGeometry(tile_frames=16)
    audio = load_audio(MIMII / "normal" / "00000001.wav", 16_000)
    audio[50_000:60_000] = 0.0  # digital silence, for the quietest hops
    frames = logmel(audio)
    runs = [stream_steps(StreamingWindows(logmel, geometry), audio, seed) for seed in (1, 2)]
    for run in runs:
        streamed = np.concatenate([tile.values for tile in run.tiles], axis=1)
        np.testing.assert_array_equal(streamed, frames[:, : streamed.shape[1]])
    assert runs[0].windows == runs[1].windows
    assert min(w.quietest_dbfs for w in runs[0].windows) < -150


def test_window_level_reports_silence() -> None:
    params = FeatureParams()
    logmel = LogMel(params, make_filterbank(params))
    streamer = StreamingWindows(logmel, WindowGeometry())
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 16_000).astype(np.float32)
    windows = streamer.push(np.concatenate([tone, np.zeros(48_000, np.float32)])).windows
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
    """Scores through the streaming path (resampling included, tiles reconstructed as they come, in the
    daemon's batches) match the offline scorer's, which reconstructs all tiles of the clip at once."""
    bundle = load_bundle(bundle_dir)
    scorer = ClipScorer.from_bundle(bundle)
    source = sorted((synth_test / "anomaly").glob("bearing_*.wav"))[0]
    samples, _ = read_audio(source)
    path = tmp_path / f"clip{rate}.wav"
    sf.write(path, Resampler(16_000, rate)(samples, last=True), rate, subtype="FLOAT")

    file_samples, file_rate = read_audio(path)
    offline = scorer.score_samples(Resampler(file_rate, 16_000)(file_samples, last=True)).window_errors
    np.testing.assert_allclose(scorer.score_file(path).window_errors, offline, rtol=1e-4, atol=1e-6)
    resampler = Resampler(file_rate, 16_000)
    streamer = StreamingWindows(scorer.logmel, bundle.meta.window)
    store = TileStore(bundle.meta.window)
    streamed = []
    for i, block in enumerate(chunks(file_samples, seed=rate)):
        last = i == len(chunks(file_samples, seed=rate)) - 1
        step = streamer.push(resampler(block, last=last))
        stores = [(store, t) for t in step.tiles]
        reconstruct_into(scorer.autoencoder, bundle.meta.window, bundle.meta.normalisation, stores, 3)
        streamed += list(
            score_windows(bundle.meta.window, bundle.meta.residual, [(store, w) for w in step.windows])
        )
    assert bundle.meta.window.tile_frames == 16
    assert len(streamed) == len(offline)
    np.testing.assert_allclose(streamed, offline, rtol=1e-4, atol=1e-6)
