// Gelu op family on CPU (docs/ops.md, BlockGelu): dequantize -> float32 row math of
// bct/nonlinear_math.h -> requantize, one row of the last axis per task.
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void AppendGeluCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<GeluFamily>, RowOpCpuKernel<GeluFamily>> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
