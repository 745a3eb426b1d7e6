"""Compress to standard ONNX (DequantizeLinear + MatMul) and run it with plain onnxruntime."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import bct_onnx

HERE = Path(__file__).resolve().parent


def build_mlp(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("example01", HERE.parent / "01_compress_and_run" / "example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_mlp(path)


def main(out_dir: Path) -> None:
    source = build_mlp(out_dir / "model.onnx")
    target = out_dir / "model.qdq.onnx"
    result = bct_onnx.compress(source, target, format="qdq", weight_bits=4, calibration="none")
    print(result.report.summary())
    model = onnx.load(str(target))
    print("ops:", [node.op_type for node in model.graph.node], "opset", model.opset_import[0].version)

    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    (fp32,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    # A plain session: the bct-onnx library is NOT registered.
    (standard,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    relative = np.linalg.norm(standard - fp32) / np.linalg.norm(fp32)
    print(f"plain onnxruntime: ratio {result.report.compression_ratio:.2f}x, relative error {relative:.4f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
