"""Features: numpy log-mel held to librosa on real audio; windows and scores on known arrays."""

from __future__ import annotations

import itertools

import librosa
import numpy as np
import pytest

from anomalyd.audio import load_audio
from anomalyd.features import FeatureParams, LogMel
from anomalyd.residual import VAR_FLOOR, ResidualStats
from anomalyd.tiles import TileStore, pool_windows, score_pooled, tile_residuals, window_blocks
from anomalyd.windows import Normalisation, WindowGeometry, slice_windows
from tests.conftest import MIMII
from training.dataset import make_filterbank


@pytest.fixture(scope="module")
def logmel() -> LogMel:
    params = FeatureParams()
    return LogMel(params, make_filterbank(params))


@pytest.mark.parametrize("clip", ["normal/00000000.wav", "anomaly/00000001.wav"])
def test_logmel_matches_librosa_on_real_mimii_clip(logmel: LogMel, clip: str) -> None:
    p = logmel.params
    y = load_audio(MIMII / clip, p.sample_rate)
    ours = logmel(y)
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=p.sample_rate,
        n_fft=p.n_fft,
        hop_length=p.hop_length,
        n_mels=p.n_mels,
        power=2.0,
        center=False,
        fmax=p.fmax,
    )
    reference = librosa.power_to_db(mel, ref=1.0, amin=p.amin, top_db=None)
    assert ours.shape == reference.shape == (128, 311)
    assert np.max(np.abs(ours - reference)) < 1e-3  # dB


def test_frames_are_independent_of_what_follows(logmel: LogMel) -> None:
    """No centre padding: the log-mel of a prefix is a prefix of the log-mel (streaming == offline)."""
    y = load_audio(MIMII / "normal" / "00000002.wav", 16_000)
    whole = logmel(y)
    part = logmel(y[: 16_000 * 3 + 123])
    np.testing.assert_array_equal(whole[:, : part.shape[1]], part)


def test_frames_are_independent_of_the_other_frames_of_the_call(logmel: LogMel) -> None:
    """Streaming frames a few frames at a time: any split at frame boundaries gives, to the bit, the
    log-mel of the whole."""
    p = logmel.params
    y = load_audio(MIMII / "normal" / "00000002.wav", 16_000)
    whole = logmel(y)
    rng = np.random.default_rng(0)
    for _ in range(10):
        cuts = np.sort(rng.choice(np.arange(1, whole.shape[1]), size=int(rng.integers(1, 40)), replace=False))
        edges = [0, *cuts.tolist(), whole.shape[1]]
        pieces = [logmel(y[a * p.hop_length : p.n_samples(b)]) for a, b in itertools.pairwise(edges)]
        np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
    one_by_one = [logmel(y[t * p.hop_length : p.n_samples(t + 1)]) for t in range(whole.shape[1])]
    np.testing.assert_array_equal(np.concatenate(one_by_one, axis=1), whole)


def test_frame_count() -> None:
    p = FeatureParams()
    assert p.n_frames(1023) == 0
    assert p.n_frames(1024) == 1
    assert p.n_frames(1024 + 511) == 1
    assert p.n_frames(1024 + 512) == 2
    assert p.n_frames(160_000) == 311
    assert p.n_frames(p.n_samples(64)) == 64
    assert p.n_frames(p.n_samples(64) - 1) == 63


def test_short_audio_gives_no_frames(logmel: LogMel) -> None:
    assert logmel(np.zeros(100, dtype=np.float32)).shape == (128, 0)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"power": 1.0}, "power must be 2.0"),
        ({"center": True}, "center=true is not supported"),
        ({"fmax": 9000.0}, "fmax <= sample_rate/2"),
        ({"window": "hamming"}, "window must be 'hann'"),
        ({"n_fft": 0}, "must be positive"),
    ],
)
def test_unsupported_parameters_are_named(change: dict[str, object], problem: str) -> None:
    params = FeatureParams(**change)  # type: ignore[arg-type]
    assert any(problem in p for p in params.problems())
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        LogMel(params, np.zeros((128, 513), dtype=np.float32))


