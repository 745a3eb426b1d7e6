// BlockLayerNorm and BlockRMSNorm on CPU (docs/ops.md): dequantize -> nl::layer_norm_row /
// nl::rms_norm_row (bct/nonlinear_math.h) -> requantize, one row of the last axis per task.
#include "cpu/isa_clones.h"
#include "cpu/nonlinear_row_op.h"

namespace bct {
namespace nonlinear {

void LayerNormRowCpuBaseline(float* y, int64_t n, const float* scale, const float* bias, float epsilon) {
  nl::layer_norm_row(y, n, scale, bias, epsilon);
}

BCT_ISA_CLONES void LayerNormRowCpu(float* y, int64_t n, const float* scale, const float* bias, float epsilon) {
  nl::layer_norm_row(y, n, scale, bias, epsilon);
}

void RMSNormRowCpuBaseline(float* y, int64_t n, const float* scale, float epsilon) {
  nl::rms_norm_row(y, n, scale, epsilon);
}

BCT_ISA_CLONES void RMSNormRowCpu(float* y, int64_t n, const float* scale, float epsilon) {
  nl::rms_norm_row(y, n, scale, epsilon);
}

void AppendNormCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<RowOpSchema<LayerNormFamily>, RowOpCpuKernel<LayerNormFamily>> layer_norm(nullptr);
  static BlockCustomOp<RowOpSchema<RMSNormFamily>, RowOpCpuKernel<RMSNormFamily>> rms_norm(nullptr);
  domain.Add(&layer_norm);
  domain.Add(&rms_norm);
}

}  // namespace nonlinear
}  // namespace bct
