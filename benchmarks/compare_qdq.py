"""Standard-ONNX output (format "qdq") against FP32 and the custom-op model, on the real models.

    python benchmarks/compare_qdq.py minilm            # cosine of sentence embeddings
    python benchmarks/compare_qdq.py smollm2 --tokens 4096   # perplexity on Austen (Emma)

Both compressed models use the same config (MatMul + Gather, 4-bit, block 32, act_bits 8, GPTQ on
the shipped text when a tokenizer is found), so their weights are the same codes. The qdq model
runs in a plain onnxruntime session WITHOUT the bct-onnx library, twice: with ONNX Runtime's
default options (it fuses DequantizeLinear + MatMul into MatMulNBits at accuracy level 4, i.e. it
quantizes activations to int8 itself) and with ``session.qdq_matmulnbits_accuracy_level=0``
(float activations: the weight-only model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import bct_onnx
from bct_onnx import model_io, runtime

CONFIG = {"ops": ["MatMul", "Gather"], "weight_bits": 4, "block_size": 32, "act_bits": 8}


def plain_session(path: Path, threads: int, accuracy_level: int | None = None) -> Any:
    """A session WITHOUT the bct-onnx library."""
    options = ort.SessionOptions()
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return runtime.session(path, sess_options=options, threads=threads, with_library=False, quiet=True)


def custom_session(path: Path, threads: int) -> Any:
    return runtime.session(path, threads=threads, quiet=True)


def interleaved_medians(sessions: dict[str, Any], feeds: dict[str, Any], runs: int) -> dict[str, float]:
    """Median ms per session, the sessions taking turns (one warm-up run each first)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def compress_both(source: Path, out_dir: Path, qdq_from_custom: bool = False) -> dict[str, Any]:
    """Compress source in both formats; qdq_from_custom converts the custom-op model instead of
    compressing (and calibrating) a second time: same codes, half the work."""
    sizes: dict[str, Any] = {"fp32": model_io.file_bytes(source), "qdq_from_custom": qdq_from_custom}
    seconds: dict[str, float] = {}
    for name, fmt in (("custom", "bct"), ("qdq", "qdq")):
        start = time.perf_counter()
        if fmt == "qdq" and qdq_from_custom:
            result = bct_onnx.compress(out_dir / "custom.onnx", out_dir / "qdq.onnx", format="qdq", calibration="none")
        else:
            result = bct_onnx.compress(source, out_dir / f"{name}.onnx", format=fmt, **CONFIG)
        seconds[name] = round(time.perf_counter() - start, 1)
        sizes[name] = result.report.output_bytes
        if fmt == "qdq":
            sizes["qdq_report"] = result.report.standard_onnx
        sizes[f"{name}_calibration"] = result.report.calibration.get("method")
    start = time.perf_counter()
    result = bct_onnx.compress(
        out_dir / "custom.onnx", out_dir / "qdq_act.onnx", format="qdq", qdq_activations=True, calibration="none"
    )
    seconds["qdq + activations (from custom)"] = round(time.perf_counter() - start, 1)
    sizes["qdq + activations"] = result.report.output_bytes
    sizes["compress_seconds"] = seconds
    return sizes


def minilm(threads: int, qdq_from_custom: bool) -> dict[str, Any]:
    from bct_onnx.models import minilm as m

    sentences = m.sentences()
    tokenizer = m.load_tokenizer()
    with tempfile.TemporaryDirectory(prefix="bct_qdq_minilm_") as tmp:
        source = m.export(Path(tmp) / "fp32")
        info = compress_both(source, Path(tmp), qdq_from_custom)
        sessions = {
            "fp32": plain_session(source, threads),
            "custom": custom_session(Path(tmp) / "custom.onnx", threads),
            "qdq (ORT default)": plain_session(Path(tmp) / "qdq.onnx", threads),
            "qdq (accuracy level 0)": plain_session(Path(tmp) / "qdq.onnx", threads, accuracy_level=0),
            "qdq + activations (accuracy level 0)": plain_session(Path(tmp) / "qdq_act.onnx", threads, accuracy_level=0),
        }
        emb = {name: m.embed(s, sentences, tokenizer=tokenizer) for name, s in sessions.items()}
        encoded = tokenizer(sentences[:8], padding=True, truncation=True, max_length=256, return_tensors="np")
        names = {i.name for i in sessions["fp32"].get_inputs()}
        feeds = {k: v.astype("int64") for k, v in encoded.items() if k in names}
        latency = interleaved_medians(sessions, feeds, runs=10)
    rows = {}
    for name in sessions:
        if name == "fp32":
            continue
        vs_fp32 = np.sum(emb[name] * emb["fp32"], axis=1)
        vs_custom = np.sum(emb[name] * emb["custom"], axis=1)
        rows[name] = {
            "cosine_vs_fp32_mean": round(float(vs_fp32.mean()), 5),
            "cosine_vs_fp32_min": round(float(vs_fp32.min()), 5),
            "cosine_vs_custom_mean": round(float(vs_custom.mean()), 5),
        }
    return {
        "model": "all-MiniLM-L6-v2", "sentences": len(sentences), **info, "rows": rows,
        "latency_ms_batch8_median": latency, "threads": threads,
    }


def smollm2(threads: int, tokens: int, qdq_from_custom: bool) -> dict[str, Any]:
    from bct_onnx.models.perplexity import onnx_logits_fn, perplexity_of_ids

    from bct_onnx.evaluate import evaluation_ids, fp32_perplexity, known_model_export, load_tokenizer

    source = known_model_export("smollm2")
    tokenizer = load_tokenizer(source.parent)
    ids = evaluation_ids(tokenizer, tokens)
    window, stride = 512, 256
    fp32, _ = fp32_perplexity(source, source.parent, ids, "emma", window, stride, threads, True)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bct_qdq_smollm2_") as tmp:
        info = compress_both(source, Path(tmp), qdq_from_custom)
        logits: dict[str, Any] = {}
        for name, make in (
            ("custom", lambda: custom_session(Path(tmp) / "custom.onnx", threads)),
            ("qdq (ORT default)", lambda: plain_session(Path(tmp) / "qdq.onnx", threads)),
            ("qdq (accuracy level 0)", lambda: plain_session(Path(tmp) / "qdq.onnx", threads, accuracy_level=0)),
        ):
            session = make()
            start = time.perf_counter()
            ppl = perplexity_of_ids(ids, onnx_logits_fn(session), window=window, stride=stride).perplexity
            first = np.asarray(ids[:128], dtype=np.int64)[None, :]
            logits[name] = onnx_logits_fn(session)(first)[0]
            rows[name] = {"perplexity": round(float(ppl), 4), "eval_seconds": round(time.perf_counter() - start, 1)}
            del session
    for name, values in logits.items():
        if name != "custom":
            same = float(np.mean(np.argmax(values, -1) == np.argmax(logits["custom"], -1)))
            rows[name]["top1_agreement_with_custom_128_tokens"] = round(same, 4)
    return {"model": "SmolLM2-135M", "tokens": int(ids.size), "fp32_perplexity": round(float(fp32), 4), **info, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["minilm", "smollm2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--qdq-from-custom", action="store_true",
        help="make the qdq model by converting the custom-op one (same codes, one GPTQ run)",
    )
    args = parser.parse_args(argv)
    data = minilm(args.threads, args.qdq_from_custom) if args.model == "minilm" else smollm2(args.threads, args.tokens, args.qdq_from_custom)
    data["config"] = CONFIG
    text = json.dumps(data, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
