// Registration hooks of the compressed nonlinear ops (BlockGelu, BlockSilu, BlockSoftmax,
// BlockLayerNorm, BlockRMSNorm) and of BlockActMatMul; register.cc calls them while building the ai.bct_onnx domain.
#pragma once

#include "bct/op_common.h"

namespace bct {

// CPU kernels, plus the CUDAExecutionProvider kernels of the same ops when built with CUDA.
void AppendNonlinearOps(Ort::CustomOpDomain& domain);

}  // namespace bct
