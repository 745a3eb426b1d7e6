// Entry points register.cc calls to put each op family's kernels into the domain.
#pragma once

#include "bct/op_common.h"

namespace bct {

// CPU kernels of BlockQuantize, BlockDequantize, BlockGather (runtime_ops/cpu/).
void AppendQuantizeCpuOps(Ort::CustomOpDomain& domain);
void AppendDequantizeCpuOps(Ort::CustomOpDomain& domain);
void AppendGatherCpuOps(Ort::CustomOpDomain& domain);

// CUDA kernels of the same ops, on CUDAExecutionProvider (runtime_ops/cuda/; only with BCT_WITH_CUDA).
void AppendBlockCudaOps(Ort::CustomOpDomain& domain);

// What the library was built with, for diagnostics.
const char* CpuSimdName();

}  // namespace bct
