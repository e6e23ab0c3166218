"""The int8 autoencoder's graph rebuilt channels-last, so that its pixel shuffles are cheap copies.

ONNX Runtime runs an int8 convolution channels-last (NHWC) and transposes around it, but its DepthToSpace
is channels-first and float32: it interleaves single values, and in the decoder the three shuffles took a
third of the model's time (docs/benchmarks.md). Channels-last, with each conv's output channels ordered
phase-major (DCR), a shuffle moves whole runs of a pixel's channels: a reshape, a transpose of
contiguous blocks and a reshape, on uint8. So the graph that ONNX Runtime makes of the quantiser's
output (QLinearConv nodes, level "extended", portable) is rebuilt here:

- every QLinearConv runs channels-last (ONNX Runtime's own com.microsoft form of it);
- a requantisation around a shuffle (dequantise, shuffle, quantise with the next layer's scale, whose
  zero point makes the ReLU between) moves into the convolution's own output scale;
- the two float32 convolutions around the code (the encoder's last and the decoder's first, kept float
  for accuracy, training/quantise.py): where the code is a few dozen values (the default), each is one
  dense matrix product, which ONNX Runtime runs several times faster than a convolution with a single
  channel on one side, and the decoder's first shuffle is folded into its matrix; larger codes keep
  their convolutions, channels-first.

The rebuilt graph computes what the quantised one does up to rounding: the one requantisation it leaves
out rounds once where the original rounded twice. `channels_last` returns None (the caller keeps the
quantiser's graph) where the graph is not the one expected, and the caller checks the two graphs'
outputs against each other before using it.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# The quantiser's graph once ONNX Runtime has fused it, in order; nothing else is rebuilt.
_EXPECTED = (
    "QuantizeLinear",
    "QLinearConv",  # encoder 0
    "QLinearConv",  # encoder 1
    "DequantizeLinear",
    "FusedConv",  # encoder 2 (+ ReLU), float: makes the code
    "Conv",  # decoder 0, float: reads the code
    "DepthToSpace",
    "QuantizeLinear",  # zero point 0: the ReLU after the shuffle
    "QLinearConv",  # decoder 1
    "DequantizeLinear",
    "DepthToSpace",
    "QuantizeLinear",  # zero point 0: the ReLU after the shuffle
    "QLinearConv",  # decoder 2
    "DequantizeLinear",
    "DepthToSpace",
)
MAX_DENSE = 1 << 20  # values in each dense code-side matrix (4 MB); larger codes keep their convolutions
MS_DOMAIN = "com.microsoft"
ONNX_OPSET = 17  # training/export.py's


def fused(path: Path) -> onnx.ModelProto:
    """The model at `path` as ONNX Runtime fuses it at its portable level (QDQ pairs become QLinearConv)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "fused.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def conv_matrix(
    weight: npt.NDArray[np.float32], height: int, width: int, stride: int, pad: int
) -> npt.NDArray[np.float32]:
    """The convolution as a matrix: (c_in * height * width) x (c_out * out_h * out_w), both sides
    flattened channels-first."""
    c_out, c_in, k_h, k_w = weight.shape
    out_h = (height + 2 * pad - k_h) // stride + 1
    out_w = (width + 2 * pad - k_w) // stride + 1
    matrix = np.zeros((c_in, height, width, c_out, out_h, out_w), np.float32)
    for i in range(out_h):
        for j in range(out_w):
            for ki in range(k_h):
                for kj in range(k_w):
                    h, w = i * stride + ki - pad, j * stride + kj - pad
                    if 0 <= h < height and 0 <= w < width:
                        matrix[:, h, w, :, i, j] += weight[:, :, ki, kj].T
    return matrix.reshape(c_in * height * width, c_out * out_h * out_w)


def _rows_channels_last(channels: int, height: int, width: int) -> npt.NDArray[np.int64]:
    """For each channels-last position (h, w, c), its channels-first index."""
    index = np.arange(channels * height * width).reshape(channels, height, width)
    return index.transpose(1, 2, 0).reshape(-1)


def _shuffled_columns(channels: int, height: int, width: int) -> npt.NDArray[np.int64]:
    """For each channels-last position of DepthToSpace(CRD, 2) of a (4 * channels, height, width) map,
    the channels-first index it is read from."""
    index = np.arange(4 * channels * height * width).reshape(channels, 2, 2, height, width)
    # CRD: output (c, 2i + row, 2j + col) reads channel c * 4 + row * 2 + col at (i, j).
    return index.transpose(3, 1, 4, 2, 0).reshape(-1)


def _phase_major(channels: int) -> npt.NDArray[np.int64]:
    """Output-channel order that makes a CRD shuffle's phases outermost: new channel p * channels + c
    is old channel c * 4 + p."""
    return np.arange(4 * channels).reshape(channels, 4).T.reshape(-1)


