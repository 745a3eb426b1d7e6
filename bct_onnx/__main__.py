"""`python -m bct_onnx ...` is the `bct-onnx` command."""

import sys

from bct_onnx.cli import main

sys.exit(main())
