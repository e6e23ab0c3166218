"""Reconstruction error of normalised log-mel windows, through ONNX Runtime (never torch).

Building the session is where a bundle's graph meets the runtime, so it is checked here once, for the
daemon, `anomalyd score` and `anomalyd check-config` alike: the graph loads, takes and returns
(batch, 1, n_mels, n_frames) float32, and a trial batch comes back with that shape and finite values.
Whatever ONNX Runtime objects to becomes one `BundleError` line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from anomalyd.bundle import Bundle
from anomalyd.errors import BundleError, IncompatibleBundleError

TRIAL_BATCH = 2  # windows in the trial run: more than one, because the daemon batches across streams
_ORT_QUIET = 4  # ONNX Runtime's "fatal only": its errors reach the user as our one line, not its log
_FLOAT_TENSOR = "tensor(float)"


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """ONNX Runtime's message on one line, without its status code and C++ source location."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^/\S+:\d+ (?:[\w:~]+\([^()]*\) )?", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Autoencoder:
    """An ONNX autoencoder taking and returning (batch, 1, n_mels, n_frames) float32."""

    def __init__(self, model_path: Path, n_mels: int, n_frames: int, threads: int = 1) -> None:
        self.n_mels = n_mels
        self.n_frames = n_frames
        options = ort.SessionOptions()
        # One thread by default: the daemon batches many streams and a factory box has few cores to share.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = _ORT_QUIET
        try:
            # From bytes, not from the path: the graph is the one whose checksum was verified, and a graph
            # naming external data files cannot make the runtime read anything outside the bundle.
            model = model_path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{model_path}: cannot read ({exc.strerror or exc})") from exc
        try:
            # No fallback: on failure ONNX Runtime would print a banner to stdout and retry the same provider.
            self._session = ort.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"], enable_fallback=0
            )
            inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
            signature = [(x.name, x.type, x.shape) for x in (*inputs, *outputs)]
        except Exception as exc:  # ONNX Runtime raises its own undocumented exception types.
            raise BundleError(f"{model_path}: not a loadable ONNX model ({_one_line(exc)})") from exc
        self._check_signature(model_path, len(inputs), signature)
        self._input_name = inputs[0].name
        self._trial_run(model_path)

    def _check_signature(
        self, model_path: Path, n_inputs: int, signature: list[tuple[str, str, list[object]]]
    ) -> None:
        if n_inputs != 1 or len(signature) != 2:
            raise IncompatibleBundleError(
                f"{model_path}: expected one input and one output, graph has {n_inputs} and "
                f"{len(signature) - n_inputs}"
            )
        want = [1, self.n_mels, self.n_frames]
        for role, (_, kind, shape) in zip(("input", "output"), signature, strict=True):
            if kind != _FLOAT_TENSOR or len(shape) != 4 or list(shape[1:]) != want:
                raise IncompatibleBundleError(
                    f"{model_path}: {role} shape {shape} of {kind}, bundle tiles need "
                    f"[batch, 1, {self.n_mels}, {self.n_frames}] of {_FLOAT_TENSOR}"
                )

    def _trial_run(self, model_path: Path) -> None:
        """Score a batch of zeros (the mean spectrum): what the graph cannot compute fails here, not later."""
        trial = np.zeros((TRIAL_BATCH, self.n_mels, self.n_frames), dtype=np.float32)
        try:
            out = self._run(trial)
        except Exception as exc:  # ONNX Runtime raises its own undocumented exception types.
            raise BundleError(
                f"{model_path}: the ONNX model fails on a trial batch ({_one_line(exc)})"
            ) from exc
        if out.shape != (TRIAL_BATCH, 1, self.n_mels, self.n_frames) or out.dtype != np.float32:
            raise IncompatibleBundleError(
                f"{model_path}: a trial batch came back as {out.dtype} {list(out.shape)}, expected float32 "
                f"[{TRIAL_BATCH}, 1, {self.n_mels}, {self.n_frames}]"
            )
        if not np.all(np.isfinite(out)):
            raise BundleError(
                f"{model_path}: the ONNX model returns values that are not finite on a trial batch"
            )

    def _run(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        batch = np.ascontiguousarray(windows[:, None], dtype=np.float32)
        outputs = self._session.run(None, {self._input_name: batch})
        return np.asarray(outputs[0])

    def reconstruct(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, n_mels, n_frames) normalised tiles (or windows) -> their reconstructions, same shape."""
        if len(windows) == 0:
            return np.empty_like(windows)
        assert windows.shape[1:] == (self.n_mels, self.n_frames), windows.shape
        return np.asarray(self._run(windows)[:, 0], dtype=np.float32)


def open_autoencoder(bundle: Bundle, threads: int = 1) -> Autoencoder:
    """The bundle's graph as a checked ONNX Runtime session: what `run`, `score` and `check-config` build."""
    meta = bundle.meta
    return Autoencoder(bundle.model_path, meta.features.n_mels, meta.window.model_frames, threads)
