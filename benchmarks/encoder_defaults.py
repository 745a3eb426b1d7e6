"""Do the encoder defaults (bct_onnx/model_defaults.py: an 8x budget, float8e5m2 scales) generalise?

Three checks beyond the Austen labelled task of fidelity_minilm.py, each with default flags against
the previous fixed widths (``target_ratio=None, scale_kind="float16"``), compressed from a plain
.onnx (no tokenizer beside it: data-free), scored against FP32:

- ``minilm``: all-MiniLM-L6-v2 on sentences of another text, Moby-Dick (Debian r-cran-tokenizers),
  mean / min cosine of sentence embeddings; and where the compression time goes (report timings).
- ``bert-base``: a BERT-base-shaped encoder (12 x 768, vocab 30522) with random weights, cosine of
  last_hidden_state on random token ids.
- ``families``: the encoder graphs of every seed family (models/families.py), cosine of every float
  output on the family test's dummy inputs (tests/passes/test_families_e2e.py bounds: >= 0.97).

    python benchmarks/encoder_defaults.py [--only minilm,bert-base,families] [--sentences 300]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from bct_onnx.models import families, minilm
from bct_onnx.models.text_data import moby_dick_text

import bct_onnx

logger = logging.getLogger("encoder_defaults")

FIXED_WIDTHS = {"target_ratio": None, "scale_kind": "float16"}  # the encoder default before model kinds


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30))


def _compress(path: Path, out: Path, **overrides: Any) -> tuple[float, dict[str, float], Any]:
    start = time.perf_counter()
    _, report = bct_onnx.compress(path, out, **overrides)
    return time.perf_counter() - start, report.timings, report


def _row(inputs: str, label: str, report: Any, cosines: np.ndarray, seconds: float, timings: dict[str, float]) -> str:
    """One table row: inputs, config, ratio, mean (min) cosine, compress time with its longer steps."""
    steps = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if v >= 0.5)
    row = (
        f"| {inputs} | {label} | {report.compression_ratio:.2f}x | {cosines.mean():.4f} ({cosines.min():.4f}) | "
        f"{seconds:.0f} s ({steps}) |"
    )
    logger.info(row)
    return row


def moby_dick_sentences(count: int, min_words: int = 8, max_words: int = 40) -> list[str]:
    """Every ``len // count``-th sentence of Moby-Dick that has min_words..max_words words."""
    text = re.sub(r"\s+", " ", moby_dick_text())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    kept = [s for s in sentences if min_words <= len(s.split()) <= max_words]
    step = max(1, len(kept) // count)
    return kept[::step][:count]


def run_minilm(work: Path, sentences: int) -> list[str]:
    texts = moby_dick_sentences(sentences)
    fp32 = minilm.export(work / "fp32")
    plain = work / "plain"
    plain.mkdir()
    shutil.copy(fp32, plain / "model.onnx")  # no tokenizer beside it
    tokenizer = minilm.load_tokenizer()
    reference = minilm.embed(ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]), texts, tokenizer=tokenizer)
    rows = []
    for label, overrides in (("default flags", {}), ("fixed widths (--target-ratio none --scale-kind float16)", FIXED_WIDTHS)):
        out = work / f"minilm_{len(rows)}.onnx"
        seconds, timings, report = _compress(plain / "model.onnx", out, **overrides)
        got = minilm.embed(bct_onnx.session(out), texts, tokenizer=tokenizer)
        cos = (got * reference).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        rows.append(_row(f"MiniLM, {len(texts)} Moby-Dick sentences", label, report, cos, seconds, timings))
    return rows


def run_bert_base(work: Path) -> list[str]:
    import torch
    from bct_onnx.models.export import export_hf_directory
    from transformers import BertConfig, BertModel

    hf = work / "bert-base-hf"
    torch.manual_seed(0)
    BertModel(BertConfig()).eval().save_pretrained(hf)
    fp32 = export_hf_directory(hf, work / "bert-base-fp32", task="feature-extraction")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30522, (4, 128))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v for k, v in feeds.items() if k in names}
    (reference,) = session.run(["last_hidden_state"], feeds)
    rows = []
    for label, overrides in (("default flags", {}), ("fixed widths", FIXED_WIDTHS)):
        out = work / f"bert_{len(rows)}.onnx"
        seconds, timings, report = _compress(fp32, out, **overrides)
        (got,) = bct_onnx.session(out).run(["last_hidden_state"], feeds)
        tokens = np.array([_cosine(a, b) for a, b in zip(reference.reshape(-1, 768), got.reshape(-1, 768))])
        rows.append(_row("BERT-base shape, random weights, 4 x 128 random ids (per token)", label, report, tokens, seconds, timings))
    return rows


def run_families(work: Path) -> list[str]:
    rows = []
    for name, family in families.FAMILIES.items():
        if family.kind == "decoder":
            continue
        for path in families.export_tiny(name, work / name, with_past=False):
            if not path.name.startswith(("model", "encoder")):
                continue
            feeds = families.dummy_inputs(path)
            reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs = [o.name for o in reference.get_outputs()]
            expected = reference.run(outputs, feeds)
            for label, overrides in (("default flags", {}), ("fixed widths", FIXED_WIDTHS)):
                out = work / f"{name}_{path.stem}_{len(rows)}.onnx"
                seconds, _, report = _compress(path, out, **overrides)
                got = bct_onnx.session(out).run(outputs, feeds)
                cosines = [_cosine(a, b) for a, b in zip(expected, got) if a.dtype.kind == "f" and a.size]
                budget = "not applied" if report.budget is None or "skipped" in report.budget else "applied"
                rows.append(
                    f"| {name}/{path.name} | {label} (budget {budget}) | {report.compression_ratio:.2f}x | "
                    f"{min(cosines):.4f} (worst output) | {seconds:.0f} s |"
                )
                logger.info(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm,bert-base,families")
    parser.add_argument("--sentences", type=int, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = ["| model, inputs | config | ratio | mean cosine to FP32 (min) | compress time |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bct_encoder_defaults_") as tmp:
        work = Path(tmp)
        for key in args.only.split(","):
            target = work / key
            target.mkdir()
            if key == "minilm":
                rows += run_minilm(target, args.sentences)
            elif key == "bert-base":
                rows += run_bert_base(target)
            elif key == "families":
                rows += run_families(target)
            else:
                parser.error(f"unknown check {key!r}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
