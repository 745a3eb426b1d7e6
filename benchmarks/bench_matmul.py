"""BlockMatMul against ONNX Runtime's own MatMul paths, side by side in one run.

Each case is a one-node model with a constant weight, run with the same session settings
(intra-op threads, sequential execution, all graph optimizations). Reported: the median (and the
minimum) of warm runs (after warm-up calls) in milliseconds and the ratio of medians to ONNX
Runtime's FP32 MatMul in the same run; the cases take turns so a busy machine slows all alike. Weights stay the same between calls (warm caches), as in a model run on one machine.

    python benchmarks/bench_matmul.py [--threads 2] [--repeat 200] [--json out.json]

Needs the compiled custom-op library (installed package, or BCT_ONNX_LIBRARY); without it only
the ONNX Runtime rows are measured, and the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bct_onnx import block_format, ops, runtime

logger = logging.getLogger(__name__)

SHAPES = ((1, 768, 3072), (128, 768, 3072), (1, 4096, 4096))
OPSET = 17


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured variant: a label and a function building its model for (M, K, N)."""

    label: str
    build: Callable[[np.ndarray, int], onnx.ModelProto]
    needs_library: bool = False


def _model(nodes, inits, m: int, k: int, n: int, domains: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=inits,
    )
    imports = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in domains]
    return helper.make_model(graph, opset_imports=imports)


def fp32_matmul(weight: np.ndarray, m: int) -> onnx.ModelProto:
    k, n = weight.shape
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _model([node], [numpy_helper.from_array(weight, "W")], m, k, n)


def matmul_nbits(accuracy_level: int) -> Callable[[np.ndarray, int], onnx.ModelProto]:
    def build(weight: np.ndarray, m: int) -> onnx.ModelProto:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            fp32_matmul(weight, m), bits=4, block_size=32, is_symmetric=True, accuracy_level=accuracy_level
        )
        quantizer.process()
        model = quantizer.model.model
        if not any(node.op_type == "MatMulNBits" for node in model.graph.node):
            raise RuntimeError("MatMulNBitsQuantizer produced no MatMulNBits node")
        return model

    return build


def int8_dynamic(weight: np.ndarray, m: int) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp32_matmul(weight, m), src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(dst)


def block_matmul(act_bits: int) -> Callable[[np.ndarray, int], onnx.ModelProto]:
    def build(weight: np.ndarray, m: int) -> onnx.ModelProto:
        k, n = weight.shape
        fmt = block_format.BlockFormat(
            bits=4, block_size=32, symmetric=True, scale_kind=block_format.ScaleKind.FLOAT16
        )
        q = block_format.quantize(np.ascontiguousarray(weight.T), fmt)
        node = helper.make_node(
            ops.BLOCK_MATMUL,
            ["A", "W_codes", "W_scales"],
            ["Y"],
            domain=ops.DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=32,
            symmetric=1,
            act_bits=act_bits,
        )
        inits = [numpy_helper.from_array(q.codes, "W_codes"), numpy_helper.from_array(q.scales, "W_scales")]
        return _model([node], inits, m, k, n, [(ops.DOMAIN, ops.DOMAIN_VERSION)])

    return build


CASES = (
    Case("ORT FP32 MatMul", fp32_matmul),
    Case("ORT MatMulNBits 4b b32 acc0", matmul_nbits(0)),
    Case("ORT MatMulNBits 4b b32 acc4", matmul_nbits(4)),
    Case("ORT int8 quantize_dynamic", int8_dynamic),
    Case("BCT BlockMatMul 4b b32 act float", block_matmul(0), needs_library=True),
    Case("BCT BlockMatMul 4b b32 act int8", block_matmul(8), needs_library=True),
)


def _session(model: onnx.ModelProto, threads: int, with_library: bool) -> ort.InferenceSession:
    return runtime.session(model.SerializeToString(), threads=threads, with_library=with_library)


def _interleaved_medians(
    sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], warmup: int, repeat: int, rounds: int
) -> list[tuple[float, float]]:
    """(median, min) ms per session; the sessions take turns in `rounds` rounds so that load changes
    on a shared machine hit every case alike."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feed)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t), min(t)) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--repeat", type=int, default=200, help="timed runs per case (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="cases take turns in this many rounds (default 5)"
    )
    parser.add_argument(
        "--only", default="", help="run only cases whose label contains this text (FP32 always runs)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        runtime.library_path()
        have_library = True
    except runtime.LibraryNotFoundError as err:
        logger.warning("custom-op library not found, BlockMatMul rows skipped: %s", err)
        have_library = False

    rng = np.random.default_rng(0)
    results = []
    for m, k, n in SHAPES:
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        feed = {"A": rng.standard_normal((m, k)).astype(np.float32)}
        cases = [c for c in CASES if (have_library or not c.needs_library)]
        cases = [c for i, c in enumerate(cases) if i == 0 or args.only in c.label]
        sessions = [_session(c.build(weight, m), args.threads, c.needs_library) for c in cases]
        medians = _interleaved_medians(sessions, feed, args.warmup, args.repeat, args.rounds)
        base = medians[0][0]
        for case, (ms, best) in zip(cases, medians):
            results.append(
                {
                    "M": m,
                    "K": k,
                    "N": n,
                    "case": case.label,
                    "median_ms": ms,
                    "min_ms": best,
                    "vs_fp32": base / ms,
                }
            )

    print(
        f"\nonnxruntime {ort.__version__}, {args.threads} intra-op threads, median of {args.repeat} warm runs "
        f"({args.rounds} interleaved rounds)"
    )
    print(
        f"| {'M x K x N':<16} | {'case':<34} | {'median ms':>9} | {'min ms':>8} | {'speed-up vs FP32':>16} |"
    )
    print(f"|{'-' * 18}|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 18}|")
    for row in results:
        shape = f"{row['M']} x {row['K']} x {row['N']}"
        print(
            f"| {shape:<16} | {row['case']:<34} | {row['median_ms']:>9.3f} | {row['min_ms']:>8.3f} "
            f"| {row['vs_fp32']:>15.2f}x |"
        )
    if args.json:
        meta = {
            "onnxruntime": ort.__version__,
            "threads": args.threads,
            "repeat": args.repeat,
            "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
