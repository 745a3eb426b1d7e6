"""Flags shared by the commands, and the one place that turns them into a CompressConfig.

Compression flags (format, per-op-kind control, --config) come from add_compression_flags; a flag
not given leaves no attribute (argparse.SUPPRESS), so CompressConfig's defaults and the --config
file apply, and ``--act-bits none`` (None) stays distinct from an absent flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bct_onnx.api import make_config
from bct_onnx.block_format import MAX_BITS, MIN_BITS, ScaleKind, ZeroPointKind
from bct_onnx.config import DEFAULT_OPS, OUTPUT_FORMATS, SUPPORTED_OPS, CompressConfig
from bct_onnx.config_file import apply_controls, load_config_file

# CompressConfig fields that have a flag of the same name (dashes for underscores).
CONFIG_FLAGS = (
    "weight_bits",
    "act_bits",
    "block_size",
    "embedding_bits",
    "ops",
    "scale_kind",
    "embedding_scale_kind",
    "zero_points",
    "target_ratio",
    "max_error",
    "format",
    "qdq_activations",
    "entropy_code",
    "kv_cache_bits",
    "kv_cache_block_size",
)


def bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in {MIN_BITS}..{MAX_BITS}, got {text!r}"
        ) from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"expected an integer in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def bits_or_none(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return bits(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in {MIN_BITS}..{MAX_BITS} or 'none' (weight-only), got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def ratio_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 1 or 'none', got {text!r}") from None
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number > 1 (a whole-file ratio) or 'none', got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def op_types(text: str) -> frozenset[str]:
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


def _op_list(ops: frozenset[str]) -> str:
    return ",".join(sorted(ops))


def _default_ops() -> str:
    return "all of them" if DEFAULT_OPS == SUPPORTED_OPS else _op_list(DEFAULT_OPS)


def add_compression_flags(parser: argparse.ArgumentParser) -> None:
    """The block format flags, then per-op-kind and per-node control (docs/config.md)."""
    quiet = argparse.SUPPRESS
    parser.add_argument(
        "--target-ratio",
        type=ratio_or_none,
        default=quiet,
        metavar="R|none",
        help="a budget: bits (3..8) and block size per weight tensor chosen from measured sensitivity so "
        "that the file is R times smaller; 'none' (default): the fixed widths of --weight-bits / "
        "--embedding-bits (docs/config.md; all-MiniLM-L6-v2: --target-ratio 8 --scale-kind float8e5m2)",
    )
    parser.add_argument(
        "--max-error",
        type=positive_float,
        default=quiet,
        metavar="E",
        help="a budget by quality: the fewest bytes whose predicted relative output MSE is at most E",
    )
    parser.add_argument(
        "--weight-bits",
        type=bits,
        default=quiet,
        metavar="N",
        help="weight code width, 2..8, for every weight (switches a budget off; default: 4)",
    )
    parser.add_argument(
        "--act-bits",
        type=bits_or_none,
        default=quiet,
        metavar="N|none",
        help="bits of activations quantized at run time, 2..8, or 'none' for weight-only (default: 8)",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=quiet,
        metavar="N",
        help="elements per block (default: 32)",
    )
    parser.add_argument(
        "--embedding-bits",
        type=bits,
        default=quiet,
        metavar="N",
        help="embedding table bits (switches a budget off; default: weight bits)",
    )
    parser.add_argument(
        "--ops",
        type=op_types,
        default=quiet,
        metavar="OPS",
        help=f"comma-separated op types to compress, from {_op_list(SUPPORTED_OPS)} (default: {_default_ops()})",
    )
    parser.add_argument(
        "--scale-kind",
        choices=[kind.value for kind in ScaleKind],
        default=quiet,
        help="how block scales are stored (default: float16, decoders float8e5m2 unless --no-kind-defaults; "
        "float8e5m2: one byte a block, weights only; float8e4m3: the same with 3 mantissa bits and a "
        "per-tensor factor, measured no better, docs/results.md)",
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
        help="with --asymmetric: 'integer' uint8 zero points (default), 'packed' (the same zero points stored at "
        "the code width: 4-bit, two a byte) or 'float' offsets, value = code * scale + offset (float16; float32 "
        "with --scale-kind float32), as GGUF Q4_1",
    )
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=quiet,
        help="bct: bct-onnx custom ops (default; needs the library at run time); qdq: standard ONNX, "
        "weights and tables as opset-21 DequantizeLinear with block_size feeding MatMul/Gather, runs in "
        "plain ONNX Runtime (only MatMul and Gather compressed; the report lists what stayed float)",
    )
    parser.add_argument(
        "--qdq-activations",
        action="store_true",
        default=quiet,
        help="with --format qdq: write the run-time activation quantization too, as in-graph scales + "
        "QuantizeLinear/DequantizeLinear (exact, but run in float: slower)",
    )
    parser.add_argument(
        "--entropy-code",
        action="store_true",
        default=quiet,
        help="store weight and table codes entropy-coded (lossless canonical Huffman per tensor, decoded "
        "once at session creation; docs/block_format.md): a smaller file, a slower session start",
    )
    parser.add_argument(
        "--kv-cache-bits",
        type=bits_or_none,
        default=quiet,
        metavar="N|none",
        help="a decoder's KV cache crosses steps as N-bit blockwise codes + float16 scales (default: 8; 4 "
        "halves it again), or 'none' for a float cache (docs/kv_cache.md)",
    )
    parser.add_argument(
        "--kv-cache-block-size",
        type=positive_int,
        default=quiet,
        metavar="N",
        help="head_dim elements per block of the KV cache (default: 32)",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="rotate a pre-RMSNorm decoder's residual stream by a randomized Hadamard matrix folded into "
        "the weights (QuaRot-style; off by default, see docs/results.md)",
    )
    parser.add_argument(
        "--no-kind-defaults",
        action="store_true",
        help="take the flags as they are: no decoder defaults (decoders otherwise get float8e5m2 weight "
        "scales and one more bit on a tied embedding / output table; docs/results.md)",
    )
    parser.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="keep attention as BlockActMatMul + BlockSoftmax instead of one BlockAttention op",
    )
    # Applied after --config, in this order.
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


def add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    """--calibration, --tokenizer and --calibration-text (GPTQ rounding of MatMul weights)."""
    parser.add_argument(
        "--calibration",
        choices=("auto", "text", "data-free", "none"),
        default="auto",
        help="GPTQ rounding of MatMul weights calibrated on text (--calibration-text): auto (when a "
        "tokenizer is found next to the model or in the HF directory, or given; default: without one, "
        "data-free: encoders get GPTQ on random token ids, decoders a scale search weighted by each "
        "input channel's mean square on random token ids), text (required), data-free (what a model "
        "without a tokenizer gets, even when one is found), none (plain rounding)",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer directory (default: next to the model or in the HF directory)"
    )
    parser.add_argument(
        "--calibration-text",
        metavar="SOURCE",
        default="auto",
        help="text that GPTQ calibrates on: shipped (public-domain lines inside the package; also auto, "
        "the default), moby-dick (Debian r-cran-tokenizers, fetched once), a .jsonl file (the \"text\" "
        "field of each record), a .parquet / .arrow file or save_to_disk directory with a \"text\" column "
        "(only when the datasets package is installed), or a UTF-8 text file, cut into 64 windows of 256 words",
    )


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (default: all cores)",
    )


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details; tracebacks on errors")


def config_from_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> CompressConfig:
    """The CompressConfig of the compression flags: --config file, then flags, then --op-bits, --override.

    A bad config file is a user error (exit 1, naming file and key); a combination the config
    refuses is a command-line error (exit 2, argparse's message).
    """
    base = load_config_file(args.config) if args.config else None
    given = vars(args)
    fields: dict[str, Any] = {name: given[name] for name in CONFIG_FLAGS if name in given}
    if given.get("asymmetric"):
        fields["symmetric"] = False
    if given.get("rotate"):
        fields["rotation"] = True
    if given.get("no_kind_defaults"):
        fields["kind_defaults"] = False
    if given.get("no_fuse_attention"):
        fields["fuse_attention"] = False
    try:
        return apply_controls(make_config(base, **fields), args.op_bits, args.override)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless --quiet, and only on a terminal."""
    return not args.quiet and sys.stderr.isatty()


def write_json(data: Any, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
