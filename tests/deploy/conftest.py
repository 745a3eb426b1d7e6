"""Small models shared by the deployment tests: a float MLP built from ONNX helpers, and its
compressed form (written once per test into tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bct_onnx

VOCAB, HIDDEN, FFN, OUT = 100, 64, 128, 32


def build_mlp(path: Path, seed: int = 0) -> Path:
    """ids [batch, seq] -> Gather -> MatMul + bias -> Relu -> MatMul -> y [batch, seq, OUT].

    Node names follow exporters' layer paths ("/layers.N/...") so reports can group them by layer.
    """
    rng = np.random.default_rng(seed)
    init = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embedding"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, FFN)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array((0.1 * rng.standard_normal(FFN)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((FFN, OUT)) / 11).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="/embed/Gather"),
        helper.make_node("MatMul", ["emb", "w1"], ["h"], name="/layers.0/fc1/MatMul"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="/layers.0/fc1/Add"),
        helper.make_node("Relu", ["hb"], ["act"], name="/layers.0/Relu"),
        helper.make_node("MatMul", ["act", "w2"], ["y"], name="/layers.1/fc2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])],
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_ids(batch: int = 2, seq: int = 5) -> np.ndarray:
    """The input the deployment tests feed (the C++ example fills input_ids the same way)."""
    return ((np.arange(batch * seq, dtype=np.int64) * 13 + 1) % 100).reshape(batch, seq)


@pytest.fixture()
def mlp_path(tmp_path: Path) -> Path:
    return build_mlp(tmp_path / "mlp.onnx")


@pytest.fixture()
def compressed_mlp(tmp_path: Path, mlp_path: Path) -> Path:
    out = tmp_path / "mlp.bct.onnx"
    bct_onnx.compress(mlp_path, out, calibration="none")
    return out
