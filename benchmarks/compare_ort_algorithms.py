"""bct-onnx's quality against ONNX Runtime's own 4-bit algorithms, on the same plain .onnx files.

ONNX Runtime's MatMulNBitsQuantizer offers several ways to choose 4-bit codes for MatMul weights:
RTN (its default, round to nearest), HQQ (half-quadratic scale/zero optimisation), k-quant (llama.cpp's
k-quant search) and GPTQ (calibrated). Each is run here on the export bct-onnx compresses, at block 32,
asymmetric (ONNX Runtime's default), with the embedding table quantized too (GatherBlockQuantized,
plain RTN: the algorithms quantize MatMuls only) after the opset-21 conversion that
GatherBlockQuantized needs. GPTQ calibrates on the same public-domain text bct-onnx's ``--tokenizer``
calibration uses (bct_onnx.calibration's shipped text), never on the evaluation text.

    python benchmarks/compare_ort_algorithms.py minilm   # cosine + Austen novel task, 600 sentences
    python benchmarks/compare_ort_algorithms.py smollm2 [--tokens 1024]   # perplexity on Austen

Rows: FP32, ORT RTN / HQQ / k-quant / GPTQ, bct-onnx default data-free (no tokenizer beside the file)
and bct-onnx default with ``--tokenizer``. Sizes are whole files (graph + external data).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from bct_onnx.models import labelled_task, minilm

import bct_onnx
from bct_onnx import evaluate, model_io
from bct_onnx.calibration import calibration_texts, text_feeds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_minilm import fp32_embeddings, plain_onnx

logger = logging.getLogger("compare_ort_algorithms")

ORT_ALGORITHMS = ("rtn", "hqq", "k_quant", "gptq")
BLOCK = 32
CALIBRATION_BATCHES = 8  # GPTQ batches from the shipped calibration text


@dataclasses.dataclass
class Row:
    label: str
    size_bytes: int = 0
    ratio: float = 0.0
    quality: str = ""
    seconds: float = 0.0
    error: str | None = None


def _algo_config(algo: str, reader: Any) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if algo == "rtn":
        return nbits.RTNWeightOnlyQuantConfig()
    if algo == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4)
    if algo == "k_quant":
        return nbits.KQuantWeightOnlyQuantConfig()
    if algo == "gptq":
        return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=BLOCK)
    raise ValueError(f"unknown ONNX Runtime algorithm {algo!r}")


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over bct-onnx's calibration batches."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0

    def __iter__(self) -> Any:  # ONNX Runtime's GPTQ iterates over the reader
        return iter(self.feeds)


def calibration_batches(fp32: Path, tokenizer_dir: Path) -> list[dict[str, np.ndarray]]:
    """The batches bct-onnx's text calibration would use (shipped text), as plain feed dicts."""
    from bct_onnx.tokenizer import load_text_tokenizer

    texts, max_tokens, _ = calibration_texts("shipped")
    calibration = text_feeds(model_io.load(fp32), load_text_tokenizer(tokenizer_dir), texts, max_length=max_tokens)
    return [dict(batch) for batch in calibration.feeds[:CALIBRATION_BATCHES]]