def test_filterbank_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \(64, 513\), parameters need \(128, 513\)"):
        LogMel(FeatureParams(), np.zeros((64, 513), dtype=np.float32))


def test_unknown_feature_keys_are_rejected() -> None:
    with pytest.raises(KeyError, match="hop_size"):
        FeatureParams.from_dict({**FeatureParams().to_dict(), "hop_size": 256})


def test_windows_and_geometry() -> None:
    logmel = np.arange(4 * 100, dtype=np.float32).reshape(4, 100)
    windows = slice_windows(logmel, n_frames=64, hop_frames=16)
    assert windows.shape == (WindowGeometry().n_windows(100), 4, 64) == (3, 4, 64)
    np.testing.assert_array_equal(windows[2], logmel[:, 32:96])
    assert slice_windows(logmel[:, :10], 64, 16).shape == (0, 4, 64)


def pool_residual(x: np.ndarray, recon: np.ndarray, pool: int) -> np.ndarray:
    """Whole windows reconstructed as one tile each (formats 1-3): their pooled residuals."""
    geometry = WindowGeometry(x.shape[2], 16, pool, 0)
    return pool_windows(tile_residuals(x, recon, geometry), geometry)


def window_errors(
    x: np.ndarray, recon: np.ndarray, pool_frames: int, stats: ResidualStats | None = None
) -> np.ndarray:
    return score_pooled(pool_residual(x, recon, pool_frames), stats)


@pytest.mark.parametrize(("tile", "pool"), [(16, 64), (16, 16), (16, 8), (32, 64), (8, 24), (64, 64)])
def test_windows_pooled_from_tiles_equal_windows_pooled_whole(tile: int, pool: int) -> None:
    """Each frame reconstructed once, in tiles: a window's pooled residual is exactly what pooling its
    frames' residuals in one piece gives, for any tile and pool size that fit the window."""
    n_frames = 192 if pool == 24 else 64
    geometry = WindowGeometry(n_frames, 64 if tile != 8 else 48, pool, tile)
    assert not geometry.problems()
    rng = np.random.default_rng(tile + pool)
    total = 640
    frames = rng.standard_normal((8, total)).astype(np.float32)
    recon = frames + rng.standard_normal((8, total)).astype(np.float32)
    tiles = slice_windows(frames, tile, tile)
    tile_blocks = tile_residuals(
        np.ascontiguousarray(tiles), np.ascontiguousarray(slice_windows(recon, tile, tile)), geometry
    )
    n_windows = geometry.n_windows(total)
    firsts = np.array([geometry.first_tile(w) for w in range(n_windows)], dtype=np.int64)
    from_tiles = pool_windows(window_blocks(tile_blocks, firsts, geometry), geometry)
    whole = slice_windows(frames, n_frames, geometry.hop_frames)
    rebuilt = slice_windows(recon, n_frames, geometry.hop_frames)
    np.testing.assert_allclose(from_tiles, pool_residual(whole, rebuilt, pool), atol=1e-5)
    # A stream's store gives the same, window by window, and keeps no tile that no later window needs.
    store = TileStore(geometry)
    for index, blocks in enumerate(tile_blocks):
        store.add(index, blocks)
    for w in range(n_windows):
        blocks = store.window(w)[None]
        np.testing.assert_allclose(pool_windows(blocks, geometry)[0], from_tiles[w], atol=1e-6)
    assert len(store) == len(tile_blocks) - geometry.first_tile(n_windows)


def test_tile_geometry_problems_name_the_sizes() -> None:
    assert not WindowGeometry(tile_frames=16).problems()
    assert WindowGeometry(tile_frames=16).model_frames == 16
    assert WindowGeometry(tile_frames=16).tiles_per_window == 4
    assert WindowGeometry().model_frames == 64
    assert WindowGeometry().tile_hop == 16
    assert "tile_frames must divide" in WindowGeometry(64, 16, 64, 32).problems()[0]
    assert "tile_frames must divide" in WindowGeometry(64, 24, 64, 16).problems()[0]
    assert "pool_frames divide n_frames" in WindowGeometry(64, 16, 48, 16).problems()[0]


