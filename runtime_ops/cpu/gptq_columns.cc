// BlockGptqColumns on CPU: GPTQ's walk over the columns of one quantization block (bct_onnx.gptq._gptq_walk's
// per-column loop, integer codes): each column of the K-major weight rows is rounded with the block's scales,
// its scaled rounding error spread over the block's later columns, in place, column after column. A
// compile-time helper: the passes never emit it into a model, and it has no CUDA kernel. The loop is a
// portable kernel (cpu/portable_kernels_impl.h, GptqColumns) compiled for every path: elementwise float32 /
// float64 steps and, for the rank-1 update, an explicit fma per element, which is what OpenBLAS's dger gives
// the numpy walk (tests/runtime_ops/test_gptq_columns.py checks every path against it bit for bit).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bct/op_common.h"
#include "cpu/kernel_table.h"
#include "ops/block_io.h"
#include "ops/ops.h"

namespace bct {
namespace {

// BlockGptqColumns: block [L, N] float64, hinv [L, L] float64, inverse_diagonal [L] float64,
// scale [N] float32, inverse [N] float32, zero_points [N] float32 (optional: absent iff symmetric=1)
// -> levels [L, N] float32, errors [L, N] float64.
struct GptqColumnsSchema {
  static constexpr const char* kName = "BlockGptqColumns";
  static constexpr size_t kInputCount = 6;
  static constexpr size_t kOutputCount = 2;
  static bool InputOptional(size_t index) { return index == 5; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t index) {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

class GptqColumnsCpuKernel {
 public:
  GptqColumnsCpuKernel(const OrtKernelInfo* info, const NodeRef& node) : node_(node), isa_(cpu::KernelIsa(node_)) {
    bits_ = AttrIntIn(info, node_, "bits", 2, 8);
    symmetric_ = AttrFlag(info, node_, "symmetric", 1);
  }

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor block = GetInput(ctx, 0);
      const InputTensor hinv = GetInput(ctx, 1);
      const InputTensor inverse_diagonal = GetInput(ctx, 2);
      const InputTensor scale = GetInput(ctx, 3);
      const InputTensor inverse = GetInput(ctx, 4);
      const InputTensor zero_points = GetInput(ctx, 5);
      ExpectDtype(node_, "block", block, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE);
      ExpectDtype(node_, "hinv", hinv, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE);
      ExpectDtype(node_, "inverse_diagonal", inverse_diagonal, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE);
      ExpectDtype(node_, "scale", scale, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      ExpectDtype(node_, "inverse", inverse, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (block.shape.size() != 2) node_.Fail("input 'block' must be [L, N], got " + ShapeString(block.shape));
      const int64_t len = block.shape[0];
      const int64_t n = block.shape[1];
      if (hinv.shape != std::vector<int64_t>{len, len}) {
        node_.Fail("input 'hinv' must be [L, L] = " + ShapeString({len, len}) + ", got " + ShapeString(hinv.shape));
      }
      if (inverse_diagonal.shape != std::vector<int64_t>{len}) {
        node_.Fail("input 'inverse_diagonal' must be [L] = " + ShapeString({len}) + ", got " +
                   ShapeString(inverse_diagonal.shape));
      }
      for (const auto& [name, input] : {std::pair<const char*, const InputTensor*>{"scale", &scale},
                                        {"inverse", &inverse}, {"zero_points", &zero_points}}) {
        if (input->present && input->shape != std::vector<int64_t>{n}) {
          node_.Fail(std::string("input '") + name + "' must be [N] = " + ShapeString({n}) + ", got " +
                     ShapeString(input->shape));
        }
      }
      if (zero_points.present != !symmetric_) {
        node_.Fail(symmetric_ ? "input 'zero_points' must be absent when symmetric=1"
                              : "input 'zero_points' is required when symmetric=0");
      }
      if (zero_points.present) ExpectDtype(node_, "zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      float* levels = GetOutput<float>(ctx, node_, 0, "levels", {len, n}, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      double* errors = GetOutput<double>(ctx, node_, 1, "errors", {len, n}, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE);
      // The walk corrects the block in place: a copy of the input, which ONNX Runtime owns (one per thread:
      // a session's Run may be called from several threads at once).
      thread_local std::vector<double> work;
      work.assign(block.As<double>(), block.As<double>() + len * n);
      cpu::Kernels(isa_).gptq_columns(work.data(), len, n, hinv.As<double>(), inverse_diagonal.As<double>(),
                                      scale.As<float>(), inverse.As<float>(),
                                      zero_points.present ? zero_points.As<float>() : nullptr, static_cast<int>(bits_),
                                      symmetric_, levels, errors);
    });
  }

 private:
  NodeRef node_;
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  int64_t bits_ = 0;
  bool symmetric_ = true;
};

}  // namespace

void AppendGptqColumnsCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<GptqColumnsSchema, GptqColumnsCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
