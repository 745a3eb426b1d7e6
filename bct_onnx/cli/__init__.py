"""The `bct-onnx` command line (console script ``bct-onnx = bct_onnx.cli:main``, or ``python -m bct_onnx``).

Commands, one module each:
  compress   compress an .onnx model or a Hugging Face model directory (cli/compress.py)
  inspect    what is inside a model: format, bits, block size, bytes per node or layer (cli/inspect.py)
  demo       compress all-MiniLM-L6-v2 and compare it with FP32: size, cosine, latency (cli/demo.py)
  eval       a decoder's perplexity, FP32 vs compressed, on Jane Austen (cli/eval.py)
  generate   greedy text from a decoder, FP32 and compressed side by side (cli/generate.py)

Flags shared by several commands, and the one function that turns them into a CompressConfig, are
in cli/flags.py; the parser and the error handling in cli/main.py. Exit status: 0 success, 1 a user
error (missing input, not a model, refused overwrite, ...: one line ``bct-onnx: error: ...`` on
stderr, the traceback only with --verbose), 2 bad command-line values (argparse), 130 interrupted.
A new command is a module with add_parser(subparsers) and run(args, parser), listed in
cli/main.py's COMMANDS.
"""

from bct_onnx.cli.main import PROG, build_parser, main

__all__ = ["PROG", "build_parser", "main"]
