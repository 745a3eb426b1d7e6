"""Fused attention (BlockAttention) against the unfused chain, side by side in one process.

From one FP32 export per model, compresses twice with the default config, once with
``fuse_attention=False`` (BlockActMatMul -> scale/mask -> BlockSoftmax -> BlockActMatMul) and once
with it (one BlockAttention per layer); no calibration, so the weights are the same in both. Then
times FP32, unfused and fused in interleaved rounds (every round runs each once, in a rotating
order) and reports node counts and accuracy:

  minilm       all-MiniLM-L6-v2, batch 8 x 64 tokens (real sentences, padded: the key-padding mask
               is exercised); cosine of the mean-pooled embeddings to FP32 over the shipped sentences
  smollm2      SmolLM2-135M exported with KV cache: one decode step after 128 tokens of Austen text
               (the past comes from FP32's own prefill); cosine of the step's logits to FP32, and
               perplexity of the no-KV-cache export on the same book (prefill attention, causal mask)

    python benchmarks/compare_attention.py [--threads 2] [--runs 30] [--only minilm,smollm2]
        [--ppl-tokens 1024]

Prints a markdown table with the CPU model and ISA; docs/results.md keeps the figures of a run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts (benchmarks/ is no package)
import compare_speed
from bct_onnx.passes import compress_model

from bct_onnx import ops, runtime
from bct_onnx.config import CompressConfig

logger = logging.getLogger("compare_attention")
VARIANTS = ("fp32", "unfused", "fused")


def compress_both(src: Path, work: Path, stem: str) -> dict[str, Path]:
    """FP32 path plus the two compressed variants (same weights: no calibration)."""
    model = ir.load(str(src))
    paths = {"fp32": src}
    for key, fuse in (("unfused", False), ("fused", True)):
        result = compress_model(model, CompressConfig(fuse_attention=fuse))
        paths[key] = work / f"{stem}-{key}.onnx"
        ir.save(result.model, str(paths[key]), external_data=f"{stem}-{key}.onnx.data")
    return paths


def node_counts(path: Path) -> tuple[int, int]:
    """(nodes, BlockAttention nodes) of a model file."""
    model = ir.load(str(path))
    nodes = list(model.graph)
    return len(nodes), sum(n.op_type == ops.BLOCK_ATTENTION for n in nodes)


def sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    return {key: compare_speed._session(path, key != "fp32", threads) for key, path in paths.items()}


def minilm_case(work: Path, threads: int, runs: int) -> dict[str, dict[str, Any]]:
    from bct_onnx.models import minilm

    paths = compress_both(minilm.export(work / "minilm"), work, "minilm")
    sess = sessions(paths, threads)
    tokenizer = minilm.load_tokenizer()
    texts = minilm.sentences()
    batch = tokenizer(texts[:8], padding="max_length", truncation=True, max_length=64, return_tensors="np")
    declared = {i.name for i in sess["fp32"].get_inputs()}
    feeds = {k: np.asarray(v, np.int64) for k, v in batch.items() if k in declared}
    medians = compare_speed.interleaved_medians([(sess[k], feeds) for k in VARIANTS], runs, 3)
    embeddings = {k: minilm.embed(sess[k], texts, tokenizer) for k in VARIANTS}
    rows: dict[str, dict[str, Any]] = {}
    for key, ms in zip(VARIANTS, medians, strict=True):
        nodes, fused = node_counts(paths[key])
        cosine = float(np.mean(np.sum(embeddings[key] * embeddings["fp32"], axis=1)))
        rows[key] = {"ms": ms, "nodes": nodes, "attention ops": fused, "accuracy": f"cosine {cosine:.4f}"}
    rows["_note"] = {"text": f"{len(texts)} shipped sentences for the cosine; timing batch 8 x 64 (padded)"}
    return rows


def _prefill_past(session: Any, ids: np.ndarray, head_dim: int) -> dict[str, np.ndarray]:
    """present.* of FP32 after the prompt ids (1, T): the past of the next decode step."""
    feeds = compare_speed.decoder_feeds(session, ids.shape[1], 0, head_dim)
    feeds["input_ids"] = ids
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(None, feeds)
    return {
        name.replace("present", "past_key_values"): value
        for name, value in zip(outputs, values, strict=True)
        if name.startswith("present")
    }


def _smollm2_export(work: Path, with_past: bool) -> Path:
    """The cached FP32 export (models/smollm2.py's default folders) or a fresh one."""
    from bct_onnx.models import smollm2
    from bct_onnx.models.cache import cache_dir

    cached = cache_dir() / ("smollm2-onnx-f32-past" if with_past else "smollm2-onnx-f32") / "model.onnx"
    if cached.is_file():
        return cached
    return smollm2.export(work / ("smollm2-past" if with_past else "smollm2"), with_past=with_past)


def smollm2_case(work: Path, threads: int, runs: int, ppl_tokens: int) -> dict[str, dict[str, Any]]:
    from bct_onnx.models import smollm2
    from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids

    from bct_onnx.evaluate import evaluation_ids

    hf = smollm2.hf_dir()
    head_dim = compare_speed._head_dim(hf)
    tokenizer = smollm2.load_tokenizer()
    ids = evaluation_ids(tokenizer, max(ppl_tokens, 129), calibration_text=None)
    past_paths = compress_both(_smollm2_export(work, True), work, "smollm2-past")
    sess = sessions(past_paths, threads)
    past = _prefill_past(sess["fp32"], ids[None, :128], head_dim)
    step = compare_speed.decoder_feeds(sess["fp32"], 1, 128, head_dim)
    step.update(past)
    step["input_ids"] = ids[None, 128:129]
    medians = compare_speed.interleaved_medians([(sess[k], step) for k in VARIANTS], runs, 3)
    logits = {k: sess[k].run(["logits"], step)[0].reshape(-1).astype(np.float64) for k in VARIANTS}
    plain_paths = compress_both(_smollm2_export(work, False), work, "smollm2")
    plain = sessions(plain_paths, threads)
    ppl = {k: perplexity_of_ids(ids[:ppl_tokens], onnx_logits_fn(plain[k]), window=256).perplexity for k in VARIANTS}
    rows: dict[str, dict[str, Any]] = {}
    for key, ms in zip(VARIANTS, medians, strict=True):
        nodes, fused = node_counts(past_paths[key])
        ref = logits["fp32"]
        cosine = float(logits[key] @ ref / (np.linalg.norm(logits[key]) * np.linalg.norm(ref)))
        rows[key] = {
            "ms": ms,
            "nodes": nodes,
            "attention ops": fused,
            "accuracy": f"step logits cosine {cosine:.5f}; perplexity {ppl[key]:.3f}",
        }
    rows["_note"] = {
        "text": f"decode step after 128 tokens of Austen (past from FP32's prefill); perplexity of the "
        f"no-KV-cache export, {ppl_tokens} tokens, window 256 (stride 128)"
    }
    return rows


def markdown(title: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"**{title}**", "", "| variant | median ms | ratio to unfused | nodes | BlockAttention | accuracy |"]
    lines.append("|---|---|---|---|---|---|")
    base = rows["unfused"]["ms"]
    for key in VARIANTS:
        r = rows[key]
        lines.append(
            f"| {key} | {r['ms']:.2f} | {r['ms'] / base:.2f} | {r['nodes']} | {r['attention ops']} | {r['accuracy']} |"
        )
    lines += ["", rows["_note"]["text"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only", default="minilm,smollm2")
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    flags = compare_speed.cpu_flags()
    print(f"CPU: {compare_speed.cpu_model()}; flags: {' '.join(flags)}")
    print(compare_speed.isa_paths(flags))
    print(f"{args.threads} intra-op threads, {args.runs} interleaved rounds (median)\n")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bct_attention_") as tmp:
        work = Path(tmp)
        if "minilm" in only:
            print(markdown("all-MiniLM-L6-v2, batch 8 x 64", minilm_case(work, args.threads, args.runs)))
        if "smollm2" in only:
            rows = smollm2_case(work, args.threads, args.runs, args.ppl_tokens)
            print(markdown("SmolLM2-135M, decode step after 128 tokens (KV cache)", rows))
    runtime.library_path()  # the library every custom-op session above loaded
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
