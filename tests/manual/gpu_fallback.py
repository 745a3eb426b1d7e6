"""Manual check (not collected by pytest): with onnxruntime-gpu installed on a machine without a GPU,
a compressed model still runs, on bct-onnx's CPU kernels (ONNX Runtime's provider fallback).

It needs onnxruntime-gpu, which cannot share an environment with onnxruntime, so it runs in a
separate venv (about 0.5 GB):

    python -m venv /tmp/gpuvenv && /tmp/gpuvenv/bin/pip install onnxruntime-gpu numpy onnx onnx-ir
    PYTHONPATH=<repo> /tmp/gpuvenv/bin/python tests/manual/gpu_fallback.py "$(python -c 'import bct_onnx; print(bct_onnx.library_path())')"

Seen 2026-11-28 with onnxruntime-gpu 1.31.1: CUDAExecutionProvider fails to load (no CUDA
libraries / GPU), the session runs on ['CPUExecutionProvider'] with our BlockMatMul.
"""

import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bct_onnx.block_format import BlockFormat, dequantize, dequantize_codes, quantize, quantize_codes


def main(library: str) -> int:
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    k, n = 64, 16
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    q = quantize(weight.T, BlockFormat(4, 32))
    node = helper.make_node(
        "BlockMatMul",
        ["a", "codes", "scales"],
        ["y"],
        domain="ai.bct_onnx",
        name="mm",
        K=k,
        N=n,
        bits=4,
        block_size=32,
        symmetric=1,
        act_bits=8,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        initializer=[numpy_helper.from_array(q.codes, "codes"), numpy_helper.from_array(q.scales, "scales")],
    )
    model = helper.make_model(
        graph,
        ir_version=8,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.bct_onnx", 1)],
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    print("session providers", session.get_providers())
    a = rng.standard_normal((2, k)).astype(np.float32)
    y = session.run(None, {"a": a})[0]
    act_fmt = BlockFormat(8, 32, True, "float32")
    a_q = dequantize_codes(*quantize_codes(a, act_fmt), act_fmt)  # the activation the kernel sees
    error = float(np.abs(y - a_q @ dequantize(q).T).max())
    print("max abs difference to the numpy spec", error)
    return 0 if session.get_providers() == ["CPUExecutionProvider"] and error < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
