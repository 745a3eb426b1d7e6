"""BlockMatMul against ONNX Runtime's own MatMul paths, side by side in one run.

Two parts, both timed in one process with interleaved rounds (every round runs each case in turn,
so load on a shared machine slows all alike; compare ratios, not milliseconds across runs):

1. Products of one node with a constant weight, on the shapes that matter: prefill GEMMs
   (BERT-base 128 x 768 x 768, 128 x 768 x 3072, 128 x 3072 x 768; MiniLM batch 8 x 64 tokens,
   512 x 384 x 1536) and a decode GEMV (1 x 4096 x 4096), against ONNX Runtime's FP32 MatMul,
   MatMulNBits 4-bit block 32 (accuracy level 4) and int8 `quantize_dynamic` (DynamicQuantizeLinear
   + MatMulInteger); `--shapes encoder` takes every GEMM of the MiniLM and BERT-base benchmarks.
   BlockMatMul with activations int8 also runs with Y as int8 codes, the form its product takes
   between the ops of a compressed model. Reported: median and minimum ms, ratio to ORT int8.
2. Decode bandwidth: chains of distinct 4-bit K=N=4096 weights (read from memory, not cache) for
   M = 1, 4, 8 rows, and sets of distinct weights of any K x N x bits (--gemv-shapes, e.g. SmolLM2's
   decode products): GB/s of weight bytes, next to a STREAM-like read of as many threads
   (compare_speed.StreamRead: numpy byte max, persistent threads) timed in the same rounds; from the
   median and from the fastest round (on a shared machine the fastest rounds are those where no other
   job took a core; `--clock cpu` is steadier). --gemv-threads 1,2 times several thread counts side by
   side, --compare-library another build of the custom-op library (before / after a change),
   --compare-isa the products again with one instruction-set path forced (amx against avx512vnni).

Prints the CPU model and the ISA paths (bct-onnx's BlockMatMul path, MLAS's int8 path).
`--clock cpu` times the calling thread's CPU time with one intra-op thread instead of wall time:
on a machine shared with other jobs that measures the kernels, not the scheduler.

    python benchmarks/bench_matmul.py [--threads 2] [--repeat 100] [--clock wall|cpu]
        [--only TEXT] [--shapes 128x768x3072,...|encoder] [--gemv-rows 1,4,8] [--gemv-threads 1,2]
        [--gemv-shapes 576x576x4,...] [--compare-library OTHER.so] [--compare-isa avx512vnni]
        [--json out.json]

Needs the compiled custom-op library (installed package, or BCT_ONNX_LIBRARY); without it only
the ONNX Runtime rows are measured, and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts (benchmarks/ is no package)
import compare_speed

from bct_onnx import block_format, ops, runtime

logger = logging.getLogger(__name__)

# (M, K, N): BERT-base prefill of 128 tokens, MiniLM batch 8 x 64 tokens, a decode GEMV.
SHAPES = ((128, 768, 768), (128, 768, 3072), (128, 3072, 768), (512, 384, 1536), (1, 4096, 4096))
# --shapes encoder: every GEMM of the two encoder benchmarks (MiniLM batch 8 x 64, BERT-base 1 x 128).
ENCODER_SHAPES = (
    (512, 384, 384),
    (512, 384, 1536),
    (512, 1536, 384),
    (128, 768, 768),
    (128, 768, 3072),
    (128, 3072, 768),
)
# SmolLM2-135M's decode products (K x N x bits as bct-onnx's default compresses them): q and o, k, v,
# the packed gate/up, down, and the tied 5-bit asymmetric output table.
SMOLLM2_DECODE_SHAPES = "576x576x4,576x192x4,576x192x6,576x3072x4,1536x576x4,576x49152x5a"
OPSET = 17
BASELINE = "ORT int8 quantize_dynamic"


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured variant: a label and a function building its model for (M, K, N)."""

    label: str
    build: Callable[[np.ndarray, int], onnx.ModelProto]
    needs_library: bool = False


