// BlockSoftmax on CPU (docs/ops.md): dequantize -> nl::softmax_row (bct/nonlinear_math.h) ->
// requantize, one row of the last axis per task.
#include "cpu/isa_clones.h"
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void SoftmaxRowCpuBaseline(float* y, int64_t n) { nl::softmax_row(y, n); }
BCT_ISA_CLONES void SoftmaxRowCpu(float* y, int64_t n) { nl::softmax_row(y, n); }

void AppendSoftmaxCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<SoftmaxFamily>, RowOpCpuKernel<SoftmaxFamily>> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
