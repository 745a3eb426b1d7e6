// Softmax op family on CPU (docs/ops.md, BlockSoftmax): dequantize -> float32 row math of
// bct/nonlinear_math.h -> requantize, one row of the last axis per task.
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void AppendSoftmaxCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<SoftmaxFamily>, RowOpCpuKernel<SoftmaxFamily>> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
