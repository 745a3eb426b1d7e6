"""`bct-onnx generate MODEL --prompt TEXT`: greedy text, FP32 and compressed side by side (bct_onnx/evaluate.py)."""

from __future__ import annotations

import argparse
from typing import Any

from bct_onnx.cli import flags
from bct_onnx.cli.eval import MODEL_HELP
from bct_onnx.evaluate import generate


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "generate",
        help="greedy text generation through ONNX Runtime, FP32 and compressed side by side",
        description="Compress a decoder and continue a prompt greedily with FP32 and compressed models.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens", type=flags.positive_int, default=32, metavar="N", help="(default: 32)"
    )
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence per token")
    flags.add_compression_flags(parser)
    flags.add_calibration_flags(parser)
    flags.add_threads_flag(parser)
    flags.add_json_flag(parser)
    flags.add_common_flags(parser)
    parser.set_defaults(handler=run, subparser=parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    result = generate(
        args.model,
        args.prompt,
        flags.config_from_flags(args, parser),
        max_new_tokens=args.max_new_tokens,
        tokenizer=args.tokenizer,
        calibration=args.calibration,
        calibration_text=args.calibration_text,
        kv_cache=not args.no_kv_cache,
        threads=args.threads,
        progress=flags.show_progress(args),
    )
    print(result.summary(), flush=True)
    if args.json:
        flags.write_json(result.to_dict(), args.json)
    return 0
