"""The `bct-onnx` command: `compress` a model, or run the MiniLM `demo`.

Exit status: 0 success, 1 a user error (missing input, not a model, refused overwrite, ...:
one line on stderr, the traceback only with --verbose), 2 bad command-line values (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from bct_onnx.block_format import MAX_BITS, MIN_BITS, ScaleKind, ZeroPointKind
from bct_onnx.config import DEFAULT_OPS, SUPPORTED_OPS
from bct_onnx.errors import BctOnnxError

PROG = "bct-onnx"


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in {MIN_BITS}..{MAX_BITS}, got {text!r}"
        ) from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"expected an integer in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def _bits_or_none(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return _bits(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in {MIN_BITS}..{MAX_BITS} or 'none' (weight-only), got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _op_list(ops: frozenset[str]) -> str:
    return ",".join(sorted(ops))


def _default_ops() -> str:
    return "all of them" if DEFAULT_OPS == SUPPORTED_OPS else _op_list(DEFAULT_OPS)


def _ops(text: str) -> frozenset[str]:
    ops = frozenset(op.strip() for op in text.split(",") if op.strip())
    if not ops:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of op types from {','.join(sorted(SUPPORTED_OPS))}"
        )
    unknown = sorted(ops - SUPPORTED_OPS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unsupported op type(s) {','.join(unknown)}; supported: {','.join(sorted(SUPPORTED_OPS))}"
        )
    return ops


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Blockwise post-training compression of transformers for ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    comp = sub.add_parser(
        "compress",
        help="compress an .onnx model or a Hugging Face model directory",
        description="Rewrite MatMul and Gather nodes into blockwise-quantized bct-onnx ops.",
    )
    comp.add_argument("input", metavar="INPUT", help=".onnx file, or a Hugging Face model directory")
    comp.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="compressed .onnx to write")
    _add_format_flags(comp)
    _add_control_flags(comp)
    comp.set_defaults(handler=_cmd_compress, subparser=comp)
    comp.add_argument("--task", help="optimum export task for a Hugging Face directory (default: inferred)")
    comp.add_argument("--report", metavar="PATH", help="write the JSON compile report here")
    comp.add_argument("--debug-dir", metavar="DIR", help="save the input model and intermediate models here")
    comp.add_argument(
        "--calibration",
        choices=("auto", "text", "none"),
        default="auto",
        help="GPTQ rounding of MatMul weights calibrated on shipped public-domain text: auto (when a "
        "tokenizer is found next to the model or in the HF directory; default), text (required), none",
    )
    comp.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for text calibration")
    add_calibration_text_flag(comp)
    _add_common_flags(comp)

    demo = sub.add_parser(
        "demo",
        help="compress all-MiniLM-L6-v2 and compare it with FP32 (size, cosine, latency)",
        description="Export all-MiniLM-L6-v2, compress it, compare it with FP32 on real sentences.",
    )
    demo.add_argument(
        "--weight-bits", type=_bits, default=4, metavar="N", help="weight code width (default: 4)"
    )
    demo.add_argument(
        "--act-bits", type=_bits_or_none, default=8, metavar="N|none", help="activation bits (default: 8)"
    )
    demo.add_argument(
        "--block-size", type=_positive_int, default=32, metavar="N", help="block size (default: 32)"
    )
    demo.add_argument(
        "--embedding-bits",
        type=_bits,
        default=None,
        metavar="N",
        help="embedding table bits (default: weight bits)",
    )
    demo.add_argument(
        "--ops",
        type=_ops,
        default=None,
        metavar="OPS",
        help=f"comma-separated op types to compress (default: {_default_ops()})",
    )
    demo.add_argument(
        "--embedding-scale-kind",
        choices=[kind.value for kind in ScaleKind],
        default=None,
        help="embedding tables' block scales (default: float8e5m2, one byte; float16 takes two)",
    )
    demo.add_argument("--asymmetric", action="store_true", help="store a zero point per block")
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (default: all cores)",
    )
    demo.add_argument(
        "--runs", type=_positive_int, default=10, metavar="N", help="timed runs per model (default: 10)"
    )
    demo.add_argument(
        "--out-dir",
        metavar="DIR",
        help="keep the FP32 and compressed models here (default: a temporary directory)",
    )
    _add_common_flags(demo)
    demo.set_defaults(handler=_cmd_demo, subparser=demo)

    from bct_onnx.evaluate import register_subcommands  # `eval` and `generate` (bct_onnx/evaluate.py)

    register_subcommands(sub, _add_format_flags, _add_control_flags, _add_common_flags)
    return parser


def _add_format_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a flag not given leaves no attribute, so CompressConfig's defaults apply and
    # `--act-bits none` (None) stays distinct from an absent flag.
    quiet = argparse.SUPPRESS
    parser.add_argument(
        "--weight-bits", type=_bits, default=quiet, metavar="N", help="weight code width, 2..8 (default: 4)"
    )
    parser.add_argument(
        "--act-bits",
        type=_bits_or_none,
        default=quiet,
        metavar="N|none",
        help="bits of activations quantized at run time, 2..8, or 'none' for weight-only (default: 8)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int,
        default=quiet,
        metavar="N",
        help="elements per block (default: 32)",
    )
    parser.add_argument(
        "--embedding-bits",
        type=_bits,
        default=quiet,
        metavar="N",
        help="embedding table bits (default: weight bits)",
    )
    parser.add_argument(
        "--ops",
        type=_ops,
        default=quiet,
        metavar="OPS",
        help=f"comma-separated op types to compress, from {_op_list(SUPPORTED_OPS)} (default: {_default_ops()})",
    )
    parser.add_argument(
        "--scale-kind",
        choices=[kind.value for kind in ScaleKind],
        default=quiet,
        help="how block scales are stored (default: float16)",
    )
    parser.add_argument(
        "--embedding-scale-kind",
        choices=[kind.value for kind in ScaleKind],
        default=quiet,
        help="how embedding tables store block scales (default: float8e5m2, one byte a block; float16 "
        "two)",
    )
    parser.add_argument(
        "--asymmetric", action="store_true", help="store a zero point per block (default: symmetric)"
    )
    parser.add_argument(
        "--zero-points",
        choices=[kind.value for kind in ZeroPointKind],
        default=quiet,
        help="with --asymmetric: 'integer' uint8 zero points (default) or 'float' offsets, value = code * scale "
        "+ offset (float16; float32 with --scale-kind float32), as GGUF Q4_1",
    )


def _add_control_flags(parser: argparse.ArgumentParser) -> None:
    """Per-op-kind and per-node control (docs/config.md); applied after --config, in this order."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML (or YAML, with PyYAML) file of settings, per-op-kind tables and overrides (docs/config.md); "
        "flags given here take precedence",
    )
    parser.add_argument(
        "--op-bits",
        action="append",
        default=[],
        metavar="KIND=N[,...]",
        help="bits per op kind: weight bits for MatMul/Gather, activation bits for Gelu, Silu, Softmax, "
        "LayerNormalization, AttentionMatMul; N=off disables the kind (e.g. --op-bits Gelu=8,MatMul=4)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN:KEY=V[,...]",
        help="settings for nodes whose name matches PATTERN (glob, or re:REGEX); keys enabled, weight_bits, "
        "act_bits, block_size, op (e.g. --override '*attention*:weight_bits=8,op=MatMul'); repeatable, later wins",
    )


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details; tracebacks on errors")


