// BlockScaleErrors on CPU: the weighted squared errors of candidate scales of K-major blocks, the inner
// loop of GPTQ's scale search (bct_onnx.weight_quantizer.search_block_column), or with reduce=0 the
// rounding differences of blocks held row by row (summed by the caller). A compile-time helper:
// the passes never emit it into a model, and it has no CUDA kernel.
#include <cstdint>
#include <string>
#include <vector>

#include "bct/op_common.h"
#include "cpu/kernel_table.h"
#include "ops/block_io.h"
#include "ops/ops.h"

namespace bct {
namespace {

// BlockScaleErrors: x, scales, importance (optional: absent iff reduce=0), zero_points (optional) -> errors.
struct ScaleErrorsSchema {
  static constexpr const char* kName = "BlockScaleErrors";
  static constexpr size_t kInputCount = 4;
  static constexpr size_t kOutputCount = 1;
  static bool InputOptional(size_t index) { return index >= 2; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

class ScaleErrorsCpuKernel {
 public:
  ScaleErrorsCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), isa_(cpu::KernelIsa(node_)) {
    bits_ = AttrIntIn(info, node_, "bits", 2, 8);
    symmetric_ = AttrFlag(info, node_, "symmetric", 1);
    reduce_ = AttrFlag(info, node_, "reduce", 1);
  }

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor x = GetInput(ctx, 0);
      const InputTensor scales = GetInput(ctx, 1);
      const InputTensor importance = GetInput(ctx, 2);
      const InputTensor zero_points = GetInput(ctx, 3);
      ExpectDtype(node_, "x", x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      ExpectDtype(node_, "scales", scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      // reduce=1: x [L, N] K-major (block j is column j); reduce=0: x [N, L], block j is row j.
      const size_t n_axis = reduce_ ? 1 : 0;
      if (x.shape.size() != 2 || scales.shape.size() != 2 || scales.shape[1] != x.shape[n_axis]) {
        node_.Fail(std::string("inputs 'x' ") + (reduce_ ? "[L, N]" : "[N, L]") +
                   " and 'scales' [C, N] must be 2-D with one N, got " + ShapeString(x.shape) + " and " +
                   ShapeString(scales.shape));
      }
      const int64_t len = x.shape[1 - n_axis];
      const int64_t n = x.shape[n_axis];
      if (importance.present != reduce_) {
        node_.Fail(reduce_ ? "input 'importance' is required when reduce=1" : "input 'importance' must be absent when reduce=0");
      }
      if (reduce_) {
        ExpectDtype(node_, "importance", importance, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        if (importance.shape != std::vector<int64_t>{len}) {
          node_.Fail("input 'importance' must be [L] = " + ShapeString({len}) + ", got " + ShapeString(importance.shape));
        }
      }
      if (zero_points.present != !symmetric_) {
        node_.Fail(symmetric_ ? "input 'zero_points' must be absent when symmetric=1"
                              : "input 'zero_points' is required when symmetric=0");
      }
      if (zero_points.present) {
        ExpectDtype(node_, "zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        if (zero_points.shape != scales.shape) {
          node_.Fail("input 'zero_points' must have the shape of 'scales' " + ShapeString(scales.shape) + ", got " +
                     ShapeString(zero_points.shape));
        }
      }
      const float* zp = zero_points.present ? zero_points.As<float>() : nullptr;
      const cpu::KernelTable& kernels = cpu::Kernels(isa_);
      if (reduce_) {
        float* errors = GetOutput<float>(ctx, node_, 0, "errors", scales.shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        kernels.scale_errors(x.As<float>(), len, n, scales.As<float>(), zp, scales.shape[0], importance.As<float>(),
                             static_cast<int>(bits_), symmetric_, errors);
      } else {
        float* diffs = GetOutput<float>(ctx, node_, 0, "errors", {scales.shape[0], n, len},
                                        ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        kernels.scale_diffs(x.As<float>(), len, n, scales.As<float>(), zp, scales.shape[0], static_cast<int>(bits_),
                            symmetric_, diffs);
      }
    });
  }

 private:
  NodeRef node_;
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  int64_t bits_ = 0;
  bool symmetric_ = true;
  bool reduce_ = true;  // errors [C, N]; false: the differences [C, N, L], summed by the caller
};

}  // namespace

void AppendScaleErrorsCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<ScaleErrorsSchema, ScaleErrorsCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
