"""Editing and tampering with model bundles in tests: what someone with a text editor or a grudge does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from anomalyd.bundle import sha256_file


def edit_meta(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    change(meta)
    (bundle / "model.json").write_text(json.dumps(meta))


def rehash(bundle: Path, name: str) -> None:
    """Record `name`'s current checksum in model.json, as someone tampering with care would."""
    edit_meta(bundle, lambda m: m["files"].update({name: sha256_file(bundle / name)}))


def window_info(name: str, shape: list[Any], kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


WINDOWS = ["batch", 1, 128, 16]  # model inputs: tiles of 16 frames


def install_graph(
    bundle: Path, nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], **kw: Any
) -> None:
    """Replace the bundle's model.onnx with a hand-made graph, checksum and all."""
    constants = [numpy_helper.from_array(v, k) for k, v in kw.pop("constants", {}).items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = kw.pop("ir_version", 8)
    onnx.save(model, str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")
