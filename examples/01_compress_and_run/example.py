"""Compress an .onnx file with bct-onnx and run it next to the FP32 model."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import bct_onnx


def build_mlp(path: Path, width: int = 256, hidden: int = 1024) -> Path:
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
        nodes, "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def main(out_dir: Path) -> None:
    source = build_mlp(out_dir / "model.onnx")
    target = out_dir / "model.bct.onnx"
    result = bct_onnx.compress(source, target, weight_bits=4, act_bits=8, block_size=32)
    print(result.report.summary())

    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    (fp32,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (compressed,) = bct_onnx.session(target).run(None, {"x": x})
    relative = np.linalg.norm(compressed - fp32) / np.linalg.norm(fp32)
    print(f"ratio {result.report.compression_ratio:.2f}x, relative error {relative:.4f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