def _version() -> str:
    from bct_onnx import __version__

    return __version__


_USER_ERRORS: tuple[type[BaseException], ...] = (
    BctOnnxError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Error types that mean "fix your input", including the ones other modules define."""
    errors = list(_USER_ERRORS)
    try:
        from bct_onnx.models.export import ExportError, ModelDirError

        errors += [ExportError, ModelDirError]
    except ImportError:
        pass
    try:
        from bct_onnx.runtime import LibraryNotFoundError

        errors.append(LibraryNotFoundError)
    except ImportError:
        pass
    # A model a pass cannot handle (no graph, opset too old, ...): the passes raise
    # bct_onnx.passes.UnsupportedModelError, an onnx-ir PreconditionError, naming the problem.
    from onnx_ir.passes import PreconditionError

    errors.append(PreconditionError)
    return tuple(errors)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CompressConfig fields given on the command line."""
    given = vars(args)
    overrides: dict[str, Any] = {
        name: given[name]
        for name in (
            "weight_bits",
            "act_bits",
            "block_size",
            "embedding_bits",
            "ops",
            "scale_kind",
            "embedding_scale_kind",
            "zero_points",
        )
        if name in given
    }
    if given.get("asymmetric"):
        overrides["symmetric"] = False
    return overrides


def add_calibration_text_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration-text",
        metavar="SOURCE",
        default="auto",
        help="text that GPTQ calibrates on: shipped (public-domain lines inside the package; also auto, "
        "the default), moby-dick (Debian r-cran-tokenizers, fetched once), or a UTF-8 text file, cut "
        "into 64 windows of 256 words",
    )


def _cmd_compress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from bct_onnx.api import compress, make_config
    from bct_onnx.config_file import apply_controls, load_config_file

    base = load_config_file(args.config) if args.config else None  # a bad file: exit 1, names file and key
    try:
        config = apply_controls(make_config(base, **_overrides(args)), args.op_bits, args.override)
    except (ValueError, TypeError) as exc:  # a combination the config refuses
        parser.error(str(exc))
    result = compress(
        args.input,
        args.output,
        config=config,
        progress=not args.quiet and sys.stderr.isatty(),
        debug_dir=args.debug_dir,
        task=args.task,
        calibration=args.calibration,
        tokenizer=args.tokenizer,
        calibration_text=args.calibration_text,
    )
    if args.report:
        result.report.write(args.report)
    print(result.report.summary())
    if args.report:
        print(f"report: {args.report}")
    return 0


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from bct_onnx.api import make_config
    from bct_onnx.demo import run_demo

    settings: dict[str, Any] = {
        "weight_bits": args.weight_bits,
        "act_bits": args.act_bits,
        "block_size": args.block_size,
        "embedding_bits": args.embedding_bits,
        "embedding_scale_kind": args.embedding_scale_kind,
        "symmetric": not args.asymmetric,
    }
    if args.ops is not None:
        settings["ops"] = args.ops
    try:
        make_config(**settings)
    except (ValueError, TypeError) as exc:  # a combination the config refuses
        parser.error(str(exc))
    run_demo(
        **settings,
        threads=args.threads,
        runs=args.runs,
        out_dir=args.out_dir,
        progress=not args.quiet and sys.stderr.isatty(),
        out=sys.stdout,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args, args.subparser))
    except _user_errors() as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
