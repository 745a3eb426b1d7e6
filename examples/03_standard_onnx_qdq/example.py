"""Compress to standard ONNX (DequantizeLinear + MatMul) and run it with plain onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/_common.py
import numpy as np
import onnx
import onnxruntime as ort
from _common import build_mlp, run, sample_input

import bct_onnx


def main(out_dir: Path) -> None:
    source = build_mlp(out_dir / "model.onnx")
    target = out_dir / "model.qdq.onnx"
    result = bct_onnx.compress(source, target, format="qdq", weight_bits=4, calibration="none")
    print(result.report.summary())
    model = onnx.load(str(target))
    print("ops:", [node.op_type for node in model.graph.node], "opset", model.opset_import[0].version)

    x = sample_input()
    (fp32,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    # A plain session: the bct-onnx library is NOT registered.
    (standard,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    relative = np.linalg.norm(standard - fp32) / np.linalg.norm(fp32)
    print(f"plain onnxruntime: ratio {result.report.compression_ratio:.2f}x, relative error {relative:.4f}")


if __name__ == "__main__":
    run(main)
