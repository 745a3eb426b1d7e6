"""Graph passes of bct-onnx (installed as ``bct_onnx.passes``): canonicalize, quantize, pipeline.

Each pass is an onnx-ir in-place pass usable on its own; ``compress_model`` runs them in order.
"""

from bct_onnx.passes.check_model import CheckModelPass
from bct_onnx.passes.compress_intermediates import (
    ActivationSummary,
    CompressedTensor,
    CompressIntermediatesPass,
    compressed_activations,
)
from bct_onnx.passes.compress_kv_cache import CompressKVCachePass
from bct_onnx.passes.convert_opset import ConvertOpsetPass, OpsetConversionError
from bct_onnx.passes.convert_to_qdq import ConvertToQDQPass
from bct_onnx.passes.entropy_code_weights import EntropyCodeWeightsPass
from bct_onnx.passes.fold_constant_weights import FoldConstantWeightsPass
from bct_onnx.passes.fold_shape_arithmetic import FoldShapeArithmeticPass
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
from bct_onnx.passes.fuse_add_norm import FuseAddNormPass
from bct_onnx.passes.fuse_attention import FuseAttentionPass
from bct_onnx.passes.fuse_attention_step import FuseAttentionStepPass
from bct_onnx.passes.fuse_gelu import FuseGeluPass
from bct_onnx.passes.fuse_layer_norm import FuseLayerNormPass
from bct_onnx.passes.fuse_matmul_epilogue import FuseMatMulEpiloguePass
from bct_onnx.passes.fuse_rms_norm import FuseRMSNormPass
from bct_onnx.passes.fuse_silu import FuseSiluPass
from bct_onnx.passes.gemm_to_matmul import GemmToMatMulPass
from bct_onnx.passes.pack_shared_input_matmuls import PackSharedInputMatMulsPass
from bct_onnx.passes.pipeline import (
    DEBUG_DIR_ENV,
    QUANTIZE_PASSES,
    PassRecord,
    PipelineResult,
    build_passes,
    canonicalize_passes,
    compress_model,
)
from bct_onnx.passes.quantize_act_matmul import QuantizeActMatMulPass
from bct_onnx.passes.quantize_fused_ops import QuantizeFusedOpsPass
from bct_onnx.passes.quantize_gather import QuantizeGatherPass
from bct_onnx.passes.quantize_gelu import QuantizeGeluPass
from bct_onnx.passes.quantize_layer_norm import QuantizeLayerNormPass
from bct_onnx.passes.quantize_matmul import QuantizeMatMulPass
from bct_onnx.passes.quantize_silu import QuantizeSiluPass
from bct_onnx.passes.quantize_softmax import QuantizeSoftmaxPass
from bct_onnx.passes.remove_broadcast_expands import RemoveBroadcastExpandsPass
from bct_onnx.passes.remove_noop_casts import RemoveNoOpCastsPass
from bct_onnx.passes.rotate_residual_stream import RotateResidualStreamPass

__all__ = [
    "DEBUG_DIR_ENV",
    "QUANTIZE_PASSES",
    "ActivationSummary",
    "CheckModelPass",
    "CompressIntermediatesPass",
    "CompressKVCachePass",
    "CompressPass",
    "CompressPassResult",
    "CompressedTensor",
    "ConvertOpsetPass",
    "ConvertToQDQPass",
    "DomainVersionError",
    "EntropyCodeWeightsPass",
    "FoldConstantWeightsPass",
    "FoldShapeArithmeticPass",
    "FuseAddNormPass",
    "FuseAttentionPass",
    "FuseAttentionStepPass",
    "FuseGeluPass",
    "FuseLayerNormPass",
    "FuseMatMulEpiloguePass",
    "FuseRMSNormPass",
    "FuseSiluPass",
    "GemmToMatMulPass",
    "MissingGraphError",
    "NodeRewritePass",
    "OpsetConversionError",
    "OpsetTooOldError",
    "PackSharedInputMatMulsPass",
    "PassRecord",
    "PassReport",
    "PipelineResult",
    "QuantizeActMatMulPass",
    "QuantizeFusedOpsPass",
    "QuantizeGatherPass",
    "QuantizeGeluPass",
    "QuantizeLayerNormPass",
    "QuantizeMatMulPass",
    "QuantizeSiluPass",
    "QuantizeSoftmaxPass",
    "RemoveBroadcastExpandsPass",
    "RemoveNoOpCastsPass",
    "RotateResidualStreamPass",
    "Skip",
    "UnsupportedModelError",
    "build_passes",
    "canonicalize_passes",
    "compress_model",
    "compressed_activations",
]
