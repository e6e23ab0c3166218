"""Loading bundles: damaged or mismatched ones are specific, clear errors; the runtime never needs torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.bundle import load_bundle, sha256_file
from anomalyd.errors import BundleError, ChecksumError, IncompatibleBundleError
from anomalyd.scoring import ClipScorer

pytestmark = pytest.mark.slow  # needs the session's trained bundle


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def edit_meta(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    change(meta)
    (bundle / "model.json").write_text(json.dumps(meta))


def test_good_bundle_loads(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.filterbank.shape == (128, 513)
    assert bundle.meta.threshold.value > bundle.meta.threshold.clip_scores.mean


def test_flipped_byte_in_model_is_a_checksum_error(copy: Path) -> None:
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.onnx: checksum mismatch"):
        load_bundle(copy)


def test_filterbank_from_another_bundle_is_a_checksum_error(copy: Path) -> None:
    np.save(copy / "mel_filterbank.npy", np.zeros((128, 513), dtype=np.float32))
    with pytest.raises(ChecksumError, match="mel_filterbank"):
        load_bundle(copy)


def test_corrupt_json(copy: Path) -> None:
    (copy / "model.json").write_text('{"format": "anomalyd-bundle", ')
    with pytest.raises(BundleError, match="corrupt, not valid JSON"):
        load_bundle(copy)


def test_missing_file(copy: Path) -> None:
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing from the bundle"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nothing")


def test_future_format_version(copy: Path) -> None:
    edit_meta(copy, lambda m: m.update(format_version=99))
    with pytest.raises(IncompatibleBundleError, match="format version 99, this anomalyd reads version 1"):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["features"].update(n_mels=64), "normalisation mean has 128 values, features have 64"),
        (lambda m: m["features"].update(power=1.0), "power must be 2.0"),
        (lambda m: m["features"].update(center=True), "center=true is not supported"),
        (lambda m: m["window"].update(pool_frames=7), "pool_frames divide n_frames"),
    ],
    ids=["n_mels", "power", "center", "pool"],
)
def test_incompatible_feature_parameters(
    copy: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_meta(copy, change)
    with pytest.raises(IncompatibleBundleError, match="incompatible feature parameters") as info:
        load_bundle(copy)
    assert message in str(info.value)


def test_filterbank_shape_must_match_features(copy: Path) -> None:
    edit_meta(copy, lambda m: m["features"].update(n_fft=2048))
    with pytest.raises(
        IncompatibleBundleError, match=r"shape \(128, 513\), feature parameters need \(128, 1025\)"
    ):
        load_bundle(copy)


def test_model_input_must_match_window_geometry(copy: Path) -> None:
    edit_meta(copy, lambda m: m["window"].update(n_frames=32, pool_frames=16))
    with pytest.raises(IncompatibleBundleError, match=r"input shape .* need \[batch, 1, 128, 32\]"):
        ClipScorer.from_bundle(load_bundle(copy))


def test_unloadable_onnx_with_matching_checksum(copy: Path) -> None:
    (copy / "model.onnx").write_bytes(b"\x00garbage" * 100)
    edit_meta(copy, lambda m: m["files"].update({"model.onnx": sha256_file(copy / "model.onnx")}))
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        ClipScorer.from_bundle(load_bundle(copy))


def test_missing_metadata_field(copy: Path) -> None:
    edit_meta(copy, lambda m: m.pop("threshold"))
    with pytest.raises(BundleError, match="missing or unknown field 'threshold'"):
        load_bundle(copy)


def test_runtime_scores_without_torch(bundle_dir: Path, synth_train: Path) -> None:
    """Load and score in a fresh interpreter in which importing torch is impossible."""
    clip = sorted(synth_train.glob("*.wav"))[0]
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "from anomalyd.cli import main\n"
        f"status = main(['score', '--bundle', {str(bundle_dir)!r}, {str(clip)!r}])\n"
        "assert status in (0, 1), status\n"
        "assert 'librosa' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert clip.name in result.stdout
