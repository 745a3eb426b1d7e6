// BlockMatMul (docs/ops.md) as an ONNX Runtime custom op: validation, weight repacking at kernel
// creation when the weights are constant initializers, and dispatch to the CPU kernel
// (cpu/matmul_kernel.h) or, in CUDA builds, to the CUDA launcher (cuda/matmul_launch.h).
//
// Inputs: A float32 [..., K], W_codes uint8 [N, row_bytes(K)], W_scales float16|float32|uint8 [N, nb],
// W_zero_points uint8 [N, nb] (optional, present iff symmetric=0), bias float32 [N] (optional).
// Output: Y float32 [..., N].
#include "bct/matmul_op.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/op_common.h"
#include "matmul_kernel.h"
#include "ops/block_io.h"

#if defined(BCT_WITH_CUDA) && BCT_WITH_CUDA
#include "../cuda/matmul_launch.h"
#endif

namespace bct {
namespace {

enum MatMulInput : size_t { kA = 0, kCodes = 1, kScales = 2, kZeroPoints = 3, kBias = 4 };

struct MatMulSchema {
  static constexpr const char* kName = "BlockMatMul";
  static constexpr size_t kInputCount = 5;
  static constexpr size_t kOutputCount = 1;
  static bool InputOptional(size_t index) { return index == kZeroPoints || index == kBias; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

struct MatMulAttrs {
  BlockAttrs block;  // bits, block_size, symmetric, axis_size = K
  int64_t N = 0;
  int act_bits = 0;

  int64_t K() const { return block.axis_size; }
  int64_t row_bytes() const { return bct::row_bytes(block.axis_size, block.bits); }
  int64_t num_blocks() const { return bct::num_blocks(block.axis_size, block.block_size); }
};

MatMulAttrs ReadMatMulAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  MatMulAttrs attrs;
  attrs.block = ReadBlockAttrs(info, node, "K");
  attrs.N = AttrInt(info, node, "N");
  if (attrs.N < 1) node.Fail("attribute 'N' must be >= 1, got " + std::to_string(attrs.N));
  const int64_t act_bits = AttrInt(info, "act_bits", 0);
  if (act_bits != 0 && (act_bits < kMinBits || act_bits > kMaxBits)) {
    node.Fail("attribute 'act_bits' must be 0 (float activations) or in 2..8, got " + std::to_string(act_bits));
  }
  attrs.act_bits = static_cast<int>(act_bits);
  if (attrs.act_bits > 0) {
    // Integer mode sums a block's products in int32: block_size * (2**bits - 1) * 2**(act_bits - 1) must fit.
    const int64_t longest_block = std::min(attrs.block.block_size, attrs.K());
    const double worst = static_cast<double>(longest_block) * ((1 << attrs.block.bits) - 1) *
                         static_cast<double>(1 << (attrs.act_bits - 1));
    if (worst >= 2147483648.0) {
      node.Fail("attribute 'block_size' (" + std::to_string(attrs.block.block_size) +
                ") is too large for integer accumulation with bits=" + std::to_string(attrs.block.bits) +
                " and act_bits=" + std::to_string(attrs.act_bits) +
                ": block_size * (2**bits - 1) * 2**(act_bits - 1) must be < 2**31");
    }
  }
  return attrs;
}

void ExpectShape(const NodeRef& node, const char* name, const InputTensor& in, const std::vector<int64_t>& want,
                 const char* meaning) {
  if (in.shape != want) {
    node.Fail(std::string("input '") + name + "' must have shape " + meaning + " = " + ShapeString(want) +
              ", got " + ShapeString(in.shape));
  }
}

// Checks the weight inputs against the attributes; returns the scale kind. zero_points and bias
// may be absent (present == false).
ScaleKind CheckWeights(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& codes,
                       const InputTensor& scales, const InputTensor& zero_points) {
  if (!codes.present) node.Fail("input 'W_codes' is missing");
  if (!scales.present) node.Fail("input 'W_scales' is missing");
  ExpectDtype(node, "W_codes", codes, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  ExpectShape(node, "W_codes", codes, {attrs.N, attrs.row_bytes()}, "[N, ceil(K * bits / 8)]");
  ScaleKind kind = ScaleKind::kFloat16;
  switch (scales.dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: kind = ScaleKind::kFloat16; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: kind = ScaleKind::kFloat32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: kind = ScaleKind::kPow2; break;
    default:
      node.Fail(std::string("input 'W_scales' must be float16, float32 or uint8 (pow2 exponents), got ") +
                DtypeName(scales.dtype));
  }
  ExpectShape(node, "W_scales", scales, {attrs.N, attrs.num_blocks()}, "[N, ceil(K / block_size)]");
  if (attrs.block.symmetric && zero_points.present) {
    node.Fail("input 'W_zero_points' must be absent when attribute 'symmetric' is 1");
  }
  if (!attrs.block.symmetric) {
    if (!zero_points.present) node.Fail("input 'W_zero_points' is required when attribute 'symmetric' is 0");
    ExpectDtype(node, "W_zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    ExpectShape(node, "W_zero_points", zero_points, {attrs.N, attrs.num_blocks()}, "[N, ceil(K / block_size)]");
  }
  return kind;
}

void CheckBias(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& bias) {
  if (!bias.present) return;
  ExpectDtype(node, "bias", bias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectShape(node, "bias", bias, {attrs.N}, "[N]");
}

// Checks A and returns the number of rows M (product of A's leading dimensions).
int64_t CheckActivation(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& a) {
  if (!a.present) node.Fail("input 'A' is missing");
  ExpectDtype(node, "A", a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectMinRank(node, "A", a, 1);
  if (a.shape.back() != attrs.K()) {
    node.Fail("input 'A' must have last dimension K = " + std::to_string(attrs.K()) + ", got shape " +
              ShapeString(a.shape));
  }
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) rows *= a.shape[i];
  return rows;
}

// An input of the kernel info as an InputTensor when it is a constant initializer (else absent).
InputTensor ConstantInput(const Ort::ConstKernelInfo& info, size_t index) {
  InputTensor in;
  if (index >= info.GetInputCount()) return in;
  int is_constant = 0;
  Ort::ConstValue value = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || value == nullptr) return in;
  auto type_shape = value.GetTensorTypeAndShapeInfo();
  in.present = true;
  in.dtype = type_shape.GetElementType();
  in.shape = type_shape.GetShape();
  in.size = static_cast<int64_t>(type_shape.GetElementCount());
  in.data = value.GetTensorRawData();
  return in;
}

// True when the node wires an input at index (an empty name means an omitted optional input).
bool InputWired(const Ort::ConstKernelInfo& info, size_t index) {
  return index < info.GetInputCount() && !info.GetInputName(index).empty();
}

matmul::Shape KernelShape(const MatMulAttrs& attrs) {
  matmul::Shape shape;
  shape.K = attrs.K();
  shape.N = attrs.N;
  shape.bits = attrs.block.bits;
  shape.block_size = attrs.block.block_size;
  shape.symmetric = attrs.block.symmetric;
  shape.act_bits = attrs.act_bits;
  return shape;
}

std::vector<int64_t> OutputShape(const InputTensor& a, int64_t n) {
  std::vector<int64_t> shape = a.shape;
  shape.back() = n;
  return shape;
}

// Runs the kernel's tasks on ONNX Runtime's intra-op thread pool (op_common's ParallelFor: one task
// per index here, and an exception in any task is rethrown on the calling thread).
matmul::ParallelFor OrtParallelFor(const Ort::KernelContext& ctx) {
  return [&ctx](std::size_t total, const std::function<void(std::size_t)>& task) {
    ParallelFor(ctx, static_cast<int64_t>(total), 1, [&task](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) task(static_cast<std::size_t>(i));
    });
  };
}

class MatMulCpuKernel {
 public:
  MatMulCpuKernel(const OrtKernelInfo* info, const NodeRef& node) : node_(node), attrs_(ReadMatMulAttrs(info, node)) {
    std::string error;
    if (!matmul::IsaFromName(std::getenv("BCT_ONNX_ISA"), &isa_, &error)) node_.Fail(error);
    Ort::ConstKernelInfo kernel_info(info);
    const bool zero_points_wired = InputWired(kernel_info, kZeroPoints);
    if (attrs_.block.symmetric && zero_points_wired) {
      node_.Fail("input 'W_zero_points' must be absent when attribute 'symmetric' is 1");
    }
    if (!attrs_.block.symmetric && !zero_points_wired) {
      node_.Fail("input 'W_zero_points' is required when attribute 'symmetric' is 0");
    }
    const InputTensor codes = ConstantInput(kernel_info, kCodes);
    const InputTensor scales = ConstantInput(kernel_info, kScales);
    const InputTensor zero_points = ConstantInput(kernel_info, kZeroPoints);
    if (codes.present && scales.present && (attrs_.block.symmetric || zero_points.present)) {
      packed_ = PackWeights(codes, scales, zero_points);  // once: constant initializers
    }
  }

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor a = GetInput(ctx, kA);
      const InputTensor codes = GetInput(ctx, kCodes);
      const InputTensor scales = GetInput(ctx, kScales);
      const InputTensor zero_points = GetInput(ctx, kZeroPoints);
      const InputTensor bias = GetInput(ctx, kBias);
      const int64_t rows = CheckActivation(node_, attrs_, a);
      CheckWeights(node_, attrs_, codes, scales, zero_points);
      CheckBias(node_, attrs_, bias);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", OutputShape(a, attrs_.N), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (rows == 0) return;
      std::unique_ptr<matmul::PackedWeights> per_call;
      const matmul::PackedWeights* packed = packed_.get();
      if (packed == nullptr) {  // weights computed at run time: repack for this call
        per_call = PackWeights(codes, scales, zero_points);
        packed = per_call.get();
      }
      matmul::Compute(*packed, a.As<float>(), rows, bias.present ? bias.As<float>() : nullptr, y,
                      OrtParallelFor(ctx));
    });
  }

