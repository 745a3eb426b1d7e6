"""Side-by-side timing of the compressed nonlinear ops and BlockActMatMul against ONNX Runtime's own.

Each line times one single-node model, median of warm runs, same session options (2 intra-op
threads): ONNX Runtime's float op (Gelu-20, Softmax-13, LayerNormalization-17, RMSNormalization-23
where the runtime has it, MatMul) next to ours with float in/out and with 8-bit in/out.

    BCT_ONNX_LIBRARY=build/dev/libbct_onnx_ops.so python benchmarks/bench_nonlinear.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import bct_onnx
from bct_onnx import block_format as bf
from bct_onnx.ops import BLOCK_ACT_MATMUL, BLOCK_GELU, BLOCK_LAYER_NORM, BLOCK_SOFTMAX, DOMAIN


def model(
    nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], outputs: list[str], opset: int
) -> bytes:
    types = {
        np.dtype(np.float32): TensorProto.FLOAT,
        np.dtype(np.float16): TensorProto.FLOAT16,
        np.dtype(np.uint8): TensorProto.UINT8,
    }
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info(n, types[v.dtype], list(v.shape)) for n, v in inputs.items()],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs],
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    return m.SerializeToString()


def median_ms(model_bytes: bytes, feeds: dict[str, np.ndarray], threads: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = bct_onnx.session(model_bytes, sess_options=options)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def q8(x: np.ndarray, symmetric: bool = True) -> bf.QuantizedTensor:
    return bf.quantize(x, bf.BlockFormat(8, 32, symmetric, "float16"))


def row_op_cases(rows: int, d: int) -> list[tuple[str, Any, Any, Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    scale = rng.standard_normal(d).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    qx = q8(x)
    q_in = dict(in_bits=8, in_block_size=32, in_axis_size=d)
    q_out = dict(out_bits=8, out_block_size=32, out_symmetric=0)
    cases = []
    for name, onnx_op, onnx_attrs, our_op, extra, our_attrs, opset in [
        ("Gelu", "Gelu", {}, BLOCK_GELU, {}, {}, 20),
        ("Softmax", "Softmax", {"axis": -1}, BLOCK_SOFTMAX, {}, {}, 13),
        (
            "LayerNorm",
            "LayerNormalization",
            {"axis": -1, "epsilon": 1e-5},
            BLOCK_LAYER_NORM,
            {"scale": scale, "bias": bias},
            {"epsilon": 1e-5},
            17,
        ),
    ]:
        extra_names = list(extra)
        ref_model = model(
            [helper.make_node(onnx_op, ["x"] + extra_names, ["y"], **onnx_attrs)],
            {"x": x, **extra},
            ["y"],
            opset,
        )
        float_model = model(
            [helper.make_node(our_op, ["x", "", ""] + extra_names, ["y"], domain=DOMAIN, **our_attrs)],
            {"x": x, **extra},
            ["y"],
            opset,
        )
        quant_model = model(
            [
                helper.make_node(
                    our_op,
                    ["c", "s", ""] + extra_names,
                    ["yc", "ys", "yz"],
                    domain=DOMAIN,
                    **our_attrs,
                    **q_in,
                    **q_out,
                )
            ],
            {"c": qx.codes, "s": qx.scales, **extra},
            ["yc", "ys", "yz"],
            opset,
        )
        cases.append(
            (
                f"{name} {rows}x{d}",
                (ref_model, {"x": x, **extra}),
                (float_model, {"x": x, **extra}),
                (quant_model, {"c": qx.codes, "s": qx.scales, **extra}),
            )
        )
    return cases


def act_matmul_case(heads: int, seq: int, head_dim: int) -> tuple[str, Any, Any, Any]:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, heads, seq, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, heads, head_dim, seq)).astype(np.float32)
    ref_model = model([helper.make_node("MatMul", ["q", "k"], ["y"])], {"q": q, "k": k}, ["y"], 17)
    ours = model(
        [
            helper.make_node(
                BLOCK_ACT_MATMUL, ["q", "", "", "k"], ["y"], domain=DOMAIN, act_bits=8, block_size=32
            )
        ],
        {"q": q, "k": k},
        ["y"],
        17,
    )
    ours_q = model(
        [
            helper.make_node(
                BLOCK_ACT_MATMUL,
                ["q", "", "", "k"],
                ["yc", "ys"],
                domain=DOMAIN,
                act_bits=8,
                block_size=32,
                out_bits=8,
                out_block_size=32,
            )
        ],
        {"q": q, "k": k},
        ["yc", "ys"],
        17,
    )
    feeds = {"q": q, "k": k}
    return (
        f"ActMatMul QK^T {heads}h {seq}x{head_dim}x{seq}",
        (ref_model, feeds),
        (ours, feeds),
        (ours_q, feeds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cases = row_op_cases(128, 768) + row_op_cases(128, 3072)[:1] + [act_matmul_case(12, 128, 64)]
    print(f"{'case':40s} {'ORT float':>10s} {'ours f32':>10s} {'ours q8->q8':>12s}   (ms, median)")
    for name, ref_case, float_case, quant_case in cases:
        times = [median_ms(m, f, args.threads, args.repeats) for m, f in (ref_case, float_case, quant_case)]
        print(f"{name:40s} {times[0]:10.3f} {times[1]:10.3f} {times[2]:12.3f}")


if __name__ == "__main__":
    main()
