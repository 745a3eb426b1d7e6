"""Names of the custom domain and its operators, shared by the passes and the tests."""

DOMAIN = "ai.bct_onnx"
DOMAIN_VERSION = 1

BLOCK_QUANTIZE = "BlockQuantize"
BLOCK_DEQUANTIZE = "BlockDequantize"
BLOCK_MATMUL = "BlockMatMul"
BLOCK_GATHER = "BlockGather"
BLOCK_GELU = "BlockGelu"
BLOCK_SILU = "BlockSilu"
BLOCK_SOFTMAX = "BlockSoftmax"
BLOCK_LAYER_NORM = "BlockLayerNorm"
BLOCK_RMS_NORM = "BlockRMSNorm"
BLOCK_ACT_MATMUL = "BlockActMatMul"
BLOCK_ADD_LAYER_NORM = "BlockAddLayerNorm"
BLOCK_ADD_RMS_NORM = "BlockAddRMSNorm"
BLOCK_ATTENTION = "BlockAttention"

# A helper of the compiler, CPU only, never in a model (GPTQ's scale search, weight_quantizer.search_block_column):
# not among OP_TYPES, whose ops models hold.
BLOCK_SCALE_ERRORS = "BlockScaleErrors"
# Another (GPTQ's walk over one quantization block's columns, gptq._library_columns).
BLOCK_GPTQ_COLUMNS = "BlockGptqColumns"

# Every operator a model can hold (bct_onnx.reference has one evaluator class per name).
OP_TYPES = (
    BLOCK_QUANTIZE,
    BLOCK_DEQUANTIZE,
    BLOCK_MATMUL,
    BLOCK_GATHER,
    BLOCK_GELU,
    BLOCK_SILU,
    BLOCK_SOFTMAX,
    BLOCK_LAYER_NORM,
    BLOCK_RMS_NORM,
    BLOCK_ACT_MATMUL,
    BLOCK_ADD_LAYER_NORM,
    BLOCK_ADD_RMS_NORM,
    BLOCK_ATTENTION,
)
