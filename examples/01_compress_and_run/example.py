"""Compress an .onnx file with bct-onnx and run it next to the FP32 model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/_common.py
import numpy as np
import onnxruntime as ort
from _common import build_mlp, run, sample_input

import bct_onnx


def main(out_dir: Path) -> None:
    source = build_mlp(out_dir / "model.onnx")
    target = out_dir / "model.bct.onnx"
    result = bct_onnx.compress(source, target, weight_bits=4, act_bits=8, block_size=32)
    print(result.report.summary())

    x = sample_input()
    (fp32,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (compressed,) = bct_onnx.session(target).run(None, {"x": x})
    relative = np.linalg.norm(compressed - fp32) / np.linalg.norm(fp32)
    print(f"ratio {result.report.compression_ratio:.2f}x, relative error {relative:.4f}")


if __name__ == "__main__":
    run(main)
