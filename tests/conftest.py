"""Shared fixtures: synthetic machine audio on disk and one small bundle trained on it per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import synth
from training import train

ROOT = Path(__file__).resolve().parent.parent
MIMII = ROOT / "fixtures" / "mimii"
SMALL_PRESET = ROOT / "configs" / "train-small.toml"


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 normal clips of 4 s (seed 0): the training set."""
    out = tmp_path_factory.mktemp("synth-train")
    synth.write_dataset(out, n_normal=30, per_fault=0, seconds=4.0, seed=0)
    return out / "normal"


@pytest.fixture(scope="session")
def synth_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out audio (seed 1): 40 normal clips and 10 of each fault type."""
    out = tmp_path_factory.mktemp("synth-test")
    synth.write_dataset(out, n_normal=40, per_fault=10, seconds=4.0, seed=1)
    return out


@pytest.fixture(scope="session")
def bundle_dir(synth_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained on `synth_train`, through the real training command."""
    out = tmp_path_factory.mktemp("bundle") / "machine"
    status = train.main(
        ["--normal", str(synth_train), "--out", str(out), "--preset", str(SMALL_PRESET), "--quiet"]
    )
    assert status == 0
    return out
