"""The re-implemented DCASE 2020 Task 2 baseline: its features and model are the published ones, it is
deterministic for a seed, and it does rank synthetic faults above normal sound (a yardstick that works)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

from fixtures import synth
from training import dcase2020


def test_vectors_are_five_stacked_128_band_log_mel_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, synth.render("normal", 0, 0, 2.0), synth.SAMPLE_RATE, subtype="PCM_16")
    vectors = dcase2020.clip_vectors(path)
    frames = 1 + 2 * synth.SAMPLE_RATE // dcase2020.HOP  # librosa's centred frames
    assert vectors.shape == (frames - 4, 640)
    # Frame-major: the second 128 values of vector t are the first 128 of vector t + 1.
    np.testing.assert_array_equal(vectors[0, 128:256], vectors[1, :128])
    widths = [m.out_features for m in dcase2020.DenseAE().net if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 128, 128, 128, 8, 128, 128, 128, 128, 640]


@pytest.mark.slow
def test_the_baseline_is_deterministic_and_ranks_faults_above_normal(
    synth_train: Path, synth_test: Path
) -> None:
    files = sorted(synth_train.glob("*.wav"))
    first = dcase2020.train_baseline(files, seed=3)
    again = dcase2020.train_baseline(files, seed=3)
    normal = sorted((synth_test / "normal").glob("*.wav"))[:10]
    anomaly = sorted((synth_test / "anomaly").glob("*.wav"))[:10]
    scores = [first.clip_score(p) for p in [*normal, *anomaly]]
    assert scores == [again.clip_score(p) for p in [*normal, *anomaly]]
    assert roc_auc_score([0] * len(normal) + [1] * len(anomaly), scores) > 0.7