def build_ort(fp32: Path, dst: Path, algo: str, batches: list[dict[str, np.ndarray]]) -> None:
    """MatMul weights by ``algo``, then the embedding tables by RTN (GatherBlockQuantized), opset 21."""
    from onnx import version_converter
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = version_converter.convert_version(onnx.load(str(fp32)), 21)
    reader = _Reader(batches) if algo == "gptq" else None
    matmuls = MatMulNBitsQuantizer(
        model, bits=4, block_size=BLOCK, is_symmetric=False, op_types_to_quantize=("MatMul",),
        algo_config=_algo_config(algo, reader),
    )
    matmuls.process()
    tables = MatMulNBitsQuantizer(
        matmuls.model.model, bits=4, block_size=BLOCK, is_symmetric=False, op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),
    )
    tables.process()
    tables.model.save_model_to_file(str(dst), use_external_data_format=False)
    counts: dict[str, int] = {}
    for node in onnx.load(str(dst), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("MatMulNBits"):
        raise RuntimeError(f"{algo}: MatMulNBitsQuantizer wrote no MatMulNBits node")
    logger.info("%s: MatMulNBits %d, GatherBlockQuantized %d, MatMul left %d", algo, counts.get("MatMulNBits", 0),
                counts.get("GatherBlockQuantized", 0), counts.get("MatMul", 0))


def variants(fp32: Path, tokenizer_dir: Path, batches: list[dict[str, np.ndarray]]) -> list[tuple[str, Callable[[Path], None]]]:
    rows: list[tuple[str, Callable[[Path], None]]] = [
        (f"ONNX Runtime 4-bit {algo} (b{BLOCK} asym, MatMulNBits + GatherBlockQuantized)",
         lambda dst, algo=algo: build_ort(fp32, dst, algo, batches))
        for algo in ORT_ALGORITHMS
    ]
    rows.append(("bct-onnx default, no tokenizer (data-free)", lambda dst: bct_onnx.compress(fp32, dst)))
    rows.append(
        ("bct-onnx default, --tokenizer", lambda dst: bct_onnx.compress(fp32, dst, tokenizer=tokenizer_dir))
    )
    return rows


def run_minilm(work: Path, threads: int, only: set[str] | None) -> tuple[list[Row], str]:
    task = labelled_task.austen_novel_task()
    tokenizer = minilm.load_tokenizer()
    fp32 = plain_onnx(work)
    fp32_session = bct_onnx.session(fp32, threads=threads)
    fp32_train, fp32_test = fp32_embeddings(work, fp32_session, task, tokenizer)
    head = labelled_task.train_logistic_head(fp32_train, task.train_labels, len(task.label_names))
    batches = calibration_batches(fp32, minilm.model_dir())

    def quality(path: Path) -> str:
        test = minilm.embed(bct_onnx.session(path, threads=threads), list(task.test_texts), tokenizer=tokenizer)
        score = labelled_task.score(head, fp32_test, test, task.test_labels)
        return (f"cosine {score.mean_cosine:.4f} (min {score.min_cosine:.4f}), accuracy "
                f"{100 * score.fp32_accuracy:.1f}% -> {100 * score.compressed_accuracy:.1f}% ({score.drop_points:+.2f} pt)")

    rows = _measure(fp32, variants(fp32, minilm.model_dir(), batches), work, quality, only)
    title = (f"all-MiniLM-L6-v2 as a plain .onnx, {len(task.test_texts)} unseen Austen sentences "
             f"(novel task, head trained on {len(task.train_texts)} FP32 embeddings)")
    return rows, title


def run_smollm2(work: Path, threads: int, tokens: int, only: set[str] | None) -> tuple[list[Row], str]:
    from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids

    fp32, tokenizer_dir = evaluate.resolve_model("smollm2", None)
    plain = work / "plain"
    plain.mkdir(exist_ok=True)
    for path in fp32.parent.iterdir():  # the graph and its data alone: no tokenizer beside it
        if path.suffix in (".onnx", ".data", ".onnx_data") or path.name.endswith(".onnx.data"):
            target = plain / path.name
            if not target.exists():
                target.symlink_to(path)
    fp32 = plain / fp32.name
    ids = evaluate.evaluation_ids(evaluate.load_tokenizer(tokenizer_dir), tokens, evaluate.DEFAULT_BOOK, None)
    base = perplexity_of_ids(ids, onnx_logits_fn(bct_onnx.session(fp32, threads=threads)), window=512, stride=256)
    batches = calibration_batches(fp32, tokenizer_dir)

    def quality(path: Path) -> str:
        ppl = perplexity_of_ids(ids, onnx_logits_fn(bct_onnx.session(path, threads=threads)), window=512, stride=256)
        return f"perplexity {ppl.perplexity:.3f} ({100 * (ppl.perplexity / base.perplexity - 1):+.1f}%)"

    rows = _measure(fp32, variants(fp32, tokenizer_dir, batches), work, quality, only)
    title = (f"SmolLM2-135M as a plain .onnx (no KV cache), perplexity on {ids.size} tokens of "
             f"{evaluate.DEFAULT_BOOK} (window 512, stride 256); FP32 {base.perplexity:.3f}")
    return rows, title


def _measure(
    fp32: Path, chosen: list[tuple[str, Callable[[Path], None]]], work: Path, quality: Callable[[Path], str],
    only: set[str] | None,
) -> list[Row]:
    fp32_bytes = model_io.file_bytes(fp32)
    rows = [Row("FP32", fp32_bytes, 1.0, "reference")]
    for index, (label, build) in enumerate(chosen):
        if only is not None and not any(key in label for key in only):
            continue
        row = Row(label)
        dst = work / f"variant{index}" / "model.onnx"
        dst.parent.mkdir(exist_ok=True)
        try:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(dst)
            row.seconds = time.perf_counter() - start
            row.size_bytes = model_io.file_bytes(dst)
            row.ratio = fp32_bytes / row.size_bytes
            row.quality = quality(dst)
        except Exception as exc:  # noqa: BLE001 - report the row, measure the others
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        logger.info("%s", row)
        rows.append(row)
    return rows


def markdown(rows: list[Row], title: str) -> str:
    lines = [title, "", "| variant | size | ratio | quality | build time |", "|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.label} | failed: {row.error} | | | |")
        else:
            lines.append(f"| {row.label} | {row.size_bytes / 1e6:.1f} MB | {row.ratio:.2f}x | {row.quality} "
                         f"| {row.seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--tokens", type=int, default=1024, help="smollm2: evaluation tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated substrings of the row labels to run (e.g. 'hqq,bct')")
    parser.add_argument("--out-dir", type=Path, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    only = {key.strip() for key in args.only.split(",")} if args.only else None
    with contextlib.ExitStack() as stack:
        if args.out_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bct_ort_algorithms_")))
        else:
            work = args.out_dir
            work.mkdir(parents=True, exist_ok=True)
        if args.model == "minilm":
            rows, title = run_minilm(work, args.threads, only)
        else:
            rows, title = run_smollm2(work, args.threads, args.tokens, only)
    print(markdown(rows, title))
    return 0 if all(row.error is None for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
