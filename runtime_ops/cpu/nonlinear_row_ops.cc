// BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm and BlockRMSNorm on CPU (docs/ops.md):
// dequantize -> the row function of bct/nonlinear_math.h -> requantize, rows in parallel
// (cpu/nonlinear_row_op.h).
#include "cpu/nonlinear_row_op.h"
#include "ops/ops.h"

namespace bct {

void AppendNonlinearRowCpuOps(Ort::CustomOpDomain& domain) {
  using nonlinear::RowOpCpuKernel;
  using nonlinear::RowOpSchema;
  static BlockCustomOp<RowOpSchema<nonlinear::GeluFamily>, RowOpCpuKernel<nonlinear::GeluFamily>> gelu(nullptr);
  static BlockCustomOp<RowOpSchema<nonlinear::SiluFamily>, RowOpCpuKernel<nonlinear::SiluFamily>> silu(nullptr);
  static BlockCustomOp<RowOpSchema<nonlinear::SoftmaxFamily>, RowOpCpuKernel<nonlinear::SoftmaxFamily>> softmax(nullptr);
  static BlockCustomOp<RowOpSchema<nonlinear::LayerNormFamily>, RowOpCpuKernel<nonlinear::LayerNormFamily>> layer_norm(
      nullptr);
  static BlockCustomOp<RowOpSchema<nonlinear::RMSNormFamily>, RowOpCpuKernel<nonlinear::RMSNormFamily>> rms_norm(
      nullptr);
  domain.Add(&gelu);
  domain.Add(&silu);
  domain.Add(&softmax);
  domain.Add(&layer_norm);
  domain.Add(&rms_norm);
}

}  // namespace bct
