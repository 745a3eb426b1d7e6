"""The parser of `bct-onnx` (one subparser per command module) and the shared error handling."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from onnx_ir.passes import PreconditionError

from bct_onnx import __version__
from bct_onnx.cli import compress, demo, generate, inspect
from bct_onnx.cli import eval as eval_command
from bct_onnx.errors import BctOnnxError
from bct_onnx.models.export import ExportError, ModelDirError
from bct_onnx.runtime import LibraryNotFoundError

PROG = "bct-onnx"

# The command modules, in the order `bct-onnx --help` lists them; each has add_parser(subparsers),
# which sets the handler run(args, parser) -> exit status.
COMMANDS = (compress, inspect, demo, eval_command, generate)

# Errors that mean "fix your input": one line on stderr and exit status 1. A model a pass cannot
# handle (no graph, opset too old, ...) raises bct_onnx.passes.UnsupportedModelError, an onnx-ir
# PreconditionError naming the problem.
USER_ERRORS: tuple[type[BaseException], ...] = (
    BctOnnxError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    ExportError,
    ModelDirError,
    LibraryNotFoundError,
    PreconditionError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Blockwise post-training compression of transformers for ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status: 0 success, 1 a user error, 2 bad command-line values, 130 ^C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args, args.subparser))
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
