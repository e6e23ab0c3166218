"""Fine-tuning from a bundle (`--init-from`): normal-but-unusual audio that the bundle calls anomalous,
marked normal and trained on, scores far lower afterwards, in fewer epochs than training from scratch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from anomalyd.bundle import load_bundle
from anomalyd.scoring import ClipScorer
from fixtures.synth import SAMPLE_RATE, render
from tests.conftest import SMALL_PRESET
from training import train

pytestmark = pytest.mark.slow


def unusual(index: int, seconds: float = 4.0) -> np.ndarray:
    """The same kind of machine at another operating point: louder, with a steady 2.2 kHz whine."""
    x = render("normal", seed=5, index=index, seconds=seconds).astype(np.float64)
    phase = np.random.default_rng([5, index, 99]).uniform(0, 2 * np.pi)
    t = np.arange(len(x)) / SAMPLE_RATE
    return np.clip(1.6 * x + 0.02 * np.sin(2 * np.pi * 2200 * t + phase), -1, 1).astype(np.float32)


def mean_score(bundle: Path, files: list[Path]) -> float:
    scorer = ClipScorer.from_bundle(load_bundle(bundle))
    return float(np.mean([scorer.score_file(f).score for f in files]))


def test_fine_tuning_on_marked_normal_audio_lowers_its_score_in_fewer_epochs(
    bundle_dir: Path, synth_train: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "normal"  # the original normal audio and the clips of events marked normal
    shutil.copytree(synth_train, data)
    for i in range(8):
        sf.write(data / f"fan-marked-{i}.wav", unusual(i), SAMPLE_RATE, subtype="PCM_16")
    held_out = [tmp_path / f"unusual-{i}.wav" for i in range(20, 23)]  # never trained on
    for i, path in zip(range(20, 23), held_out, strict=True):
        sf.write(path, unusual(i), SAMPLE_RATE, subtype="PCM_16")
    parent = load_bundle(bundle_dir).meta
    before = mean_score(bundle_dir, held_out)
    assert before > parent.threshold.value  # the bundle calls this normal sound anomalous

    tuned = tmp_path / "tuned"
    args = ["--normal", str(data), "--out", str(tuned), "--preset", str(SMALL_PRESET), "--quiet"]
    assert train.main([*args, "--init-from", str(bundle_dir)]) == 0
    meta = load_bundle(tuned).meta
    after = mean_score(tuned, held_out)
    assert after < before / 3, (before, after)
    assert meta.training["parent_model_id"] == parent.model_id
    assert meta.training["epochs_run"] <= 30 < parent.training["epochs_run"]
    assert meta.normalisation.mean.tolist() == parent.normalisation.mean.tolist()  # kept, not refitted

    # Another architecture than the bundle's is refused in one line, before any training.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="training.train"):
        refused = train.main(
            [*args[:3], str(tmp_path / "x"), "--init-from", str(bundle_dir), "--channels", "8,8,4"]
        )
    assert refused == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"--init-from {bundle_dir}: the bundle has another architecture or window setup: channels 8,8,4 "
        "(bundle: 16,32,8); drop those options or train from scratch"
    ]
    assert not (tmp_path / "x").exists()
