"""The model bundle: a directory that describes itself, loaded without torch and without pickles.

    model.onnx            the autoencoder graph, (batch, 1, n_mels, n_frames) -> same shape
    mel_filterbank.npy    (n_mels, n_fft//2+1) float32, made by librosa.filters.mel at training time
    weights.safetensors   the torch weights, for fine-tuning only
    model.json            everything else: feature parameters, window geometry, normalisation,
                          threshold statistics, training data fingerprint, versions, checksums

Loading checks every field of model.json (types and ranges, see `anomalyd.bundle_schema`), the feature
parameters against each other, that every listed file lies inside the folder and matches its SHA-256, and
the filterbank's header before its data, so that a bundle that is damaged, tampered with or made for other
features is one clear `BundleError`, never a silently wrong score nor a crash. `anomalyd.inference` then
checks the graph itself when it builds the ONNX Runtime session.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from anomalyd.bundle_schema import MetaDoc, parse_meta
from anomalyd.errors import BundleError, ChecksumError, IncompatibleBundleError
from anomalyd.features import FeatureParams
from anomalyd.residual import ResidualStats
from anomalyd.windows import Normalisation, WindowGeometry

BUNDLE_FORMAT = "anomalyd-bundle"
# Version 2 adds normalisation.levelling, version 3 the residual statistics that weigh each band's score,
# version 4 window.tile_frames (the model reconstructs tiles, each frame once: anomalyd/tiles.py); older
# bundles still load, and score as they always did.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
META_FILE = "model.json"
MODEL_FILE = "model.onnx"
FILTERBANK_FILE = "mel_filterbank.npy"
WEIGHTS_FILE = "weights.safetensors"
REQUIRED_FILES = (MODEL_FILE, FILTERBANK_FILE)
MAX_META_BYTES = 16 << 20  # model.json; one this anomalyd writes is tens of kB
MAX_FILE_BYTES = 256 << 20  # each listed file; a model.onnx of the default architecture is ~300 kB

_short_repr = reprlib.Repr()  # bounded, for values and messages that come from a damaged file
_short_repr.maxstring = _short_repr.maxother = 80


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
    # How `k` was chosen by `anomalyd calibrate` (see `anomalyd.calibrate`), as validated by
    # `anomalyd.bundle_schema.CalibrationDoc`; None: never calibrated, `k` is the default.
    calibration: dict[str, Any] | None = None

    @property
    def value(self) -> float:
        return self.clip_scores.threshold(self.k)

    def to_dict(self) -> dict[str, Any]:
        calibration = {} if self.calibration is None else {"calibration": self.calibration}
        return {
            "k": self.k,
            "value": self.value,
            "mean": self.clip_scores.mean,
            "std": self.clip_scores.std,
            "n_clips": self.clip_scores.n,
            "window_mean": self.window_scores.mean,
            "window_std": self.window_scores.std,
            "n_windows": self.window_scores.n,
            **calibration,
        }


@dataclass(frozen=True)
class TrainingAudio:
    """Where a model's training audio came from: model.json's `training.audio` (absent in older bundles)."""

    files: int
    seconds: float  # usable audio
    formats: dict[str, int]  # libsndfile format name (WAV, FLAC, MP3, ...) -> files
    sample_rates: dict[int, int]  # the files' own rate, Hz -> files
    lossy: bool  # any file lossy-compressed
    devices: tuple[str, ...] = ()  # capture devices, from recording manifests
    capture_rates: tuple[int, ...] = ()  # their rates, Hz, from recording manifests
    recorded_by: str | None = None

    @property
    def rates(self) -> frozenset[int]:
        """Every rate the training audio was captured or stored at: audio at another rate was not heard."""
        return frozenset(self.sample_rates) | frozenset(self.capture_rates)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingAudio:
        return cls(
            files=data["files"],
            seconds=data["seconds"],
            formats=dict(data["formats"]),
            sample_rates={int(rate): n for rate, n in data["sample_rates"].items()},
            lossy=data["lossy"],
            devices=tuple(data.get("devices", ())),
            capture_rates=tuple(data.get("capture_rates", ())),
            recorded_by=data.get("recorded_by"),
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
    # Format 3: how the pooled residual becomes a score; None for older bundles (anomalyd/residual.py).
    residual: ResidualStats | None = None

    @property
    def format_version(self) -> int:
        if self.window.tile_frames:
            return FORMAT_VERSION
        return 3 if self.residual is not None else 2

    @property
    def training_audio(self) -> TrainingAudio | None:
        """`training.audio`, or None for a bundle from before it was recorded."""
        audio = self.training.get("audio")
        return TrainingAudio.from_dict(audio) if isinstance(audio, dict) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            # The oldest version that holds what is here: recalibrating a version 2 bundle keeps it one.
            "format_version": self.format_version,
            "model_id": self.model_id,
            "created_at": self.created_at,
            "features": self.features.to_dict(),
            # Tiles from format 4 on; an older bundle's model.json keeps the fields it had.
            "window": {k: v for k, v in asdict(self.window).items() if k != "tile_frames" or v},
            "normalisation": self.normalisation.to_dict(),
            "threshold": self.threshold.to_dict(),
            "files": self.files,
            "architecture": self.architecture,
            "training": self.training,
            "export": self.export,
            "versions": self.versions,
            **({"residual": self.residual.to_dict()} if self.residual is not None else {}),
        }


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: BundleMeta
    filterbank: npt.NDArray[np.float32]  # (n_mels, n_fft // 2 + 1)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def make_world_readable(directory: Path) -> None:
    """Folder 0755, files 0644, whatever the umask: the daemon may run as another user than training.

    (safetensors, for one, writes its files 0600.)
    """
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)


def write_meta(directory: Path, meta: BundleMeta) -> Path:
    """Write model.json atomically (temp file + rename) so that a crash never leaves half a bundle."""
    target = directory / META_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta.to_dict(), indent=2, allow_nan=False) + "\n")
    tmp.chmod(0o644)
    tmp.replace(target)
    return target


def _cannot_read(path: Path, exc: OSError) -> BundleError:
    return BundleError(f"{path}: cannot read ({exc.strerror or exc})")


def _read_meta(directory: Path) -> BundleMeta:
    meta_path = directory / META_FILE
    try:
        if not meta_path.is_file():
            raise BundleError(f"{directory}: not a model bundle ({META_FILE} missing)")
        size = meta_path.stat().st_size
        if size > MAX_META_BYTES:
            raise BundleError(f"{meta_path}: {size} bytes; a {META_FILE} may hold {MAX_META_BYTES} at most")
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise _cannot_read(meta_path, exc) from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad JSON, bad UTF-8 and huge integers
        raise BundleError(f"{meta_path}: corrupt, not valid JSON ({_short_repr.repr(str(exc))})") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: not an anomalyd bundle (format is not {BUNDLE_FORMAT!r})")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise IncompatibleBundleError(
            f"{meta_path}: bundle format version {_short_repr.repr(version)}, "
            f"this anomalyd reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return _meta_from_doc(parse_meta(meta_path, data))


def _meta_from_doc(doc: MetaDoc) -> BundleMeta:
    t = doc.threshold
    return BundleMeta(
        model_id=doc.model_id,
        created_at=doc.created_at,
        features=FeatureParams(**doc.features.model_dump()),
        window=WindowGeometry(**doc.window.model_dump()),
        normalisation=Normalisation(
            mean=np.asarray(doc.normalisation.mean, dtype=np.float32),
            std=np.asarray(doc.normalisation.std, dtype=np.float32),
            levelling=doc.normalisation.levelling,
        ),
        threshold=Threshold(
            clip_scores=ScoreStats(t.mean, t.std, t.n_clips),
            window_scores=ScoreStats(t.window_mean, t.window_std, t.n_windows),
            k=t.k,
            calibration=None if t.calibration is None else t.calibration.model_dump(),
        ),
        files=dict(doc.files),
        architecture=dict(doc.architecture),
        training=doc.training.model_dump(exclude_unset=True),
        export=dict(doc.export),
        versions=dict(doc.versions),
        residual=None
        if doc.residual is None
        else ResidualStats(
            mean=np.asarray(doc.residual.mean, dtype=np.float32),
            var=np.asarray(doc.residual.var, dtype=np.float32),
            n_blocks=doc.residual.n_blocks,
        ),
    )


def _check_compatible(meta_path: Path, meta: BundleMeta) -> None:
    problems = meta.features.problems()
    n_mels = meta.features.n_mels
    for name, values in (("mean", meta.normalisation.mean), ("std", meta.normalisation.std)):
        if values.shape != (n_mels,):
            problems.append(
                f"normalisation {name} has {values.size} values, features have {n_mels} mel bands"
            )
    if meta.residual is not None:
        for name, values in (("mean", meta.residual.mean), ("var", meta.residual.var)):
            if values.shape != (n_mels,):
                problems.append(f"residual {name} has {values.size} values, features have {n_mels} mel bands")
    problems += meta.window.problems()
    if problems:
        raise IncompatibleBundleError(f"{meta_path}: incompatible feature parameters: {'; '.join(problems)}")


def _checked_file(directory: Path, name: str) -> Path:
    """The listed file, resolved: it must exist inside the bundle folder (links included) and be small."""
    path = directory / name
    try:
        real = path.resolve(strict=True)
        inside = real.is_relative_to(directory.resolve(strict=True))
        regular = real.is_file()
        size = real.stat().st_size
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing from the bundle") from exc
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    except RuntimeError as exc:  # a symbolic link loop (Python 3.11)
        raise BundleError(f"{path}: cannot be resolved ({exc})") from exc
    if not inside:
        raise BundleError(
            f"{path}: leads to {real}, outside the bundle folder; bundle files must lie inside it"
        )
    if not regular:
        raise BundleError(f"{path}: not a regular file")
    if size > MAX_FILE_BYTES:
        raise BundleError(f"{path}: {size} bytes; a bundle file may hold {MAX_FILE_BYTES} at most")
    return real


def _verify_files(directory: Path, meta: BundleMeta) -> None:
    for name in REQUIRED_FILES:
        if name not in meta.files:
            raise BundleError(f"{directory / META_FILE}: lists no checksum for {name}")
    for name, expected in meta.files.items():
        path = _checked_file(directory, name)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise _cannot_read(directory / name, exc) from exc
        if actual != expected:
            raise ChecksumError(
                f"{directory / name}: checksum mismatch (sha256 {actual[:12]}..., "
                f"model.json expects {expected[:12]}...): "
                "the file is corrupt or from another bundle"
            )


def load_filterbank(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """The (n_mels, n_freqs) filterbank; its header is checked before any data is read."""
    try:
        # Memory-mapped: a header that declares a huge array costs nothing until it is refused.
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mapped, np.ndarray):
            raise BundleError(f"{path}: not a .npy array (an .npz archive?)")
        if mapped.shape != shape or mapped.dtype.kind != "f":
            raise IncompatibleBundleError(
                f"{path}: shape {mapped.shape}, feature parameters need {shape} "
                f"(of floats, got {mapped.dtype})"
            )
        filterbank = np.array(mapped, dtype=np.float32)
        del mapped
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    except BundleError:
        raise
    except Exception as exc:  # numpy's header parser raises ValueError, EOFError, SyntaxError, TokenError...
        raise BundleError(
            f"{path}: unreadable mel filterbank ({type(exc).__name__}: {_short_repr.repr(str(exc))})"
        ) from exc
    if not (np.all(np.isfinite(filterbank)) and np.all(filterbank >= 0)):
        raise BundleError(f"{path}: mel filterbank holds negative, NaN or infinite weights")
    return filterbank


def _load(directory: Path) -> Bundle:
    try:
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle directory")
    except OSError as exc:
        raise _cannot_read(directory, exc) from exc
    meta = _read_meta(directory)
    _check_compatible(directory / META_FILE, meta)
    _verify_files(directory, meta)
    filterbank = load_filterbank(directory / FILTERBANK_FILE, (meta.features.n_mels, meta.features.n_freqs))
    return Bundle(path=directory, meta=meta, filterbank=filterbank)


def load_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle directory; raises a BundleError subclass naming what is wrong.

    Only BundleError, whatever the folder holds: a reload onto a bad bundle must be refusable, never a
    crash. Every expected failure has its own message above; the last clause is a safety net whose
    "unexpected" message would be a bug to fix.
    """
    directory = Path(path)
    try:
        return _load(directory)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(
            f"{directory}: unexpected error loading the bundle ({type(exc).__name__}: "
            f"{_short_repr.repr(str(exc))})"
        ) from exc
