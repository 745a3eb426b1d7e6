"""bct-onnx: blockwise compression of transformers for ONNX Runtime, post-training."""

from bct_onnx.block_format import BlockFormat, ScaleKind, dequantize, quantize
from bct_onnx.ops import DOMAIN
from bct_onnx.runtime import library_path, session

__all__ = ["BlockFormat", "ScaleKind", "DOMAIN", "dequantize", "quantize", "library_path", "session"]
__version__ = "0.1.0"
