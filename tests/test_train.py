"""Training through the real command: bundle content, reproducibility, bad input, detection quality."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

from anomalyd.audio import list_audio_files
from anomalyd.bundle import load_bundle, sha256_file
from anomalyd.scoring import ClipScorer
from anomalyd.windows import slice_windows
from fixtures.synth import FAULTS
from tests.conftest import SMALL_PRESET
from training import train
from training.model import Architecture, ConvAutoencoder, active_code_share

pytestmark = pytest.mark.slow


def test_bundle_describes_itself(bundle_dir: Path, synth_train: Path) -> None:
    meta = json.loads((bundle_dir / "model.json").read_text())
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "mel_filterbank.npy",
        "model.json",
        "model.onnx",
        "weights.safetensors",
    ]
    assert meta["features"]["sample_rate"] == 16_000
    assert meta["features"]["n_mels"] == 128
    assert meta["window"] == {"n_frames": 64, "hop_frames": 16, "pool_frames": 64, "tile_frames": 16}
    assert meta["normalisation"]["levelling"] == "window_power"
    assert meta["format_version"] == 4
    assert len(meta["normalisation"]["mean"]) == len(meta["normalisation"]["std"]) == 128
    t = meta["threshold"]
    assert t["k"] == 3.0
    assert t["value"] == pytest.approx(t["mean"] + 3.0 * t["std"])
    # 4 s clips are shorter than a block: one block each, so the split is by file.
    files = meta["training"]["files"]
    assert all(f["blocks"] in ("T", "V") for f in files)
    assert t["n_clips"] == meta["training"]["val_blocks"] == sum(f["blocks"] == "V" for f in files) >= 2
    assert meta["export"]["precision"] == "int8"  # the default
    assert meta["export"]["int8_relative_rms_error"] <= 0.1
    assert 0 < meta["training"]["active_code_share"] <= 1  # a live code, not a fixed template
    assert set(meta["versions"]) >= {"anomalyd", "torch", "onnxruntime", "numpy", "librosa"}
    assert meta["created_at"].endswith("+00:00")
    assert meta["model_id"].startswith("normal-")
    for name, digest in meta["files"].items():
        assert sha256_file(bundle_dir / name) == digest
    # The files listed are exactly the training folder's, with their length and content hash.
    assert [f["name"] for f in files] == [p.name for p in list_audio_files(synth_train)]
    for f in files:
        assert f["seconds"] == 4.0
        assert f["sha256"] == sha256_file(synth_train / f["name"])


def test_residual_statistics_are_those_of_the_training_windows(bundle_dir: Path, synth_train: Path) -> None:
    """Training blocks scored again by the runtime: their windows' pooled residual has the stored mean and
    variance, so on average they score about 1 (the score is in units of their own spread)."""
    bundle = load_bundle(bundle_dir)
    meta, residual = bundle.meta, bundle.meta.residual
    assert residual is not None
    scorer = ClipScorer.from_bundle(bundle)
    trained = [synth_train / f["name"] for f in meta.training["files"] if f["blocks"] == "T"]
    pooled = []
    for path in trained:
        audio, _ = sf.read(path, dtype="float32")
        # Each frame through the model once, in tiles; windows pooled from them (anomalyd/tiles.py).
        tiles = meta.normalisation.apply(slice_windows(scorer.logmel(audio), meta.window.tile_frames, 16))
        frames = (scorer.autoencoder.reconstruct(tiles) - tiles).transpose(1, 0, 2).reshape(128, -1)
        windows = slice_windows(frames, meta.window.n_frames, meta.window.hop_frames)
        pooled.append(windows.reshape(*windows.shape[:2], -1, meta.window.pool_frames).mean(axis=3))
    blocks = np.concatenate(pooled)
    assert residual.n_blocks == blocks.shape[0] * blocks.shape[2]
    flat = np.moveaxis(blocks, 1, -1).reshape(-1, blocks.shape[1]).astype(np.float64)
    np.testing.assert_allclose(residual.mean, flat.mean(axis=0), atol=1e-4)
    floored = residual.var > flat.var(axis=0, ddof=1) * 1.001  # where the floor decided
    np.testing.assert_allclose(residual.var[~floored], flat.var(axis=0, ddof=1)[~floored], rtol=1e-3)
    assert floored.mean() < 0.5
    assert 0.5 < float(np.mean(residual.score(blocks))) <= 1.0


def test_a_dead_code_is_told_from_a_live_one() -> None:
    torch.manual_seed(0)
    model = ConvAutoencoder(Architecture(channels=(4, 4, 1)))
    windows = torch.randn(8, 1, 128, 64)
    assert active_code_share(model, [windows[:4], windows[4:]]) > 0
    with torch.no_grad():
        model.encoder[-2].bias.fill_(-1e3)  # the code's pre-activation: negative for every window
    assert active_code_share(model, [windows]) == 0
    assert active_code_share(model, []) == 0


def test_threshold_is_reproduced_by_the_runtime(bundle_dir: Path, synth_train: Path) -> None:
    """Scoring the validation files again through anomalyd gives the stored mean and std."""
    bundle = load_bundle(bundle_dir)
    scorer = ClipScorer.from_bundle(bundle)
    val = [synth_train / f["name"] for f in bundle.meta.training["files"] if f["blocks"] == "V"]
    scores = np.array([scorer.score_file(p).score for p in val])
    assert scores.mean() == pytest.approx(bundle.meta.threshold.clip_scores.mean, rel=1e-5)
    assert scores.std(ddof=1) == pytest.approx(bundle.meta.threshold.clip_scores.std, rel=1e-4)


def test_every_fault_type_is_detected(bundle_dir: Path, synth_test: Path) -> None:
    bundle = load_bundle(bundle_dir)
    scorer = ClipScorer.from_bundle(bundle)
    normal = np.array([scorer.score_file(p).score for p in list_audio_files(synth_test / "normal")])
    threshold = bundle.meta.threshold.value
    under = float(np.mean(normal <= threshold))
    assert under >= 0.95, f"only {under:.0%} of held-out normal clips under the threshold"
    for fault in FAULTS:
        faulty = np.array(
            [scorer.score_file(p).score for p in sorted((synth_test / "anomaly").glob(f"{fault}_*.wav"))]
        )
        assert len(faulty) == 10
        labels = np.r_[np.zeros(len(normal)), np.ones(len(faulty))]
        auc = roc_auc_score(labels, np.r_[normal, faulty])
        assert auc >= 0.95, f"{fault}: AUC {auc:.3f}"


def _quick_train(normal: Path, out: Path, *extra: str) -> int:
    args = ["--normal", str(normal), "--out", str(out), "--epochs", "3", "--channels", "8,8,4", "--quiet"]
    return train.main([*args, *extra])


def test_same_seed_same_model_other_seed_other_model(synth_train: Path, tmp_path: Path) -> None:
    assert _quick_train(synth_train, tmp_path / "a", "--seed", "7") == 0
    assert _quick_train(synth_train, tmp_path / "b", "--seed", "7") == 0
    assert _quick_train(synth_train, tmp_path / "c", "--seed", "8") == 0
    weights = [sha256_file(tmp_path / x / "weights.safetensors") for x in "abc"]
    assert weights[0] == weights[1] != weights[2]
    ids = [load_bundle(tmp_path / x).meta.model_id for x in "abc"]
    assert ids[0] == ids[1] != ids[2]


def test_bad_files_are_skipped_with_a_warning_and_counted(
    synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "normal"
    shutil.copytree(synth_train, folder)
    good = folder / "normal_0000.wav"
    (folder / "cut.wav").write_bytes(good.read_bytes()[:5000])
    (folder / "notes.wav").write_text("not audio")
    (folder / "short.wav").write_bytes(good.read_bytes()[:44] + b"")
    with caplog.at_level(logging.WARNING):
        assert _quick_train(folder, tmp_path / "bundle") == 0
    skipped = load_bundle(tmp_path / "bundle").meta.training["skipped_files"]
    assert sorted(s["name"] for s in skipped) == ["cut.wav", "notes.wav", "short.wav"]
    assert "skipped 3 of 33 files" in caplog.text
    assert "truncated WAV" in caplog.text


def test_retraining_replaces_a_bundle_but_never_other_folders(synth_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    assert _quick_train(synth_train, out) == 0
    assert _quick_train(synth_train, out, "--seed", "3") == 0
    assert load_bundle(out).meta.training["config"]["seed"] == 3
    assert not list(tmp_path.glob(".bundle*"))  # no leftover partial or old copies
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    assert _quick_train(synth_train, precious) == 2
    assert (precious / "data.txt").read_text() == "keep me"


def test_too_little_audio_is_a_clear_error(
    synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for p in list_audio_files(synth_train)[:2]:
        shutil.copy(p, folder)
    assert _quick_train(folder, tmp_path / "b") == 2
    assert "too little normal audio: 8.0 s in 2 usable files makes 2 blocks; training needs 3" in caplog.text
    assert "at least 22.1 s in one recording, or 3 files of 2.08 s or more" in caplog.text
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("epochs = 5\nlearning_rte = 0.1\n", "unknown keys learning_rte"),
        ("epochs = 'many'\n", "epochs = 'many' is not a valid int"),
        ("epochs = 2.5\n", "epochs = 2.5 is not a valid int"),
        ("n_frames = 60\n", "n_frames must be a positive multiple of 8"),
        ("precision = 'int4'\n", "precision must be one of auto, int8, float32, got 'int4'"),
        ("epochs = [\n", "cannot read training preset"),
    ],
)
def test_bad_presets_are_refused_before_any_work(
    synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, preset: str, message: str
) -> None:
    path = tmp_path / "preset.toml"
    path.write_text(preset)
    assert (
        train.main(["--normal", str(synth_train), "--out", str(tmp_path / "b"), "--preset", str(path)]) == 2
    )
    assert message in caplog.text
    assert not (tmp_path / "b").exists()


def test_a_float32_bundle_is_torch_s_model_to_1e4(window_bundle_dir: Path) -> None:
    export = json.loads((window_bundle_dir / "model.json").read_text())["export"]
    assert export["precision"] == "float32"
    assert export["parity_max_abs_diff"] <= 1e-4


def test_help_explains_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    helps = train.field_help()
    for f in dataclasses.fields(train.TrainConfig):
        assert helps.get(f.name), f"TrainConfig.{f.name} has no comment to explain it"
        option = f"--{f.name.replace('_', '-')}"
        assert option in text
        default = getattr(train.TrainConfig(), f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        assert f"(default {shown})" in text, option


@pytest.mark.parametrize("kind", ["file", "folder", "unwritable"])
def test_a_bad_out_is_refused_before_any_training(
    synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a bundle")
    elif kind == "folder":
        out.mkdir()
        (out / "data.txt").write_text("keep me")
    else:
        out = Path("/proc/anomalyd-bundle")
    assert train.main(["--normal", str(synth_train), "--out", str(out)]) == 2
    assert f"--out {out}" in caplog.text
    assert "files in" not in caplog.text  # refused before any audio was even loaded
    if kind == "folder":
        assert (out / "data.txt").read_text() == "keep me"


def test_progress_is_a_line_per_epoch_when_output_is_not_a_terminal(
    synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="training.train"):
        assert train.main(["--normal", str(synth_train), "--out", str(tmp_path / "b"),
                           "--preset", str(SMALL_PRESET), "--epochs", "3"]) == 0  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tile_frames": 12}, "tile_frames must be 0 or a multiple of 8, got 12"),
        ({"tile_frames": 32}, "tile_frames must divide n_frames and hop_frames"),
        ({"tile_frames": -16}, "tile_frames must divide n_frames and hop_frames"),
        ({"pool_frames": 48}, "pool_frames divide n_frames"),
    ],
)
def test_window_and_tile_sizes_that_cannot_work_together_are_refused(
    change: dict[str, int], message: str
) -> None:
    """Training refuses what a bundle could not hold, with the bundle's own words, before any work."""
    assert not train.TrainConfig(tile_frames=16).problems()
    problems = train.TrainConfig(**change).problems()  # type: ignore[arg-type]
    assert any(message in p for p in problems), problems
