"""BlockGather against ONNX Runtime's own embedding lookups, side by side in one run.

An embedding table of BERT's size (30522 x 768) is looked up with a batch of token ids by:
  - ONNX Gather on the float32 table (the uncompressed baseline),
  - com.microsoft GatherBlockQuantized on a 4-bit table (ONNX Runtime's own blockwise path),
  - ai.bct_onnx BlockGather on the same values in the bct format (4-bit and 8-bit).
Reported: median of warm runs in microseconds, and the ratio to float Gather. Same session
settings for all (intra-op threads, all graph optimizations).

    python benchmarks/bench_gather.py [--rows 128] [--threads 2] [--repeat 300]

Needs the compiled custom-op library (installed package, or BCT_ONNX_LIBRARY).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bct_onnx
from bct_onnx.block_format import BlockFormat, ScaleKind, quantize

VOCAB, HIDDEN = 30522, 768


def _model(nodes, initializers, opsets) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def float_gather(table: np.ndarray) -> bytes:
    node = helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)
    return _model([node], [numpy_helper.from_array(table, "table")], [helper.make_opsetid("", 17)])


def ort_block_gather(table: np.ndarray, block_size: int) -> bytes:
    """GatherBlockQuantized (com.microsoft): uint8 data holding two 4-bit values, float scales."""
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // block_size, block_size)
    amax = np.abs(blocks).max(axis=-1)
    scales = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int8).reshape(rows, cols) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    zero_points = np.full((rows, cols // block_size // 2), 0x88, np.uint8)
    node = helper.make_node(
        "GatherBlockQuantized",
        ["data", "ids", "scales", "zero_points"],
        ["y"],
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block_size,
        bits=4,
    )
    inits = [
        numpy_helper.from_array(packed, "data"),
        numpy_helper.from_array(scales, "scales"),
        numpy_helper.from_array(zero_points, "zero_points"),
    ]
    return _model([node], inits, [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def bct_block_gather(table: np.ndarray, fmt: BlockFormat) -> bytes:
    q = quantize(table, fmt)
    node = helper.make_node(
        bct_onnx.ops.BLOCK_GATHER,
        ["ids", "codes", "scales"],
        ["y"],
        domain=bct_onnx.DOMAIN,
        bits=fmt.bits,
        block_size=fmt.block_size,
        symmetric=1,
        axis_size=table.shape[1],
    )
    inits = [numpy_helper.from_array(q.codes, "codes"), numpy_helper.from_array(q.scales, "scales")]
    return _model([node], inits, [helper.make_opsetid("", 17), helper.make_opsetid(bct_onnx.DOMAIN, 1)])


def time_us(model: bytes, ids: np.ndarray, threads: int, repeat: int, custom: bool) -> float:
    sess = bct_onnx.session(model, threads=threads, with_library=custom)
    feeds = {"ids": ids}
    for _ in range(20):
        sess.run(None, feeds)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, feeds)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="token ids looked up per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    table = (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32)
    ids = rng.integers(0, VOCAB, args.rows).astype(np.int64)
    cases = [
        ("float32 Gather (ONNX)", float_gather(table), False),
        ("GatherBlockQuantized 4-bit bs32 (com.microsoft)", ort_block_gather(table, 32), False),
        (
            "BlockGather 4-bit bs32 float16 (bct)",
            bct_block_gather(table, BlockFormat(4, 32, True, ScaleKind.FLOAT16)),
            True,
        ),
        (
            "BlockGather 8-bit bs32 float16 (bct)",
            bct_block_gather(table, BlockFormat(8, 32, True, ScaleKind.FLOAT16)),
            True,
        ),
        (
            "BlockGather 3-bit bs32 float16 (bct, odd width)",
            bct_block_gather(table, BlockFormat(3, 32, True, ScaleKind.FLOAT16)),
            True,
        ),
    ]
    print(
        f"onnxruntime {ort.__version__}, table {VOCAB}x{HIDDEN}, {args.rows} ids, {args.threads} threads, "
        f"median of {args.repeat}"
    )
    baseline = None
    for name, model, custom in cases:
        try:
            us = time_us(model, ids, args.threads, args.repeat, custom)
        except Exception as exc:  # noqa: BLE001 - report the row, keep measuring the others
            print(f"{name:55s}  failed: {str(exc).splitlines()[0][:120]}")
            continue
        baseline = baseline or us
        print(f"{name:55s} {us:9.1f} us  x{us / baseline:5.2f}")


if __name__ == "__main__":
    main()
