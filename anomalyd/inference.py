"""Reconstruction error of normalised log-mel windows, through ONNX Runtime (never torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from anomalyd.errors import BundleError, IncompatibleBundleError


class Autoencoder:
    """An ONNX autoencoder taking and returning (batch, 1, n_mels, n_frames) float32."""

    def __init__(self, model_path: Path, n_mels: int, n_frames: int, threads: int = 1) -> None:
        options = ort.SessionOptions()
        # One thread by default: the daemon batches many streams and a factory box has few cores to share.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime raises its own undocumented exception types.
            raise BundleError(f"{model_path}: not a loadable ONNX model ({exc})") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise IncompatibleBundleError(f"{model_path}: expected one input, graph has {len(inputs)}")
        shape = inputs[0].shape
        if len(shape) != 4 or list(shape[1:]) != [1, n_mels, n_frames]:
            raise IncompatibleBundleError(
                f"{model_path}: input shape {shape}, bundle windows need [batch, 1, {n_mels}, {n_frames}]"
            )
        self._input_name = inputs[0].name
        self.n_mels = n_mels
        self.n_frames = n_frames

    def reconstruct(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, n_mels, n_frames) normalised windows -> their reconstructions, same shape."""
        if len(windows) == 0:
            return np.empty_like(windows)
        assert windows.shape[1:] == (self.n_mels, self.n_frames), windows.shape
        batch = np.ascontiguousarray(windows[:, None], dtype=np.float32)
        (out,) = self._session.run(None, {self._input_name: batch})
        return np.asarray(out[:, 0], dtype=np.float32)
