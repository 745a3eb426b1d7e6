"""`bct-onnx demo`: compress all-MiniLM-L6-v2 and compare it with FP32 (bct_onnx/demo.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bct_onnx.cli import flags
from bct_onnx.demo import run_demo


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="compress all-MiniLM-L6-v2 and compare it with FP32 (size, cosine, latency)",
        description="Export all-MiniLM-L6-v2, compress it, compare it with FP32 on real sentences.",
    )
    flags.add_compression_flags(parser)
    flags.add_threads_flag(parser)
    parser.add_argument(
        "--runs", type=flags.positive_int, default=10, metavar="N", help="timed runs per model (default: 10)"
    )
    parser.add_argument(
        "--out-dir",
        metavar="DIR",
        help="keep the FP32 and compressed models here (default: a temporary directory)",
    )
    flags.add_common_flags(parser)
    parser.set_defaults(handler=run, subparser=parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    run_demo(
        flags.config_from_flags(args, parser),
        threads=args.threads,
        runs=args.runs,
        out_dir=args.out_dir,
        progress=flags.show_progress(args),
        out=sys.stdout,
    )
    return 0
