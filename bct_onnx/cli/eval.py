"""`bct-onnx eval MODEL`: a decoder's perplexity, FP32 vs compressed, on Jane Austen (bct_onnx/evaluate.py)."""

from __future__ import annotations

import argparse
from typing import Any

from bct_onnx.cli import flags
from bct_onnx.evaluate import DEFAULT_BOOK, KNOWN_MODELS, evaluate

MODEL_HELP = f"a known model ({', '.join(KNOWN_MODELS)}) or a decoder .onnx file"


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "eval",
        help="perplexity of a decoder, FP32 vs compressed, on real English text (Jane Austen)",
        description="Compress a decoder and compare its perplexity with FP32 on an Austen novel "
        "(Debian r-cran-janeaustenr); calibration (GPTQ) uses the shipped non-Austen text.",
    )
    parser.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP} (without KV cache unless --kv-cache)")
    flags.add_compression_flags(parser)
    flags.add_calibration_flags(parser)
    flags.add_threads_flag(parser)
    flags.add_json_flag(parser)
    parser.add_argument(
        "--tokens", type=flags.positive_int, default=4096, metavar="N", help="tokens of text scored (default: 4096)"
    )
    parser.add_argument(
        "--window", type=flags.positive_int, default=512, metavar="N", help="tokens per window (default: 512)"
    )
    parser.add_argument(
        "--stride", type=flags.positive_int, default=None, metavar="N", help="window step (default: window/2)"
    )
    parser.add_argument("--book", default=DEFAULT_BOOK, help=f"Austen novel (default: {DEFAULT_BOOK})")
    parser.add_argument("--keep", metavar="PATH", help="also write the compressed model here")
    parser.add_argument(
        "--no-fp32-cache", action="store_true", help="recompute the FP32 perplexity even if cached"
    )
    parser.add_argument(
        "--kv-cache",
        action="store_true",
        help="score through the with-past export, feeding its KV cache back (float in FP32, compressed as "
        "--kv-cache-bits says in the compressed model)",
    )
    parser.add_argument(
        "--kv-step",
        type=flags.positive_int,
        default=1,
        metavar="N",
        help="with --kv-cache: tokens per call (default: 1, every prediction a decode step)",
    )
    flags.add_common_flags(parser)
    parser.set_defaults(handler=run, subparser=parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    result = evaluate(
        args.model,
        flags.config_from_flags(args, parser),
        tokenizer=args.tokenizer,
        calibration=args.calibration,
        calibration_text=args.calibration_text,
        tokens=args.tokens,
        window=args.window,
        stride=args.stride,
        book=args.book,
        threads=args.threads,
        keep=args.keep,
        fp32_cache=not args.no_fp32_cache,
        progress=flags.show_progress(args),
        kv_cache=args.kv_cache,
        kv_step=args.kv_step,
    )
    print(result.summary(), flush=True)
    if args.json:
        flags.write_json(result.to_dict(), args.json)
    return 0