class _Builder:
    def __init__(self, source: onnx.ModelProto) -> None:
        self.values = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value: npt.NDArray[np.generic]) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(
        self, op: str, inputs: list[str], stem: str, attrs: dict[str, object] | None = None, domain: str = ""
    ) -> str:
        out = self.name(stem)
        node = helper.make_node(op, inputs, [out], name=out, domain=domain)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in (attrs or {}).items())
        self.nodes.append(node)
        return out

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.node("Reshape", [x, self.const("shape", np.array(shape, np.int64))], "reshape")

    def qconv(self, node: onnx.NodeProto, x: str, order: npt.NDArray[np.int64] | None, y: list[str]) -> str:
        """`node` channels-last on `x`, its output channels in `order`, its output scale and zero point
        the names in `y`."""
        ins = list(node.input)
        w, w_scale, w_zero, bias = (self.values[ins[i]] for i in (3, 4, 5, 8))
        if order is not None:
            w, bias = w[order], bias[order]
            w_scale = w_scale[order] if w_scale.ndim else w_scale
            w_zero = w_zero[order] if w_zero.ndim else w_zero
        new = [self.const("w", w), self.const("w_scale", w_scale), self.const("w_zero", w_zero)]
        y_scale, y_zero = (self.const("y", self.values[n]) for n in y)
        x_scale, x_zero = (self.const("x", self.values[ins[i]]) for i in (1, 2))
        attrs = {k: v for k, v in _attrs(node).items() if k != "auto_pad"}
        inputs = [x, x_scale, x_zero, *new, y_scale, y_zero, self.const("bias", bias)]
        return self.node("QLinearConv", inputs, "qconv", {**attrs, "channels_last": 1}, MS_DOMAIN)

    def shuffle(self, x: str, height: int, width: int, channels: int) -> str:
        """DepthToSpace(2) of a channels-last (height, width, 4 * channels) map whose channels are
        phase-major: whole runs of `channels` values move."""
        blocks = self.reshape(x, [-1, height, width, 2, 2, channels])
        moved = self.node("Transpose", [blocks], "shuffle", {"perm": [0, 1, 3, 2, 4, 5]})
        return self.reshape(moved, [-1, 2 * height, 2 * width, channels])


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_expected(nodes: list[onnx.NodeProto], values: dict[str, npt.NDArray[np.generic]]) -> bool:
    if tuple(n.op_type for n in nodes) != _EXPECTED:
        return False
    if any(b.input[0] != a.output[0] for a, b in itertools.pairwise(nodes)):
        return False
    for n in nodes:
        attrs = _attrs(n)
        if attrs.get("group", 1) != 1 or attrs.get("dilations", [1, 1]) != [1, 1]:
            return False
        shuffle = (attrs.get("blocksize"), attrs.get("mode", b"DCR"))
        if n.op_type == "DepthToSpace" and shuffle != (2, b"CRD"):
            return False
        if n.op_type == "FusedConv" and attrs.get("activation") != b"Relu":
            return False
    # The ReLUs after the shuffles live in these zero points (ONNX Runtime removed them for that reason).
    return all(int(values[nodes[i].input[2]]) == 0 for i in (7, 11))


def _dense_code(
    b: _Builder, x: str, enc2: onnx.NodeProto, dec0: onnx.NodeProto, shape: tuple[int, int, int]
) -> str:
    """The code's two convolutions as dense products, from the encoder's channels-last map to the
    decoder's, shuffled; for codes of a few dozen values these are far cheaper than the convolutions."""
    h4, w4, c2 = shape
    h8, w8 = h4 // 2, w4 // 2
    # The encoder's last convolution, its rows in the channels-last order its input arrives in.
    a_enc = conv_matrix(b.values[enc2.input[1]], h4, w4, 2, 2)[_rows_channels_last(c2, h4, w4)]
    bias_enc = np.repeat(b.values[enc2.input[2]], h8 * w8).astype(np.float32)
    # The decoder's first and its shuffle, the columns in the channels-last order of the shuffled map.
    shuffled = _shuffled_columns(c2, h8, w8)
    a_dec = conv_matrix(b.values[dec0.input[1]], h8, w8, 1, 1)[:, shuffled]
    bias_dec = np.repeat(b.values[dec0.input[2]], h8 * w8)[shuffled].astype(np.float32)
    x = b.reshape(x, [-1, h4 * w4 * c2])
    x = b.node("Gemm", [x, b.const("a", a_enc), b.const("bias", bias_enc)], "encode")
    x = b.node("Relu", [x], "code")
    return b.node("Gemm", [x, b.const("a", a_dec), b.const("bias", bias_dec)], "decode")


