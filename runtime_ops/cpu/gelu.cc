// BlockGelu on CPU (docs/ops.md): dequantize -> nl::gelu_row (bct/nonlinear_math.h) -> requantize,
// one row of the last axis per task.
#include "cpu/isa_clones.h"
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void GeluRowCpuBaseline(float* y, int64_t n, nl::GeluForm form) { nl::gelu_row(y, n, form); }
BCT_ISA_CLONES void GeluRowCpu(float* y, int64_t n, nl::GeluForm form) { nl::gelu_row(y, n, form); }

void AppendGeluCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<GeluFamily>, RowOpCpuKernel<GeluFamily>> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
