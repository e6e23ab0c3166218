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
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

from training.model import ConvAutoencoder

PRECISIONS = ("auto", "int8", "float32")  # auto: int8 where it holds (training/export.py)
CALIBRATION_INPUTS = 256  # normalised training inputs that set the activation ranges
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
) -> None:
    """Write the int8 ONNX model of `model` to `path`, its ranges calibrated on `calibration`."""
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
