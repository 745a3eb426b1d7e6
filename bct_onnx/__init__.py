"""bct-onnx: blockwise compression of transformers for ONNX Runtime, post-training.

The public names are imported on first use (PEP 562), so ``import bct_onnx.cli`` starts without
loading onnx, onnx-ir and numpy first: the command can then turn a ^C during its start-up into one
line instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bct_onnx.api import CompressResult, compress
    from bct_onnx.block_format import BlockFormat, ScaleKind, dequantize, quantize
    from bct_onnx.config import CompressConfig
    from bct_onnx.inspect import Inspection, inspect_model
    from bct_onnx.ops import DOMAIN
    from bct_onnx.report import CompileReport
    from bct_onnx.runtime import default_providers, library_path, session, session_options

_EXPORTS = {
    "BlockFormat": "bct_onnx.block_format",
    "CompileReport": "bct_onnx.report",
    "CompressConfig": "bct_onnx.config",
    "CompressResult": "bct_onnx.api",
    "DOMAIN": "bct_onnx.ops",
    "Inspection": "bct_onnx.inspect",
    "inspect_model": "bct_onnx.inspect",
    "ScaleKind": "bct_onnx.block_format",
    "compress": "bct_onnx.api",
    "dequantize": "bct_onnx.block_format",
    "library_path": "bct_onnx.runtime",
    "quantize": "bct_onnx.block_format",
    "session": "bct_onnx.runtime",
    "session_options": "bct_onnx.runtime",
    "default_providers": "bct_onnx.runtime",
}

__all__ = [
    "DOMAIN",
    "BlockFormat",
    "CompileReport",
    "CompressConfig",
    "CompressResult",
    "Inspection",
    "ScaleKind",
    "compress",
    "default_providers",
    "dequantize",
    "inspect_model",
    "library_path",
    "quantize",
    "session",
    "session_options",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bct_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
