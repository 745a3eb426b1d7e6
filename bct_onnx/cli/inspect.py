"""`bct-onnx inspect MODEL`: what is inside a model, per layer or per node, and why float nodes stay float."""

from __future__ import annotations

import argparse
from typing import Any

from bct_onnx.cli import flags
from bct_onnx.inspect import inspect_model


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show per node (or layer) the format, bits, block size, scale kind and bytes of a model",
        description="Describe any .onnx: a bct-onnx model, a standard qdq one or a float one. Float nodes "
        "get the reason compress gives for them (the pipeline runs on a copy with the model's own config, "
        "plain rounding); for an uncompressed model, what compress would do with the default config.",
    )
    parser.add_argument("model", metavar="MODEL", help=".onnx file (or a directory holding one)")
    parser.add_argument("--json", action="store_true", help="print the whole inspection as JSON")
    parser.add_argument("--nodes", action="store_true", help="one line per node instead of per layer")
    parser.add_argument(
        "--no-explain",
        dest="explain",
        action="store_false",
        help="skip the pipeline run that explains float nodes (faster on large models)",
    )
    flags.add_common_flags(parser)
    parser.set_defaults(handler=run, subparser=parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    inspection = inspect_model(args.model, explain=args.explain)
    print(inspection.to_json() if args.json else inspection.summary(per_node=args.nodes), end="" if args.json else "\n")
    return 0
