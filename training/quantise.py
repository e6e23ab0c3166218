"""An int8 model: the same autoencoder, its convolutions run on 8-bit integers (ONNX Runtime, static QDQ).

ONNX Runtime's quantiser turns Conv nodes into integer convolutions but leaves ConvTranspose in float32, and
half of the model's work is in the decoder. So the decoder is first rewritten, exactly, without transposed
convolutions: a ConvTranspose2d(kernel 5, stride 2, padding 2, output padding 1) equals a Conv2d(kernel 3,
padding 1) with four output channels per channel, one per output phase (row and column parity), followed
by PixelShuffle(2), which exports as DepthToSpace. Each phase sees the taps of the 5 x 5 kernel that land
on it: rows 4, 2, 0 for even output rows, 3, 1 for odd ones (the missing tap is zero).

Weights are quantised per output channel (symmetric int8) and activations per tensor (uint8), with ranges
calibrated on the model's own normalised training inputs. The two convolutions around the code (the
encoder's last, which makes it, and the decoder's first, which reads it) stay float32: the code is a
handful of channels, so they cost little, and rounding it to 256 levels moved single MIMII seeds' AUC by up
to 9 points, where with them in float it stays the float model's (docs/mimii.md). The model's input and
output stay float32, so the daemon loads an int8 bundle as any other; its residual statistics and
threshold are fitted through the int8 model itself (training/export.py), never carried over from the
float one.

The quantiser's graph is then rebuilt channels-last (training/channels_last.py), where ONNX Runtime's pixel
shuffles cost a fraction; the rebuild is kept only where it is at least as close to the float model.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

from training.channels_last import channels_last
from training.model import ConvAutoencoder, reconstruct

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "int8", "float32")  # auto: int8 where it holds (training/export.py)
CALIBRATION_INPUTS = 256  # normalised training inputs that set the activation ranges
REBUILD_SLACK = 1.25  # the channels-last graph may be this much further from float32 than the quantiser's
_TAPS = {0: (4, 2, 0), 1: (None, 3, 1)}  # output phase -> 5-tap kernel index per 3-tap position


def subpixel(layer: nn.ConvTranspose2d) -> nn.Sequential:
    """The Conv2d + PixelShuffle equal to `layer` (kernel 5, stride 2, padding 2, output padding 1)."""
    shape = (layer.kernel_size, layer.stride, layer.padding, layer.output_padding)
    if shape != ((5, 5), (2, 2), (2, 2), (1, 1)) or layer.groups != 1 or layer.bias is None:
        raise ValueError(f"only kernel 5, stride 2, padding 2, output padding 1 is rewritten, not {shape}")
    weight = layer.weight.detach()  # (in, out, 5, 5)
    c_in, c_out = weight.shape[:2]
    conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
    phases = torch.zeros(4 * c_out, c_in, 3, 3)
    for row in (0, 1):
        for col in (0, 1):
            for t, ki in enumerate(_TAPS[row]):
                for u, kj in enumerate(_TAPS[col]):
                    if ki is not None and kj is not None:
                        # PixelShuffle reads channel c * 4 + row * 2 + col into output channel c.
                        phases[row * 2 + col :: 4, :, t, u] = weight[:, :, ki, kj].T
    bias = layer.bias.detach().repeat_interleave(4)
    with torch.no_grad():
        conv.weight.copy_(phases)
        conv.bias.copy_(bias)  # type: ignore[union-attr]  # Conv2d has a bias unless told not to
    return nn.Sequential(conv, nn.PixelShuffle(2))


def without_transposed(model: ConvAutoencoder) -> ConvAutoencoder:
    """A copy of `model` whose decoder has no ConvTranspose2d; same output (to float rounding)."""
    rewritten = copy.deepcopy(model)
    rewritten.decoder = nn.Sequential(
        *(subpixel(m) if isinstance(m, nn.ConvTranspose2d) else m for m in model.decoder)
    )
    return rewritten.eval()


class _Inputs(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no stubs
    def __init__(self, inputs: npt.NDArray[np.float32], batch: int = 32) -> None:
        self._batches = iter([{"windows": inputs[i : i + batch, None]} for i in range(0, len(inputs), batch)])

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        return next(self._batches, None)


def calibration_indices(n_inputs: int, seed: int) -> npt.NDArray[np.int64]:
    """Which of `n_inputs` normalised training inputs calibrate the ranges: at most CALIBRATION_INPUTS,
    drawn by `seed`, in order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_inputs, min(CALIBRATION_INPUTS, n_inputs), replace=False)).astype(np.int64)


def export_int8(
    model: ConvAutoencoder,
    n_mels: int,
    n_frames: int,
    calibration: npt.NDArray[np.float32],
    path: Path,
) -> str:
    """Write the int8 ONNX model of `model` to `path`, its ranges calibrated on `calibration`; return which
    graph it is: "channels-last" (training/channels_last.py) or "quantised" (the quantiser's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        quantised = Path(tmp) / "quantised.onnx"
        quantise(model, n_mels, n_frames, calibration, quantised)
        rebuilt = channels_last(quantised, n_mels, n_frames)
        if rebuilt is not None and rebuild_holds(model, quantised, rebuilt, calibration):
            onnx.save(rebuilt, str(path))
            return "channels-last"
        shutil.copyfile(quantised, path)
        return "quantised"


def quantise(
    model: ConvAutoencoder,
    n_mels: int,
    n_frames: int,
    calibration: npt.NDArray[np.float32],
    path: Path,
) -> None:
    """Write the quantiser's QDQ graph of `model` to `path`."""
    from training.export import export_onnx  # noqa: PLC0415 - export imports this module

    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        export_onnx(without_transposed(model), n_mels, n_frames, float_path)
        convolutions = [n.name for n in onnx.load(str(float_path)).graph.node if n.op_type == "Conv"]
        around_code = convolutions[2:4]  # encoder: 0, 1, 2 (makes the code); decoder: 3 (reads it), 4, 5
        # The quantiser logs advice about a pre-processing step the graph does not need (it has no
        # shapes to infer that export did not already give); it is not a problem of the model.
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(float_path),
                str(path),
                _Inputs(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=around_code,
            )
        finally:
            quiet.setLevel(level)


def rebuild_holds(
    model: ConvAutoencoder, quantised: Path, rebuilt: onnx.ModelProto, inputs: npt.NDArray[np.float32]
) -> bool:
    """Whether `rebuilt` reconstructs `inputs` as closely to `model` as the quantised graph does (its one
    rounding fewer makes it, if anything, closer), and finite. A rebuild that mixed up channels is far off."""
    windows = inputs[:, None]
    expected = reconstruct(model, inputs)[:, None]
    before = _session(quantised.read_bytes()).run(None, {"windows": windows})[0]
    after = _session(rebuilt.SerializeToString()).run(None, {"windows": windows})[0]
    if after.shape != expected.shape or not np.all(np.isfinite(after)):
        return False
    error_before = float(np.sqrt(np.mean((before - expected) ** 2)))
    error_after = float(np.sqrt(np.mean((after - expected) ** 2)))
    if error_after > REBUILD_SLACK * error_before:
        log.warning(
            "the channels-last int8 graph is %.3g rms from float32, the quantiser's %.3g: that one is kept",
            error_after,
            error_before,
        )
        return False
    return True


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