def _model(
    nodes,
    inits,
    m: int,
    k: int,
    n: int,
    domains: Sequence[tuple[str, int]] = (),
    outputs: Sequence[str] = ("Y",),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])]
        + [helper.make_value_info(name, helper.TypeProto()) for name in outputs[1:]],
        initializer=inits,
    )
    if len(outputs) > 1:  # quantized Y: element types and shapes left to the op's inference
        graph.output[0].CopyFrom(helper.make_value_info("Y", helper.TypeProto()))
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


def block_matmul(
    bits: int, act_bits: int, out_bits: int = 0, epilogue: str = ""
) -> Callable[[np.ndarray, int], onnx.ModelProto]:
    """BlockMatMul of symmetric block-32 weights; out_bits > 0: Y as codes of that width (block 32,
    symmetric, float32 scales), as between the ops of a compressed model; epilogue: e.g. "gelu" (the
    FFN-up product of an encoder)."""

    def build(weight: np.ndarray, m: int) -> onnx.ModelProto:
        k, n = weight.shape
        fmt = block_format.BlockFormat(
            bits=bits, block_size=32, symmetric=True, scale_kind=block_format.ScaleKind.FLOAT16
        )
        q = block_format.quantize(np.ascontiguousarray(weight.T), fmt)
        outputs = ["Y", "Y_scales"] if out_bits else ["Y"]
        out_attrs = (
            {"out_bits": out_bits, "out_block_size": 32, "out_symmetric": 1, "out_scale_kind": "float32"}
            if out_bits
            else {}
        )
        if epilogue:
            out_attrs["epilogue"] = epilogue
        node = helper.make_node(
            ops.BLOCK_MATMUL,
            ["A", "W_codes", "W_scales"],
            outputs,
            domain=ops.DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=32,
            symmetric=1,
            act_bits=act_bits,
            **out_attrs,
        )
        inits = [numpy_helper.from_array(q.codes, "W_codes"), numpy_helper.from_array(q.scales, "W_scales")]
        return _model([node], inits, m, k, n, [(ops.DOMAIN, ops.DOMAIN_VERSION)], outputs)

    return build


CASES = (
    Case("ORT FP32 MatMul", fp32_matmul),
    Case("ORT MatMulNBits 4b b32 acc4", matmul_nbits(4)),
    Case(BASELINE, int8_dynamic),
    Case("BCT BlockMatMul 4b b32 act float", block_matmul(4, 0), needs_library=True),
    Case("BCT BlockMatMul 4b b32 act int8", block_matmul(4, 8), needs_library=True),
    Case("BCT BlockMatMul 8b b32 act int8", block_matmul(8, 8), needs_library=True),
    Case("BCT BlockMatMul 4b b32 act int8, Y int8 codes", block_matmul(4, 8, out_bits=8), needs_library=True),
    Case(
        "BCT BlockMatMul 4b b32 act int8, GELU, Y int8 codes",
        block_matmul(4, 8, out_bits=8, epilogue="gelu"),
        needs_library=True,
    ),
)


# ONNX Runtime's intra-op workers spin while waiting for work (its default). On a machine whose cores
# are taken by other jobs a spinning worker uses up its share of the CPU and is seldom running when a
# parallel loop starts, so the calling thread does the loop alone: sampled with perf during 2-thread
# 4096 x 4096 GEMV chains here, the worker spent 3% of its samples in the BlockMatMul kernel and the
# rest spinning; without spinning, 97% in the kernel, as many samples as the calling thread (ONNX
# Runtime's MatMulNBits alike: no kernel samples on the worker with spinning). --no-spinning turns
# it off for every session of the run, ours and ONNX Runtime's alike.
SPINNING = {"enabled": True}


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not SPINNING["enabled"]:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(model: onnx.ModelProto, threads: int, with_library: bool) -> ort.InferenceSession:
    return runtime.session(
        model.SerializeToString(), sess_options=_session_options(), threads=threads, with_library=with_library
    )


