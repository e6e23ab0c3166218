"""Export a trained autoencoder as a model bundle (see anomalyd/bundle.py for the layout).

The bundle is built in a hidden sibling folder and moved into place only when complete and verified, so
an interrupted export never leaves a half-written bundle where the daemon would load it. The threshold is
fitted with the exported ONNX model through anomalyd's own scoring path: the numbers the daemon compares
against are computed exactly as the daemon computes scores. Before the bundle moves into place it is loaded
exactly as `anomalyd run` and `check-config` load it (ONNX Runtime session included), and it is made
world-readable, since the daemon may run as another user.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import torch
from safetensors.torch import save_file

import anomalyd
from anomalyd.bundle import (
    FILTERBANK_FILE,
    META_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleMeta,
    ScoreStats,
    Threshold,
    load_bundle,
    make_world_readable,
    sha256_file,
    write_meta,
)
from anomalyd.errors import BundleError
from anomalyd.features import LogMel
from anomalyd.inference import Autoencoder, open_autoencoder
from anomalyd.residual import ResidualStats
from anomalyd.scoring import ClipScorer
from anomalyd.windows import Normalisation, WindowGeometry
from training.dataset import Clip
from training.model import Architecture, ConvAutoencoder, reconstruct
from training.quantise import export_int8

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |onnxruntime - torch| on the same windows
# An int8 model is not the float one: its rms difference from torch's output, over the rms of that output,
# must stay below this (measured: about 1 % on MIMII and synthetic audio); far above it, quantisation broke.
INT8_TOLERANCE = 0.1
ONNX_OPSET = 17
# The file's IR version is set to the lowest one that can carry ONNX_OPSET (8 for opset 17), never the
# newest the installed `onnx` knows: onnx 1.23 writes IR 14, which onnxruntime 1.31 cannot load (it reads up
# to IR 13). The oldest IR keeps bundles loadable by the oldest runtime that has the operators.
ONNX_IR_VERSION = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", ONNX_OPSET)])


@dataclass(frozen=True)
class ExportInputs:
    out: Path
    name: str
    model: ConvAutoencoder
    arch: Architecture
    logmel: LogMel
    geometry: WindowGeometry
    normalisation: Normalisation
    val_clips: list[Clip]  # held-out normal clips the threshold is fitted on
    train_clips: list[Clip]  # training blocks: the residual statistics are fitted on their windows
    train_hop_frames: int  # frames between those windows, where the model takes whole windows
    parity_windows: npt.NDArray[np.float32]  # (n, n_mels, model_frames) normalised tiles
    k: float
    training: dict[str, Any]
    precision: str = "float32"  # or "int8" (training/quantise.py)
    calibration: npt.NDArray[np.float32] | None = None  # int8: normalised training inputs for the ranges


def export_onnx(model: ConvAutoencoder, n_mels: int, n_frames: int, path: Path) -> None:
    model.eval()
    example = torch.zeros(1, 1, n_mels, n_frames)
    # The TorchScript-based exporter writes one self-contained file (the dynamo one adds a side .data file)
    # and needs no onnxscript; its deprecation notice is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["windows"],
            output_names=["reconstruction"],
            dynamic_axes={"windows": {0: "batch"}, "reconstruction": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    graph.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def check_parity(model: ConvAutoencoder, runtime: Autoencoder, windows: npt.NDArray[np.float32]) -> float:
    """Max abs difference between torch and ONNX Runtime reconstructions; raises above the tolerance."""
    diff = float(np.max(np.abs(runtime.reconstruct(windows) - reconstruct(model, windows))))
    if not diff <= PARITY_TOLERANCE:
        raise BundleError(f"ONNX export differs from torch by {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    return diff


def int8_error(model: ConvAutoencoder, runtime: Autoencoder, windows: npt.NDArray[np.float32]) -> float:
    """The int8 model's rms difference from torch's reconstructions, relative to their rms."""
    expected = reconstruct(model, windows)
    error = float(np.sqrt(np.mean((runtime.reconstruct(windows) - expected) ** 2)))
    return round(error / max(float(np.sqrt(np.mean(expected**2))), 1e-12), 5)


def fit_residual(scorer: ClipScorer, train_clips: list[Clip], train_hop_frames: int) -> ResidualStats:
    """Each band's pooled residual statistics over the training blocks' windows, as the exported model
    and the daemon's own scoring path give them. Windows start every `train_hop_frames` where the model
    takes whole windows, every tile where it takes tiles (a window is whole tiles)."""
    g = scorer.geometry
    dense = ClipScorer(
        scorer.logmel, replace(g, hop_frames=g.tile_frames or train_hop_frames), scorer.normalisation,
        scorer.autoencoder,
    )  # fmt: skip
    return ResidualStats.fit(dense.pooled_residuals(c.logmel) for c in train_clips)


def fit_threshold(scorer: ClipScorer, val_clips: list[Clip], k: float) -> Threshold:
    scores = [scorer.score_logmel(c.logmel) for c in val_clips]
    clip_scores = np.array([s.score for s in scores], dtype=np.float64)
    window_errors = np.concatenate([s.window_errors for s in scores]).astype(np.float64)
    return Threshold(
        clip_scores=ScoreStats(float(clip_scores.mean()), float(clip_scores.std(ddof=1)), len(clip_scores)),
        window_scores=ScoreStats(
            float(window_errors.mean()), float(window_errors.std(ddof=1)), len(window_errors)
        ),
        k=k,
    )


def versions() -> dict[str, str]:
    import librosa  # noqa: PLC0415 - only for its version string

    return {
        "anomalyd": anomalyd.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnx": str(getattr(onnx, "__version__", "unknown")),
        "onnxruntime": onnxruntime.__version__,
        "librosa": str(getattr(librosa, "__version__", "unknown")),
    }


def _move_into_place(built: Path, out: Path) -> None:
    """Replace `out` with `built`; an existing `out` must be a bundle, anything else is left alone."""
    if out.exists():
        if not (out / META_FILE).is_file():
            raise BundleError(f"{out}: exists and is not a model bundle; refusing to overwrite it")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        built.rename(out)
        shutil.rmtree(old)
    else:
        built.rename(out)


def _export_model(inp: ExportInputs, path: Path) -> tuple[Autoencoder, dict[str, object]]:
    """Write model.onnx in the precision asked for; return it loaded, and how close it is to torch's.

    "auto" exports int8 when it stays within INT8_TOLERANCE of torch's output (on MIMII every seed of ten
    then ranks within half a point of AUC of float32) and float32 otherwise, with a warning: a default
    must not fail a training run. "int8" asked for explicitly fails instead.
    """
    n_mels, frames = inp.logmel.params.n_mels, inp.geometry.model_frames
    refused: dict[str, object] = {}
    if inp.precision in ("int8", "auto"):
        if inp.calibration is None:
            raise BundleError("an int8 export needs calibration inputs")
        graph = export_int8(inp.model, n_mels, frames, inp.calibration, path)
        runtime = Autoencoder(path, n_mels, frames)
        relative = int8_error(inp.model, runtime, inp.parity_windows)
        if relative <= INT8_TOLERANCE:
            fidelity = {
                "int8_relative_rms_error": relative,
                "calibration_inputs": len(inp.calibration),
                "int8_graph": graph,
            }
            return runtime, {"precision": "int8", **fidelity}
        problem = f"the int8 model differs from torch by {relative:.1%} rms (tolerance {INT8_TOLERANCE:.0%})"
        if inp.precision == "int8":
            raise BundleError(f"{problem}; export it with precision float32 (or auto)")
        logger.warning("%s: exported in float32 instead", problem)
        refused = {"int8_refused_relative_rms_error": relative}
    export_onnx(inp.model, n_mels, frames, path)
    runtime = Autoencoder(path, n_mels, frames)
    parity = check_parity(inp.model, runtime, inp.parity_windows)
    return runtime, {"precision": "float32", "parity_max_abs_diff": parity, **refused}


def export_bundle(inp: ExportInputs) -> Bundle:
    params = inp.logmel.params
    inp.out.parent.mkdir(parents=True, exist_ok=True)
    built = inp.out.with_name(f".{inp.out.name}.partial")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()

    save_file(
        {k: v.contiguous() for k, v in inp.model.state_dict().items()},
        str(built / WEIGHTS_FILE),
        metadata={"architecture": str(inp.arch.to_dict())},
    )
    np.save(built / FILTERBANK_FILE, inp.logmel.filterbank, allow_pickle=False)

    runtime, fidelity = _export_model(inp, built / MODEL_FILE)
    scorer = ClipScorer(inp.logmel, inp.geometry, inp.normalisation, runtime)
    residual = fit_residual(scorer, inp.train_clips, inp.train_hop_frames)
    scorer = ClipScorer(inp.logmel, inp.geometry, inp.normalisation, runtime, residual)
    threshold = fit_threshold(scorer, inp.val_clips, inp.k)

    files = {name: sha256_file(built / name) for name in (MODEL_FILE, FILTERBANK_FILE, WEIGHTS_FILE)}
    meta = BundleMeta(
        model_id=f"{inp.name}-{files[MODEL_FILE][:12]}",
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        features=params,
        window=inp.geometry,
        normalisation=inp.normalisation,
        threshold=threshold,
        files=files,
        architecture=inp.arch.to_dict(),
        training=inp.training,
        export={
            "onnx_opset": ONNX_OPSET,
            "onnx_ir_version": ONNX_IR_VERSION,
            **fidelity,
            "parity_windows": len(inp.parity_windows),
        },
        versions=versions(),
        residual=residual,
    )
    write_meta(built, meta)
    make_world_readable(built)
    # The same checks the daemon and check-config make, before anything replaces a working bundle.
    open_autoencoder(load_bundle(built))
    _move_into_place(built, inp.out)
    return load_bundle(inp.out)
