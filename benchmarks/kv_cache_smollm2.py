"""SmolLM2-135M with its KV cache float, 8-bit and 4-bit: bytes per token, perplexity, decode-step time.

    python benchmarks/kv_cache_smollm2.py [--tokens 1024] [--kv-step 1] [--threads 2] [--tiny]

One bct-onnx compression (default config, default calibration on the shipped non-Austen text) with a
float cache; the 8-bit and 4-bit cache variants are that same model with CompressKVCachePass applied
(the pass only rewrites the cache inputs/outputs, so the weights are identical across variants).
Perplexity goes through the with-past graph, ``--kv-step`` tokens per call (1: every prediction is a
decode step over the stored cache), on the first ``--tokens`` tokens of Pride and Prejudice
(models/text_data.py), window 512, stride 256. Decode-step latency: one new token after 128 cached
tokens, all variants and FP32 timed in one process, interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts (benchmarks/ is no package)
import compare_speed
from bct_onnx.models import families
from bct_onnx.models.perplexity import onnx_cached_logits_fn, perplexity_of_ids
from bct_onnx.passes import CompressKVCachePass

import bct_onnx
from bct_onnx import kv_cache
from bct_onnx.config import CompressConfig
from bct_onnx.evaluate import evaluation_ids, known_model_export, load_tokenizer
from bct_onnx.tokenizer import find_tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--kv-step", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--calibration", default="auto", choices=("auto", "none"))
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (a smoke run)")
    parser.add_argument("--no-perplexity", action="store_true", help="sizes and decode-step times only")
    parser.add_argument(
        "--work", type=Path, help="keep the models here; a compressed model found here is reused"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bct_kv_bench_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            fp32 = families.export_tiny("llama", work / "tiny", with_past=True)[0]
        else:
            fp32 = known_model_export("smollm2", with_past=True)
        tokenizer_dir = find_tokenizer_dir(fp32.parent)
        if not (work / "bct_float_cache.onnx").is_file():
            start = time.perf_counter()
            bct_onnx.compress(
                fp32, work / "bct_float_cache.onnx", kv_cache_bits=None, calibration=args.calibration
            )
            print(f"compress (float cache): {time.perf_counter() - start:.1f} s", flush=True)
        paths = {"FP32": fp32, "bct, float cache": work / "bct_float_cache.onnx"}
        for bits in (8, 4):
            model = ir.load(paths["bct, float cache"])
            result = CompressKVCachePass(CompressConfig(kv_cache_bits=bits))(model)
            assert result.rewritten, result.skipped
            paths[f"bct, {bits}-bit cache"] = work / f"bct_kv{bits}.onnx"
            ir.save(model, paths[f"bct, {bits}-bit cache"])
        sessions = {
            label: compare_speed._session(path, custom=label != "FP32", threads=args.threads)
            for label, path in paths.items()
        }
        per_token = {label: kv_cache.bytes_per_token(s.get_inputs()) for label, s in sessions.items()}

        ppl: dict[str, float] = {}
        if tokenizer_dir is not None and not args.tiny and not args.no_perplexity:
            ids = evaluation_ids(load_tokenizer(tokenizer_dir), args.tokens, calibration_text="auto")
            for label, session in sessions.items():
                start = time.perf_counter()
                fn = onnx_cached_logits_fn(session, args.kv_step)
                ppl[label] = perplexity_of_ids(
                    ids, fn, window=args.window, stride=args.window // 2
                ).perplexity
                print(
                    f"perplexity {label}: {ppl[label]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True
                )

        head_dim = next(
            fmt.head_dim for fmt in kv_cache.session_formats(sessions["bct, 8-bit cache"]).values()
        )
        runs = [(s, compare_speed.decoder_feeds(s, 1, args.past, head_dim)) for s in sessions.values()]
        medians = compare_speed.interleaved_medians(runs, rounds=args.rounds, warmup=3)

    print(
        f"\n| SmolLM2-135M{' (tiny)' if args.tiny else ''} | KV cache bytes per token | vs float | "
        f"perplexity ({args.tokens} tokens, {args.kv_step} per call) | decode step after {args.past} "
        f"(ms, {args.threads} threads) |"
    )
    print("|---|---|---|---|---|")
    float_bytes = per_token["FP32"]
    for (label, bytes_), median in zip(per_token.items(), medians, strict=True):
        value = f"{ppl[label]:.4f}" if label in ppl else "-"
        print(f"| {label} | {bytes_:,} | {float_bytes / bytes_:.2f}x | {value} | {median:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
