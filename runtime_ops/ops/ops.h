// The registration hooks of every op family: each adds its kernels to the ai.bct_onnx domain.
// register.cc lists them in its one table (CPU hooks always; CUDA hooks in CUDA builds).
#pragma once

#include "bct/op_common.h"

namespace bct {

// CPU kernels (runtime_ops/cpu/).
void AppendQuantizeCpuOps(Ort::CustomOpDomain& domain);         // BlockQuantize
void AppendDequantizeCpuOps(Ort::CustomOpDomain& domain);       // BlockDequantize
void AppendGatherCpuOps(Ort::CustomOpDomain& domain);           // BlockGather
void AppendMatMulCpuOps(Ort::CustomOpDomain& domain);           // BlockMatMul
void AppendActMatMulCpuOps(Ort::CustomOpDomain& domain);        // BlockActMatMul
void AppendAttentionCpuOps(Ort::CustomOpDomain& domain);       // BlockAttention
void AppendNonlinearRowCpuOps(Ort::CustomOpDomain& domain);     // BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm, BlockRMSNorm
void AppendAddNormCpuOps(Ort::CustomOpDomain& domain);          // BlockAddLayerNorm, BlockAddRMSNorm
void AppendScaleErrorsCpuOps(Ort::CustomOpDomain& domain);      // BlockScaleErrors (GPTQ's scale search; CPU only)
void AppendGptqColumnsCpuOps(Ort::CustomOpDomain& domain);      // BlockGptqColumns (GPTQ's column walk; CPU only)

// CUDAExecutionProvider kernels under the same names (runtime_ops/cuda/; CUDA builds only).
void AppendBlockCudaOps(Ort::CustomOpDomain& domain);      // BlockQuantize, BlockDequantize, BlockGather
void AppendMatMulCudaOps(Ort::CustomOpDomain& domain);     // BlockMatMul
void AppendNonlinearCudaOps(Ort::CustomOpDomain& domain);  // the seven row ops (Add + norm included), BlockActMatMul
void AppendAttentionCudaOps(Ort::CustomOpDomain& domain);  // BlockAttention

}  // namespace bct
