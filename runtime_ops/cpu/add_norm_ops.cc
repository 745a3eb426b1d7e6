// BlockAddLayerNorm and BlockAddRMSNorm on CPU (docs/ops.md): dequantize the operand -> add the
// float32 residual (output 3 keeps the sum) -> the norm's row function -> requantize, rows in
// parallel (cpu/nonlinear_row_op.h, the kernel of the row ops).
#include "cpu/nonlinear_row_op.h"
#include "ops/ops.h"

namespace bct {

void AppendAddNormCpuOps(Ort::CustomOpDomain& domain) {
  using nonlinear::AddLayerNormFamily;
  using nonlinear::AddRMSNormFamily;
  using nonlinear::RowOpCpuKernel;
  using nonlinear::RowOpSchema;
  static BlockCustomOp<RowOpSchema<AddLayerNormFamily>, RowOpCpuKernel<AddLayerNormFamily>> add_layer_norm(nullptr);
  static BlockCustomOp<RowOpSchema<AddRMSNormFamily>, RowOpCpuKernel<AddRMSNormFamily>> add_rms_norm(nullptr);
  domain.Add(&add_layer_norm);
  domain.Add(&add_rms_norm);
}

}  // namespace bct
