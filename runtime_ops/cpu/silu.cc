// BlockSilu on CPU (docs/ops.md): dequantize -> nl::silu_row (bct/nonlinear_math.h) -> requantize,
// one row of the last axis per task.
#include "cpu/isa_clones.h"
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void SiluRowCpuBaseline(float* y, int64_t n) { nl::silu_row(y, n); }
BCT_ISA_CLONES void SiluRowCpu(float* y, int64_t n) { nl::silu_row(y, n); }

void AppendSiluCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<SiluFamily>, RowOpCpuKernel<SiluFamily>> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
