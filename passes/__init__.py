"""Graph passes of bct-onnx (installed as ``bct_onnx.passes``): canonicalize, quantize, pipeline.

Each pass is an onnx-ir in-place pass usable on its own; ``compress_model`` runs them in order.
"""

from bct_onnx.passes.check_model import CheckModelPass
from bct_onnx.passes.fold_constant_weights import FoldConstantWeightsPass
from bct_onnx.passes.framework import (
    CompressPass,
    CompressPassResult,
    DomainVersionError,
    MissingGraphError,
    NodeRewritePass,
    OpsetTooOldError,
    PassReport,
    Skip,
    UnsupportedModelError,
)
from bct_onnx.passes.gemm_to_matmul import GemmToMatMulPass
from bct_onnx.passes.pipeline import (
    DEBUG_DIR_ENV,
    QUANTIZE_PASSES,
    PassRecord,
    PipelineResult,
    build_passes,
    compress_model,
)
from bct_onnx.passes.quantize_gather import QuantizeGatherPass
from bct_onnx.passes.quantize_matmul import QuantizeMatMulPass

__all__ = [
    "DEBUG_DIR_ENV",
    "QUANTIZE_PASSES",
    "CheckModelPass",
    "CompressPass",
    "CompressPassResult",
    "DomainVersionError",
    "FoldConstantWeightsPass",
    "GemmToMatMulPass",
    "MissingGraphError",
    "NodeRewritePass",
    "OpsetTooOldError",
    "PassRecord",
    "PassReport",
    "PipelineResult",
    "QuantizeGatherPass",
    "QuantizeMatMulPass",
    "Skip",
    "UnsupportedModelError",
    "build_passes",
    "compress_model",
]
