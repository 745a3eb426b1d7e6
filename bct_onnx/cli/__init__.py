"""The `bct-onnx` command line (console script ``bct-onnx = bct_onnx.cli:main``, or ``python -m bct_onnx``).

Commands, one module each:
  compress   compress an .onnx model or a Hugging Face model directory (cli/compress.py)
  inspect    what is inside a model: format, bits, block size, bytes per node or layer (cli/inspect.py)
  demo       compress all-MiniLM-L6-v2 and compare it with FP32: size, cosine, latency (cli/demo.py)
  eval       a decoder's perplexity, FP32 vs compressed, on Jane Austen (cli/eval.py)
  generate   greedy text from a decoder, FP32 and compressed side by side (cli/generate.py)

Flags shared by several commands, and the one function that turns them into a CompressConfig, are
in cli/flags.py; the parser and the error handling in cli/app.py. Exit status: 0 success, 1 a user
error (missing input, not a model, refused overwrite, ...: one line ``bct-onnx: error: ...`` on
stderr, the traceback only with --verbose), 2 bad command-line values (argparse), 130 interrupted
(^C), 143 terminated (SIGTERM), each with one line, from the very start of the command.
A new command is a module with add_parser(subparsers) and run(args, parser), listed in
cli/app.py's COMMANDS.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from bct_onnx.errors import TerminatedError
from bct_onnx.signals import terminate_as_exception

__all__ = ["PROG", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: cli/app.py's main, with ^C and SIGTERM one line from the very start.

    Only light modules are imported before the handlers are in place: a signal that arrives while
    onnx, onnxruntime or numpy are still loading ends the command as cleanly as one later on.
    """
    with terminate_as_exception():
        try:
            from bct_onnx.cli.app import main as run

            status = run(argv)
            if argv is None:  # the process's own command line (the console script): it ends now
                _leave_objects_to_the_os()
            return status
        except KeyboardInterrupt:
            print("bct-onnx: interrupted", file=sys.stderr)
            return 130
        except TerminatedError as exc:
            print("bct-onnx: terminated", file=sys.stderr)
            return 128 + exc.signum


def _leave_objects_to_the_os() -> None:
    """Exclude every object alive now from the interpreter's garbage collections (gc.freeze): the process is
    about to exit, and its final collections would traverse all of them again, a compressed model's graph
    included (reference cycles of nodes and values): about 0.5 s at the end of compressing SmolLM2-135M, for
    memory the OS frees anyway. atexit handlers (temporary folders, logging) still run."""
    import gc

    gc.freeze()


def __getattr__(name: str) -> Any:  # PROG and build_parser live in cli/app.py (heavy imports)
    if name in ("PROG", "build_parser"):
        return getattr(importlib.import_module("bct_onnx.cli.app"), name)
    raise AttributeError(f"module 'bct_onnx.cli' has no attribute {name!r}")