def _conv_code(
    b: _Builder, x: str, enc2: onnx.NodeProto, dec0: onnx.NodeProto, shape: tuple[int, int, int]
) -> str:
    """The code's two convolutions as they are, channels-first; the decoder's output channels made
    phase-major for the shuffle that follows."""
    c2 = shape[2]
    x = b.node("Transpose", [x], "to_channels_first", {"perm": [0, 3, 1, 2]})
    enc = [b.const("w", b.values[enc2.input[1]]), b.const("bias", b.values[enc2.input[2]])]
    x = b.node("Conv", [x, *enc], "encode", _conv_attrs(enc2))
    x = b.node("Relu", [x], "code")
    order = _phase_major(c2)
    dec = [b.const("w", b.values[dec0.input[1]][order]), b.const("bias", b.values[dec0.input[2]][order])]
    return b.node("Conv", [x, *dec], "decode", _conv_attrs(dec0))


def _conv_attrs(node: onnx.NodeProto) -> dict[str, object]:
    kept = ("dilations", "group", "kernel_shape", "pads", "strides")
    return {k: v for k, v in _attrs(node).items() if k in kept}


def channels_last(path: Path, n_mels: int, n_frames: int) -> onnx.ModelProto | None:
    """The quantised model at `path` rebuilt channels-last, or None where it is not the expected graph."""
    source = fused(path)
    nodes = list(source.graph.node)
    b = _Builder(source)
    if not _is_expected(nodes, b.values):
        return None
    q_in, enc0, enc1, dq1, enc2, dec0, _, q_dec0, dec1, _, _, q_dec1, dec2, dq_out, _ = nodes
    enc2_attrs, dec0_attrs = _attrs(enc2), _attrs(dec0)
    if enc2_attrs["strides"] != [2, 2] or enc2_attrs["pads"] != [2, 2, 2, 2]:
        return None
    if dec0_attrs["strides"] != [1, 1] or dec0_attrs["pads"] != [1, 1, 1, 1]:
        return None
    w_enc2, w_dec0 = b.values[enc2.input[1]], b.values[dec0.input[1]]
    c3, c2 = w_enc2.shape[:2]  # the code's channels, the encoder's second
    c1 = b.values[dec1.input[3]].shape[0] // 4  # the encoder's first
    h2, h4, h8 = n_mels // 2, n_mels // 4, n_mels // 8
    w2, w4, w8 = n_frames // 2, n_frames // 4, n_frames // 8
    if w_dec0.shape[:2] != (4 * c2, c3):
        return None
    x = b.node("QuantizeLinear", ["windows", *(b.const("x", b.values[n]) for n in q_in.input[1:3])], "q")
    x = b.reshape(x, [-1, n_mels, n_frames, 1])  # one channel: channels-last is a reshape
    x = b.qconv(enc0, x, None, list(enc0.input[6:8]))
    x = b.qconv(enc1, x, None, list(enc1.input[6:8]))
    x = b.node("DequantizeLinear", [x, *(b.const("x", b.values[n]) for n in dq1.input[1:3])], "dq")
    dense = c3 * h8 * w8 * h4 * w4 * c2 <= MAX_DENSE
    x = (_dense_code if dense else _conv_code)(b, x, enc2, dec0, (h4, w4, c2))
    x = b.node("QuantizeLinear", [x, *(b.const("y", b.values[n]) for n in q_dec0.input[1:3])], "q")
    if dense:
        x = b.reshape(x, [-1, h4, w4, c2])
    else:
        x = b.node("Transpose", [x], "to_channels_last", {"perm": [0, 2, 3, 1]})
        x = b.shuffle(x, h8, w8, c2)
    x = b.qconv(dec1, x, _phase_major(c1), list(q_dec1.input[1:3]))
    x = b.shuffle(x, h4, w4, c1)
    x = b.qconv(dec2, x, None, list(dec2.input[6:8]))  # one output channel: already phase-major
    x = b.reshape(x, [-1, h2, w2, 2, 2])
    x = b.node("Transpose", [x], "shuffle", {"perm": [0, 1, 3, 2, 4]})
    x = b.reshape(x, [-1, 1, n_mels, n_frames])
    out = helper.make_node(
        "DequantizeLinear", [x, *(b.const("y", b.values[n]) for n in dq_out.input[1:3])], ["reconstruction"]
    )
    shape: list[str | int] = ["batch", 1, n_mels, n_frames]
    graph = helper.make_graph(
        [*b.nodes, out],
        "autoencoder_int8_channels_last",
        [helper.make_tensor_value_info("windows", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, shape)],
        b.initializers,
    )
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=source.ir_version)
