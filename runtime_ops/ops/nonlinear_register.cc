// bct::AppendNonlinearOps: the CPU (and, when built with CUDA, CUDAExecutionProvider) kernels of
// BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm, BlockRMSNorm and BlockActMatMul.
#include "bct/nonlinear_ops.h"
#include "ops/nonlinear_families.h"

namespace bct {

void AppendNonlinearOps(Ort::CustomOpDomain& domain) {
  nonlinear::AppendGeluCpuOps(domain);
  nonlinear::AppendSiluCpuOps(domain);
  nonlinear::AppendSoftmaxCpuOps(domain);
  nonlinear::AppendNormCpuOps(domain);
  nonlinear::AppendActMatMulCpuOps(domain);
#if defined(BCT_WITH_CUDA) && BCT_WITH_CUDA
  nonlinear::AppendNonlinearCudaOps(domain);
#endif
}

}  // namespace bct
