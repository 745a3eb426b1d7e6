"""SmolLM2-135M: whole-file ratio and perplexity on Austen for config variants, FP32 alongside.

Compresses the cached FP32 export (bct_onnx.evaluate.known_model_export) with each ``--set`` group
of CompressConfig fields and scores both models by ``perplexity_of_ids`` on the first ``--tokens``
tokens of *Pride and Prejudice* (windows of 512, stride 256). Data-free unless ``--calibration
auto`` (GPTQ and budget sensitivities on the shipped calibration text, never Austen).

    python benchmarks/fidelity_smollm2.py --tokens 512 --variant "" --variant "target_ratio=6.0"
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids

import bct_onnx
from bct_onnx import evaluate, model_io
from bct_onnx.runtime import session


def parse_fields(text: str) -> dict[str, Any]:
    """'a=1,b=float16' -> {'a': 1, 'b': 'float16'} (values are Python literals, else strings)."""
    fields: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, raw = item.partition("=")
        try:
            fields[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            fields[name] = raw
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--variant", action="append", default=[], help="CompressConfig fields, e.g. 'target_ratio=6.0'")
    parser.add_argument("--calibration", default="none", choices=("auto", "none"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    path, tokenizer_dir = evaluate.resolve_model("smollm2", None)
    tokenizer = evaluate.load_tokenizer(tokenizer_dir)
    ids = evaluate.evaluation_ids(tokenizer, args.tokens, evaluate.DEFAULT_BOOK, None)
    fp32 = perplexity_of_ids(ids, onnx_logits_fn(session(path, threads=args.threads)), window=512, stride=256)
    print(f"FP32 perplexity {fp32.perplexity:.4f} on {ids.size} tokens", flush=True)
    for variant in args.variant or [""]:
        with tempfile.TemporaryDirectory(prefix="bct_fidelity_smollm2_") as tmp:
            out = Path(tmp) / "model.onnx"
            start = time.perf_counter()
            _, report = bct_onnx.compress(
                path, out, calibration=args.calibration, tokenizer=tokenizer_dir, **parse_fields(variant)
            )
            seconds = time.perf_counter() - start
            ppl = perplexity_of_ids(ids, onnx_logits_fn(session(out, threads=args.threads)), window=512, stride=256)
            ratio = model_io.file_bytes(path) / model_io.file_bytes(out)
        change = 100 * (ppl.perplexity / fp32.perplexity - 1)
        print(
            f"| {variant or 'default'} | {args.calibration} | {ratio:.2f}x | {ppl.perplexity:.4f} | {change:+.2f}% "
            f"| {seconds:.0f} s |",
            flush=True,
        )
        for line in report.summary().splitlines():
            if line.startswith("budget:"):
                print(f"    {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
