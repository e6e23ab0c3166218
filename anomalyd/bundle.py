"""The model bundle: a directory that describes itself, loaded without torch and without pickles.

    model.onnx            the autoencoder graph, (batch, 1, n_mels, n_frames) -> same shape
    mel_filterbank.npy    (n_mels, n_fft//2+1) float32, made by librosa.filters.mel at training time
    weights.safetensors   the torch weights, for fine-tuning only
    model.json            everything else: feature parameters, window geometry, normalisation,
                          threshold statistics, training data fingerprint, versions, checksums

Loading checks the format version, the feature parameters, the shapes and every file's SHA-256, so that a
bundle that is damaged or was made for other features is a clear error, never a silently wrong score.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.errors import BundleError, ChecksumError, IncompatibleBundleError
from anomalyd.features import FeatureParams
from anomalyd.windows import Normalisation, WindowGeometry

BUNDLE_FORMAT = "anomalyd-bundle"
FORMAT_VERSION = 1
META_FILE = "model.json"
MODEL_FILE = "model.onnx"
FILTERBANK_FILE = "mel_filterbank.npy"
WEIGHTS_FILE = "weights.safetensors"
REQUIRED_FILES = (MODEL_FILE, FILTERBANK_FILE)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ScoreStats:
    """Mean and standard deviation of anomaly scores on held-out normal audio, and how many there were."""

    mean: float
    std: float
    n: int

    def threshold(self, k: float) -> float:
        """mean + k * std: scores above it are anomalous."""
        return self.mean + k * self.std


@dataclass(frozen=True)
class Threshold:
    """The decision rule for clip scores: anomalous when score > mean + k * std of validation clips."""

    clip_scores: ScoreStats  # validation clips' scores (mean of window errors per clip)
    window_scores: ScoreStats  # validation windows' errors, for rules applied to single windows
    k: float = 3.0

    @property
    def value(self) -> float:
        return self.clip_scores.threshold(self.k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "value": self.value,
            "mean": self.clip_scores.mean,
            "std": self.clip_scores.std,
            "n_clips": self.clip_scores.n,
            "window_mean": self.window_scores.mean,
            "window_std": self.window_scores.std,
            "n_windows": self.window_scores.n,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        return cls(
            clip_scores=ScoreStats(float(data["mean"]), float(data["std"]), int(data["n_clips"])),
            window_scores=ScoreStats(
                float(data["window_mean"]), float(data["window_std"]), int(data["n_windows"])
            ),
            k=float(data["k"]),
        )


@dataclass(frozen=True)
class BundleMeta:
    """The content of model.json. Fields after `files` describe the model; scoring does not need them."""

    model_id: str
    created_at: str  # UTC, ISO 8601 with offset
    features: FeatureParams
    window: WindowGeometry
    normalisation: Normalisation
    threshold: Threshold
    files: dict[str, str]  # file name -> SHA-256 hex digest
    architecture: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "created_at": self.created_at,
            "features": self.features.to_dict(),
            "window": asdict(self.window),
            "normalisation": self.normalisation.to_dict(),
            "threshold": self.threshold.to_dict(),
            "files": self.files,
            "architecture": self.architecture,
            "training": self.training,
            "export": self.export,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMeta:
        return cls(
            model_id=str(data["model_id"]),
            created_at=str(data["created_at"]),
            features=FeatureParams.from_dict(data["features"]),
            window=WindowGeometry(**data["window"]),
            normalisation=Normalisation.from_dict(data["normalisation"]),
            threshold=Threshold.from_dict(data["threshold"]),
            files={str(k): str(v) for k, v in data["files"].items()},
            architecture=dict(data.get("architecture", {})),
            training=dict(data.get("training", {})),
            export=dict(data.get("export", {})),
            versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
        )


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: BundleMeta
    filterbank: npt.NDArray[np.float32]  # (n_mels, n_fft // 2 + 1)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def write_meta(directory: Path, meta: BundleMeta) -> Path:
    """Write model.json atomically (temp file + rename) so that a crash never leaves half a bundle."""
    target = directory / META_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    tmp.replace(target)
    return target


def _read_meta(directory: Path) -> BundleMeta:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{directory}: not a model bundle ({META_FILE} missing)")
    try:
        data = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: corrupt, not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: not an anomalyd bundle (format is not {BUNDLE_FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise IncompatibleBundleError(
            f"{meta_path}: bundle format version {data.get('format_version')!r}, "
            f"this anomalyd reads version {FORMAT_VERSION}"
        )
    try:
        return BundleMeta.from_dict(data)
    except KeyError as exc:
        raise BundleError(f"{meta_path}: missing or unknown field {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{meta_path}: malformed field ({exc})") from exc


def _check_compatible(meta_path: Path, meta: BundleMeta) -> None:
    problems = meta.features.problems()
    n_mels = meta.features.n_mels
    for name, values in (("mean", meta.normalisation.mean), ("std", meta.normalisation.std)):
        if values.shape != (n_mels,):
            problems.append(
                f"normalisation {name} has {values.size} values, features have {n_mels} mel bands"
            )
    if not np.all(meta.normalisation.std > 0):
        problems.append("normalisation std has values <= 0")
    w = meta.window
    if min(w.n_frames, w.hop_frames, w.pool_frames) <= 0 or w.n_frames % w.pool_frames:
        problems.append(f"window sizes must be positive and pool_frames divide n_frames, got {w}")
    t = meta.threshold
    if not all(math.isfinite(v) for v in (t.value, t.window_scores.mean, t.window_scores.std)):
        problems.append("threshold statistics are not finite")
    if problems:
        raise IncompatibleBundleError(f"{meta_path}: incompatible feature parameters: {'; '.join(problems)}")


def _verify_files(directory: Path, meta: BundleMeta) -> None:
    for name in REQUIRED_FILES:
        if name not in meta.files:
            raise BundleError(f"{directory / META_FILE}: lists no checksum for {name}")
    for name, expected in meta.files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: checksum mismatch (sha256 {actual[:12]}..., "
                f"model.json expects {expected[:12]}...): "
                "the file is corrupt or from another bundle"
            )


def load_filterbank(path: Path) -> npt.NDArray[np.float32]:
    try:
        filterbank = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable mel filterbank ({exc})") from exc
    return np.asarray(filterbank, dtype=np.float32)


def load_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle directory; raises a BundleError subclass naming what is wrong."""
    directory = Path(path)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory")
    meta = _read_meta(directory)
    _check_compatible(directory / META_FILE, meta)
    _verify_files(directory, meta)
    filterbank = load_filterbank(directory / FILTERBANK_FILE)
    expected = (meta.features.n_mels, meta.features.n_freqs)
    if filterbank.shape != expected:
        raise IncompatibleBundleError(
            f"{directory / FILTERBANK_FILE}: shape {filterbank.shape}, feature parameters need {expected}"
        )
    return Bundle(path=directory, meta=meta, filterbank=filterbank)
