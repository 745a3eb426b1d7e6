"""`bct-onnx compress INPUT -o OUTPUT`: compress an .onnx model or a Hugging Face model directory."""

from __future__ import annotations

import argparse
from typing import Any

from bct_onnx.api import compress
from bct_onnx.cli import flags


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "compress",
        help="compress an .onnx model or a Hugging Face model directory",
        description="Rewrite every component the config enables (weights, embedding tables, nonlinear "
        "ops, attention MatMuls) into blockwise-quantized bct-onnx ops.",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help=".onnx file, Hugging Face model directory, or Hub id org/name[@revision] (from the "
        "huggingface_hub cache; downloaded only when not cached and HF_HUB_OFFLINE is unset)",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="compressed .onnx to write, or DIR/ (trailing slash, or an existing directory): DIR/model.onnx "
        "with the model's config, generation config and tokenizer files, loadable by optimum's ORTModelFor...",
    )
    flags.add_compression_flags(parser)
    parser.add_argument(
        "--task", help="optimum export task for a Hugging Face directory (default: inferred; an error for .onnx input)"
    )
    parser.add_argument("--report", metavar="PATH", help="write the JSON compile report here")
    parser.add_argument(
        "--html",
        metavar="PATH",
        help="write a self-contained HTML report with charts here (size by component and layer, weight "
        "and output errors against FP32, bits per weight); needs pip install 'bct-onnx[report]'",
    )
    parser.add_argument(
        "--debug-dir",
        metavar="DIR",
        help="save the input model and the model after each pass that changed it here (graphs only: "
        "tensors over 1 KiB are left out unless --debug-weights)",
    )
    parser.add_argument(
        "--debug-weights", action="store_true", help="with --debug-dir: keep every tensor (one model's size per file)"
    )
    flags.add_calibration_flags(parser)
    flags.add_common_flags(parser)
    parser.set_defaults(handler=run, subparser=parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    result = compress(
        args.input,
        args.output,
        config=flags.config_from_flags(args, parser),
        progress=flags.show_progress(args),
        debug_dir=args.debug_dir,
        task=args.task,
        calibration=args.calibration,
        tokenizer=args.tokenizer,
        calibration_text=args.calibration_text,
        report=args.report,  # checked with the output before any work, written at the end
        html_report=args.html,
        debug_weights=args.debug_weights,
    )
    print(result.report.summary())
    if args.report:
        print(f"report: {args.report}")
    if args.html:
        print(f"html report: {args.html}")
    return 0
