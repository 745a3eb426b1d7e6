"""`python -m bct_onnx.cli ...` is the `bct-onnx` command."""

import sys

from bct_onnx.cli import main

sys.exit(main())
