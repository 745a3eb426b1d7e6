// BlockMatMul (docs/ops.md): A [..., K] float32 x blockwise weight W [N, K] -> Y [..., N].
// runtime_ops/cpu/matmul_op.cc registers the CPU kernel and, in CUDA builds, the CUDA kernel.
#pragma once

#include "bct/op_common.h"

namespace bct {

// Adds BlockMatMul's kernels to the domain (CPU always; CUDAExecutionProvider when BCT_WITH_CUDA).
void AppendMatMulOps(Ort::CustomOpDomain& domain);

}  // namespace bct
