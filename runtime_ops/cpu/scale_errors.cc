// BlockScaleErrors on CPU: the weighted squared errors of candidate scales of K-major blocks, the inner
// loop of GPTQ's scale search (bct_onnx.weight_quantizer.search_block_column). A compile-time helper:
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

// BlockScaleErrors: x, scales, importance, zero_points (optional) -> errors.
struct ScaleErrorsSchema {
  static constexpr const char* kName = "BlockScaleErrors";
  static constexpr size_t kInputCount = 4;
  static constexpr size_t kOutputCount = 1;
  static bool InputOptional(size_t index) { return index == 3; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

class ScaleErrorsCpuKernel {
 public:
  ScaleErrorsCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), isa_(cpu::KernelIsa(node_)) {
    bits_ = AttrInt(info, node_, "bits");
    if (bits_ < 2 || bits_ > 8) node_.Fail("attribute 'bits' must be in 2..8, got " + std::to_string(bits_));
    const int64_t symmetric = AttrInt(info, "symmetric", 1);
    if (symmetric != 0 && symmetric != 1) {
      node_.Fail("attribute 'symmetric' must be 0 or 1, got " + std::to_string(symmetric));
    }
    symmetric_ = symmetric == 1;
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
      ExpectDtype(node_, "importance", importance, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (x.shape.size() != 2 || scales.shape.size() != 2 || scales.shape[1] != x.shape[1]) {
        node_.Fail("inputs 'x' [L, N] and 'scales' [C, N] must be 2-D with one N, got " + ShapeString(x.shape) +
                   " and " + ShapeString(scales.shape));
      }
      if (importance.shape != std::vector<int64_t>{x.shape[0]}) {
        node_.Fail("input 'importance' must be [L] = " + ShapeString({x.shape[0]}) + ", got " +
                   ShapeString(importance.shape));
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
      float* errors = GetOutput<float>(ctx, node_, 0, "errors", scales.shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      cpu::Kernels(isa_).scale_errors(x.As<float>(), x.shape[0], x.shape[1], scales.As<float>(),
                                      zero_points.present ? zero_points.As<float>() : nullptr, scales.shape[0],
                                      importance.As<float>(), static_cast<int>(bits_), symmetric_, errors);
    });
  }

 private:
  NodeRef node_;
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  int64_t bits_ = 0;
  bool symmetric_ = true;
};

}  // namespace

void AppendScaleErrorsCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<ScaleErrorsSchema, ScaleErrorsCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