def _clock(kind: str) -> Callable[[], float]:
    """Seconds: wall time, or the calling thread's CPU time (one intra-op thread runs on it)."""
    return time.thread_time if kind == "cpu" else time.perf_counter


def _interleaved(
    calls: list[Callable[[], object]], warmup: int, repeat: int, rounds: int, clock: Callable[[], float]
) -> list[list[float]]:
    """Times in ms per call; the calls take turns in `rounds` rounds (a rotating start) so that load
    changes on a shared machine hit every case alike."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    per_round = max(1, repeat // rounds)
    for r in range(rounds):
        for j in range(len(calls)):
            i = (r + j) % len(calls)
            for _ in range(per_round):
                start = clock()
                calls[i]()
                times[i].append((clock() - start) * 1e3)
    return times


def _parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    if not text:
        return SHAPES
    if text == "encoder":
        return ENCODER_SHAPES
    return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))  # type: ignore[misc]


def bench_shapes(args: argparse.Namespace, threads: int, have_library: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    clock = _clock(args.clock)
    results = []
    for m, k, n in _parse_shapes(args.shapes):
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        feed = {"A": rng.standard_normal((m, k)).astype(np.float32)}
        cases = [c for c in CASES if (have_library or not c.needs_library)]
        cases = [c for c in cases if c.label == BASELINE or args.only in c.label]
        models = [c.build(weight, m) for c in cases]
        sessions = [_session(model, threads, c.needs_library) for c, model in zip(cases, models)]
        # --compare-library: every BlockMatMul case again on the other build, in the same rounds
        for library in args.compare_library if have_library else []:
            for case, model in list(zip(cases, models)):
                if case.needs_library:
                    cases.append(dataclasses.replace(case, label=f"{case.label} [{library.name}]"))
                    sessions.append(_library_session(model, threads, library))
        # --compare-isa: every BlockMatMul case again with that path forced (read at kernel creation)
        for isa in args.compare_isa if have_library else []:
            for case, model in list(zip(cases, models)):
                if case.needs_library and "[" not in case.label:
                    with _forced_isa(isa):
                        session = _session(model, threads, True)
                    cases.append(dataclasses.replace(case, label=f"{case.label} [isa {isa}]"))
                    sessions.append(session)
        calls = [lambda s=s, f=feed: s.run(None, f) for s in sessions]
        times = _interleaved(calls, args.warmup, args.repeat, args.rounds, clock)
        base = statistics.median(times[[c.label for c in cases].index(BASELINE)])
        for case, t in zip(cases, times):
            ms = statistics.median(t)
            results.append(
                {
                    "M": m,
                    "K": k,
                    "N": n,
                    "case": case.label,
                    "median_ms": ms,
                    "min_ms": min(t),
                    "vs_int8": ms / base,
                }
            )
    return results


def gemv_set(
    k: int, n: int, bits: int, symmetric: bool, rows: int, min_bytes: int
) -> tuple[onnx.ModelProto, int, int]:
    """BlockMatMul [rows, k] x [k, n] (bits-bit block-32 weights, int8 activations) over distinct
    weights, at least min_bytes of them (so that they are read from memory, not cache), one after the
    other on the same input, their outputs concatenated; (model, weight bytes of one product, products).
    Any K x N, unlike compare_speed.gemv_chain (whose products feed each other, so K = N)."""
    rng = np.random.default_rng(k * n + bits)
    blocks = (k + 31) // 32
    codes = rng.integers(0, 256, (n, (k * bits + 7) // 8), dtype=np.uint8)
    scales = np.full((n, blocks), 1 / (5 * np.sqrt(k)), np.float16)
    zero_points = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8)
    per = codes.nbytes + scales.nbytes + (0 if symmetric else zero_points.nbytes)
    products = max(2, -(-min_bytes // per))
    nodes, inits = [], []
    for i in range(products):
        weights = [
            numpy_helper.from_array(codes, f"w{i}.codes"),
            numpy_helper.from_array(scales, f"w{i}.scales"),
        ]
        if not symmetric:
            weights.append(numpy_helper.from_array(zero_points, f"w{i}.zero_points"))
        inits += weights
        nodes.append(
            helper.make_node(
                ops.BLOCK_MATMUL,
                ["A"] + [w.name for w in weights],
                [f"y{i}"],
                domain=ops.DOMAIN,
                K=k,
                N=n,
                bits=bits,
                block_size=32,
                symmetric=int(symmetric),
                act_bits=8,
            )
        )
    nodes.append(helper.make_node("Concat", [f"y{i}" for i in range(products)], ["Y"], axis=0))
    model = _model(nodes, inits, rows, k, n, [(ops.DOMAIN, ops.DOMAIN_VERSION)])
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows * products, n])
    )
    return model, per, products


def _parse_gemv_shapes(text: str) -> list[tuple[int, int, int, bool]]:
    """KxNxBITS items, BITS with a trailing "a" for asymmetric weights (uint8 zero points)."""
    shapes = []
    for item in (v.strip().lower() for v in text.split(",") if v.strip()):
        k, n, bits = item.split("x")
        shapes.append((int(k), int(n), int(bits.rstrip("a")), not bits.endswith("a")))
    return shapes


@contextlib.contextmanager
def _forced_isa(isa: str) -> Iterator[None]:
    """BCT_ONNX_ISA=isa while sessions are created inside (kernels read it when created), then as before;
    "amx-emulated": the amx path with its tiles emulated (BCT_ONNX_AMX_EMULATE, for checking this tool)."""
    names = ("BCT_ONNX_ISA", "BCT_ONNX_AMX_EMULATE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["BCT_ONNX_ISA"] = "amx" if isa == "amx-emulated" else isa
    if isa == "amx-emulated":
        os.environ["BCT_ONNX_AMX_EMULATE"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _library_session(model: onnx.ModelProto, threads: int, library: Path | None) -> ort.InferenceSession:
    """A session with our ops from the installed library, or from `library` (another build)."""
    if library is None:
        return _session(model, threads, True)
    options = _session_options()
    options.register_custom_ops_library(str(library))
    return runtime.session(
        model.SerializeToString(), sess_options=options, threads=threads, with_library=False
    )


def bench_gemv(args: argparse.Namespace, threads_list: list[int], have_library: bool) -> list[dict]:
    """GB/s of weights for products over distinct weights (read from memory), for every row count,
    thread count and library build, and the read bandwidth of each thread count, all in the same rounds."""
    rows_list = [int(v) for v in args.gemv_rows.split(",") if v.strip()]
    if not rows_list:
        return []
    clock = _clock(args.clock)
    feeds_rng = np.random.default_rng(1)
    libraries: list[Path | None] = [None, *args.compare_library] if have_library else []
    megabytes = max(1, min(256, args.gemv_layers * args.gemv_k**2 // (1 << 21)))

    def lib_label(library: Path | None) -> str:
        return "" if library is None else f" [{library.name}]"

    cases: list[dict] = []  # label, call, bytes of one product, products per call, threads
    with contextlib.ExitStack() as stack:
        for threads in threads_list:
            read = stack.enter_context(contextlib.closing(compare_speed.StreamRead(threads, megabytes)))
            cases.append(
                {
                    "case": f"STREAM-like read, {threads} thr",
                    "call": read,
                    "bytes": read.nbytes,
                    "per": 1,
                    "threads": threads,
                    "read": True,
                }
            )
        for rows in rows_list:
            feed = {"A": feeds_rng.standard_normal((rows, args.gemv_k)).astype(np.float32)}
            for threads in threads_list:
                runs = [("ort", "ORT MatMulNBits 4b b32 acc4", None)]
                runs += [
                    ("bct", "BCT BlockMatMul 4b b32 act int8" + lib_label(lib), lib) for lib in libraries
                ]
                for kind, label, lib in runs:
                    model, size = compare_speed.gemv_chain(args.gemv_layers, args.gemv_k, kind, rows=rows)
                    session = (
                        _library_session(model, threads, lib)
                        if kind == "bct"
                        else _session(model, threads, False)
                    )
                    cases.append(
                        {
                            "case": f"M={rows} {args.gemv_k}x{args.gemv_k} {threads} thr {label}",
                            "call": lambda s=session, f=feed: s.run(None, f),
                            "bytes": size // args.gemv_layers,
                            "per": args.gemv_layers,
                            "threads": threads,
                        }
                    )
        for k, n, bits, symmetric in _parse_gemv_shapes(args.gemv_shapes) if libraries else []:
            for rows in rows_list:
                model, size, products = gemv_set(k, n, bits, symmetric, rows, args.gemv_set_mb << 20)
                feed = {"A": feeds_rng.standard_normal((rows, k)).astype(np.float32)}
                for threads in threads_list:
                    for lib in libraries:
                        session = _library_session(model, threads, lib)
                        shape = f"{k}x{n} {bits}b{'' if symmetric else ' asym'}"
                        cases.append(
                            {
                                "case": f"M={rows} {shape} {threads} thr BCT{lib_label(lib)}",
                                "call": lambda s=session, f=feed: s.run(None, f),
                                "bytes": size,
                                "per": products,
                                "threads": threads,
                            }
                        )
        times = _interleaved(
            [c["call"] for c in cases], 2, max(len(cases), args.repeat // 4), args.rounds, clock
        )
    read_times = {c["threads"]: t for c, t in zip(cases, times) if c.get("read")}
    rows_out = []
    for case, t in zip(cases, times):
        total = case["bytes"] * case["per"]
        gbps, best_gbps = total / (statistics.median(t) / 1e3) / 1e9, total / (min(t) / 1e3) / 1e9
        read = read_times[case["threads"]]
        read_bytes = next(c["bytes"] for c in cases if c.get("read") and c["threads"] == case["threads"])
        rows_out.append(
            {
                "case": case["case"],
                "threads": case["threads"],
                "median_ms": statistics.median(t) / case["per"],
                "gbps": gbps,
                "of_stream": gbps / (read_bytes / (statistics.median(read) / 1e3) / 1e9),
                "best_gbps": best_gbps,
                "best_of_stream": best_gbps / (read_bytes / (min(read) / 1e3) / 1e9),
            }
        )
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2; --clock cpu: 1)")
    parser.add_argument(
        "--gemv-threads",
        default="",
        help="intra-op thread counts of the bandwidth part, comma-separated, side by side (default --threads)",
    )
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per case (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="cases take turns in this many rounds (default 5)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or CPU time of the calling thread with one intra-op thread (default wall)",
    )
    parser.add_argument(
        "--only", default="", help="run only cases whose label contains this text (ORT int8 always runs)"
    )
    parser.add_argument(
        "--shapes", default="", help='comma-separated MxKxN, or "encoder" (default: the shapes above)'
    )
    parser.add_argument(
        "--gemv-rows", default="1,4,8", help="rows of the bandwidth chains, comma-separated ('' skips them)"
    )
    parser.add_argument("--gemv-layers", type=int, default=16, help="distinct weights per chain (default 16)")
    parser.add_argument(
        "--gemv-k", type=int, default=4096, help="K = N of the chains' weights (default 4096)"
    )
    parser.add_argument(
        "--gemv-shapes",
        default="",
        help="also BlockMatMul over distinct KxNxBITS weights (BITS + 'a': asymmetric), e.g. SmolLM2's "
        f"decode shapes {SMOLLM2_DECODE_SHAPES}",
    )
    parser.add_argument(
        "--gemv-set-mb", type=int, default=64, help="weights of each --gemv-shapes set, MB (default 64)"
    )
    parser.add_argument(
        "--compare-library",
        type=Path,
        action="append",
        default=[],
        help="another build of the custom-op library (e.g. main's) timed in the same rounds; repeatable",
    )
    parser.add_argument(
        "--compare-isa",
        action="append",
        default=[],
        help="every BlockMatMul product again with this instruction-set path forced (BCT_ONNX_ISA, e.g. "
        "avx512vnni on a CPU with AMX), timed in the same rounds; repeatable",
    )
    parser.add_argument(
        "--no-spinning",
        action="store_true",
        help="intra-op threads block instead of spinning while idle, in every session (see SPINNING)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    SPINNING["enabled"] = not args.no_spinning
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("onnxruntime", "onnxruntime.quantization", "root", "bct_onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        runtime.library_path()
        have_library = True
    except runtime.LibraryNotFoundError as err:
        logger.warning("custom-op library not found, BlockMatMul rows skipped: %s", err)
        have_library = False
    threads = 1 if args.clock == "cpu" else args.threads
    gemv_threads = [int(v) for v in args.gemv_threads.split(",") if v.strip()] or [threads]
    if args.clock == "cpu":
        gemv_threads = [1]
    flags = compare_speed.cpu_flags()
    results = bench_shapes(args, threads, have_library)
    gemv = bench_gemv(args, gemv_threads, have_library)

    clock = "CPU time of the calling thread" if args.clock == "cpu" else "wall time"
    print(f"\nCPU: {compare_speed.cpu_model()} ({os.cpu_count()} logical CPUs); flags: {' '.join(flags)}")
    print(f"ISA paths: {compare_speed.isa_paths(flags)}")
    print(
        f"onnxruntime {ort.__version__}, {threads} intra-op threads"
        f"{' (not spinning)' if args.no_spinning else ''}, {clock}, median of {args.repeat} warm runs "
        f"({args.rounds} interleaved rounds)\n"
    )
    print(f"| {'M x K x N':<16} | {'case':<34} | {'median ms':>9} | {'min ms':>8} | {'/ ORT int8':>10} |")
    print(f"|{'-' * 18}|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
    for row in results:
        shape = f"{row['M']} x {row['K']} x {row['N']}"
        print(
            f"| {shape:<16} | {row['case']:<34} | {row['median_ms']:>9.3f} | {row['min_ms']:>8.3f} "
            f"| {row['vs_int8']:>9.2f}x |"
        )
    if gemv:
        print(
            f"\nDecode: chains of {args.gemv_layers} distinct 4-bit block-32 K=N={args.gemv_k} weights, and sets "
            f"of distinct weights of --gemv-shapes (read from memory); ms per product and GB/s of weight bytes, "
            f"next to the read bandwidth of as many threads (numpy byte max) in the same rounds; from the "
            f"median and from the fastest round (on a shared machine: the rounds where no other job took a "
            f"core)\n"
        )
        width = max(len(row["case"]) for row in gemv)
        print(
            f"| {'case':<{width}} | {'ms':>7} | {'GB/s':>6} | {'of read':>7} | {'best GB/s':>9} | {'of best read':>12} |"
        )
        print(f"|{'-' * (width + 2)}|{'-' * 9}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 14}|")
        for row in gemv:
            print(
                f"| {row['case']:<{width}} | {row['median_ms']:>7.3f} | {row['gbps']:>6.1f} | {row['of_stream']:>6.0%} "
                f"| {row['best_gbps']:>9.1f} | {row['best_of_stream']:>11.0%} |"
            )
    if args.json:
        meta = {
            "onnxruntime": ort.__version__,
            "threads": threads,
            "spinning": not args.no_spinning,
            "clock": args.clock,
            "repeat": args.repeat,
            "rounds": args.rounds,
            "cpu": compare_speed.cpu_model(),
            "isa": compare_speed.isa_paths(flags),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results, "gemv": gemv}, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