def test_window_errors_pool_one_is_mse_and_pooling_cancels_zero_mean_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8, 64)).astype(np.float32)
    noise = rng.choice([-1.0, 1.0], size=(5, 8, 64)).astype(np.float32)
    np.testing.assert_allclose(window_errors(x, x + noise, pool_frames=1), 1.0, rtol=1e-6)
    # Alternating +1/-1 along time: plain error 1, pooled over 2 frames exactly 0.
    alternating = np.tile(np.array([1.0, -1.0], dtype=np.float32), (5, 8, 32))
    np.testing.assert_allclose(window_errors(x, x + alternating, pool_frames=2), 0.0, atol=1e-12)
    # A steady offset survives pooling unchanged.
    np.testing.assert_allclose(window_errors(x, x + 0.5, pool_frames=16), 0.25, rtol=1e-6)


def test_residual_statistics_weigh_each_band_by_its_spread_on_normal_windows() -> None:
    rng = np.random.default_rng(0)
    spread = np.linspace(0.3, 2.0, 8)  # band 0 rebuilt closely on normal sound, band 7 loosely
    pooled = (rng.standard_normal((500, 8, 4)) * spread[None, :, None] + 0.3).astype(np.float32)
    stats = ResidualStats.fit([pooled[:200], pooled[200:]])  # batch by batch, as training feeds it
    flat = np.moveaxis(pooled, 1, -1).reshape(-1, 8).astype(np.float64)
    assert stats.n_blocks == 2000
    np.testing.assert_allclose(stats.mean, flat.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(stats.var, flat.var(axis=0, ddof=1), rtol=1e-4)
    # Normal windows score about 1 on average, whatever the bands' spreads.
    assert stats.score(pooled).mean() == pytest.approx(1.0, rel=1e-2)
    # The same shift is news in a tight band and hardly in a loose one.
    shifted = np.repeat(stats.mean[None, :, None], 2, axis=0)
    shifted[0, 0] += 1.0
    shifted[1, 7] += 1.0
    tight, loose = stats.score(shifted)
    assert tight == pytest.approx(1 / (8 * stats.var[0]), rel=1e-4)
    assert tight > 20 * loose
    # The score with the statistics is that score of the pooled residual.
    x = rng.standard_normal((3, 8, 64)).astype(np.float32)
    recon = x + rng.standard_normal((3, 8, 64)).astype(np.float32)
    np.testing.assert_allclose(
        window_errors(x, recon, 16, stats), stats.score(pool_residual(x, recon, 16)), rtol=1e-6
    )


def test_a_band_rebuilt_exactly_cannot_weigh_without_bound() -> None:
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((100, 8, 1)).astype(np.float32)
    pooled[:, 3] = 0.25  # the model rebuilds band 3 of every training window exactly
    stats = ResidualStats.fit([pooled])
    others = np.median(np.delete(stats.var, 3))
    assert VAR_FLOOR * others * 0.5 < stats.var[3] <= VAR_FLOOR * float(np.median(stats.var)) * 1.0001
    silent = ResidualStats.fit([np.zeros((10, 8, 1), np.float32)])  # rebuilt exactly everywhere
    assert np.all(silent.var > 0)
    assert np.all(np.isfinite(silent.score(np.ones((1, 8, 1), np.float32))))
    with pytest.raises(ValueError, match="at least 2 pooled residual blocks, got 1"):
        ResidualStats.fit([pooled[:1]])


def test_normalisation_round_trip() -> None:
    rng = np.random.default_rng(1)
    logmels = [rng.normal(-40, 5, size=(4, 50)).astype(np.float32) for _ in range(3)]
    norm = Normalisation.fit(logmels)
    normalised = norm.apply(np.stack([m[:, :16] for m in logmels]))
    assert normalised.dtype == np.float32
    again = Normalisation.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)
    all_frames = np.concatenate(logmels, axis=1)
    np.testing.assert_allclose(norm.mean, all_frames.mean(axis=1), rtol=1e-5)