 private:
  std::unique_ptr<matmul::PackedWeights> PackWeights(const InputTensor& codes, const InputTensor& scales,
                                                     const InputTensor& zero_points) const {
    matmul::WeightInputs weights;
    weights.scale_kind = CheckWeights(node_, attrs_, codes, scales, zero_points);
    weights.codes = codes.As<uint8_t>();
    weights.scales = scales.data;
    weights.zero_points = zero_points.present ? zero_points.As<uint8_t>() : nullptr;
    return matmul::Pack(KernelShape(attrs_), weights, isa_);
  }

  NodeRef node_;
  MatMulAttrs attrs_;
  matmul::Isa isa_ = matmul::Isa::kScalar;
  std::unique_ptr<matmul::PackedWeights> packed_;
};

#if defined(BCT_WITH_CUDA) && BCT_WITH_CUDA
class MatMulCudaKernel {
 public:
  MatMulCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : node_(node), attrs_(ReadMatMulAttrs(info, node)) {}

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor a = GetInput(ctx, kA);
      const InputTensor codes = GetInput(ctx, kCodes);
      const InputTensor scales = GetInput(ctx, kScales);
      const InputTensor zero_points = GetInput(ctx, kZeroPoints);
      const InputTensor bias = GetInput(ctx, kBias);
      const int64_t rows = CheckActivation(node_, attrs_, a);
      const ScaleKind kind = CheckWeights(node_, attrs_, codes, scales, zero_points);
      CheckBias(node_, attrs_, bias);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", OutputShape(a, attrs_.N), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (rows == 0) return;
      const cuda::MatMulParams params{attrs_.K(),          attrs_.N,          attrs_.block.bits,
                                      attrs_.block.block_size, attrs_.block.symmetric, attrs_.act_bits,
                                      static_cast<int>(kind),  attrs_.row_bytes(), attrs_.num_blocks()};
      const char* error = cuda::LaunchBlockMatMul(
          params, a.As<float>(), rows, codes.As<uint8_t>(), scales.data,
          zero_points.present ? zero_points.As<uint8_t>() : nullptr, bias.present ? bias.As<float>() : nullptr, y,
          ctx.GetGPUComputeStream());
      if (error != nullptr) node_.Fail(std::string("CUDA error: ") + error, ORT_EP_FAIL);
    });
  }

 private:
  NodeRef node_;
  MatMulAttrs attrs_;
};
#endif

}  // namespace

void AppendMatMulOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<MatMulSchema, MatMulCpuKernel> cpu_op(nullptr);
  domain.Add(&cpu_op);
#if defined(BCT_WITH_CUDA) && BCT_WITH_CUDA
  static BlockCustomOp<MatMulSchema, MatMulCudaKernel> cuda_op(kCudaProvider);
  domain.Add(&cuda_op);
#endif
}

}  // namespace bct
