"""bct-onnx: blockwise compression of transformers for ONNX Runtime, post-training."""

from bct_onnx.api import CompressResult, compress
from bct_onnx.block_format import BlockFormat, ScaleKind, dequantize, quantize
from bct_onnx.config import CompressConfig
from bct_onnx.inspect import Inspection, inspect_model
from bct_onnx.ops import DOMAIN
from bct_onnx.report import CompileReport
from bct_onnx.runtime import library_path, session

__all__ = [
    "DOMAIN",
    "BlockFormat",
    "CompileReport",
    "CompressConfig",
    "CompressResult",
    "Inspection",
    "ScaleKind",
    "compress",
    "dequantize",
    "inspect_model",
    "library_path",
    "quantize",
    "session",
]
__version__ = "0.1.0"
