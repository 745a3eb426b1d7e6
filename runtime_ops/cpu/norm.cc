// Normalisation op family on CPU (docs/ops.md, BlockLayerNorm and BlockRMSNorm): dequantize ->
// float32 row math of bct/nonlinear_math.h -> requantize, one row of the last axis per task.
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void AppendNormCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<LayerNormFamily>, RowOpCpuKernel<LayerNormFamily>> layer_norm(nullptr);
  static BlockCustomOp<RowOpSchema<RMSNormFamily>, RowOpCpuKernel<RMSNormFamily>> rms_norm(nullptr);
  domain.Add(&layer_norm);
  domain.Add(&rms_norm);
}

}  // namespace nonlinear
}  // namespace bct
