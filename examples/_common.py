"""What every example shares: a small random-weight model and the OUT_DIR / temporary-directory runner."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def build_mlp(path: Path, width: int = 256, hidden: int = 1024) -> Path:
    """Save a two-layer MLP (MatMul, Relu, MatMul; input "x" [batch, width]) to path."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/mlp/fc1/MatMul"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="/mlp/fc2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def sample_input(width: int = 256) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, width)).astype(np.float32)


def run(main: Callable[[Path], None]) -> None:
    """main(OUT_DIR) with the first argument, or with a temporary directory removed afterwards."""
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
