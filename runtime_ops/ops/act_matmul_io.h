// BlockActMatMul (docs/ops.md): attributes, validation and shape inference shared by its CPU and
// CUDA kernels. A [..., M, K] is the operand of ops/nonlinear_io.h (inputs 0..2, float or
// blockwise-quantized along K); B is float32 input 3, [..., K, N] (or [..., N, K] with transpose_b=1).
// Both are quantized at run time along K with act_bits / block_size, symmetric, float32 scales.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {

struct ActMatMulAttrs {
  int act_bits = 8;
  int64_t block_size = 32;
  bool transpose_b = false;
};

constexpr int64_t kMaxActBlockSize = 65536;

// act_bits (2..8) and block_size (1..kMaxActBlockSize) of the run-time activation quantizer
// (BlockActMatMul, BlockAttention).
inline void ReadActFormat(const OrtKernelInfo* info, const NodeRef& node, int* act_bits, int64_t* block_size) {
  const int64_t bits = AttrInt(info, node, "act_bits");
  if (bits < kMinBits || bits > kMaxBits) node.Fail("attribute 'act_bits' must be in 2..8, got " + std::to_string(bits));
  *act_bits = static_cast<int>(bits);
  *block_size = AttrInt(info, node, "block_size");
  // Block dot products are int32 sums of block_size products of magnitude <= 2**14 (-128 * -128):
  // exact while block_size * 2**14 < 2**31, i.e. block_size < 2**17; the limit is the power of two below.
  if (*block_size < 1 || *block_size > kMaxActBlockSize) {
    node.Fail("attribute 'block_size' must be in 1.." + std::to_string(kMaxActBlockSize) +
              " (block dot products are int32), got " + std::to_string(*block_size));
  }
}

inline ActMatMulAttrs ReadActMatMulAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  ActMatMulAttrs a;
  ReadActFormat(info, node, &a.act_bits, &a.block_size);
  a.transpose_b = ReadFlag(info, node, "transpose_b", 0);
  return a;
}

// Validated geometry of one call.
struct ActMatMulGeometry {
  int64_t m = 0, k = 0, n = 0;
  int64_t a_batches = 0, b_batches = 0, out_batches = 0;
  std::vector<int64_t> a_index;  // per output batch: A's batch (flat)
  std::vector<int64_t> b_index;  // per output batch: B's batch (flat)
  std::vector<int64_t> out_shape;
  const float* b = nullptr;
};

inline ActMatMulGeometry CheckActMatMul(const Ort::KernelContext& ctx, const NodeRef& node, const ActMatMulAttrs& attrs,
                                        const Operand& a) {
  ActMatMulGeometry g;
  if (a.shape.size() < 2) node.Fail("input 'A' must have rank >= 2 ([..., M, K]), got shape " + ShapeString(a.shape));
  const InputTensor b = GetInput(ctx, 3);
  if (!b.present) node.Fail("input 'B' is required");
  ExpectDtype(node, "B", b, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectMinRank(node, "B", b, 2);
  g.m = a.shape[a.shape.size() - 2];
  g.k = a.shape.back();
  const int64_t b_k = attrs.transpose_b ? b.shape.back() : b.shape[b.shape.size() - 2];
  g.n = attrs.transpose_b ? b.shape[b.shape.size() - 2] : b.shape.back();
  if (b_k != g.k) {
    node.Fail("input 'B' " + ShapeString(b.shape) + " does not match A's K = " + std::to_string(g.k) + " (transpose_b=" +
              std::to_string(attrs.transpose_b ? 1 : 0) + ")");
  }
  const std::vector<int64_t> a_batch(a.shape.begin(), a.shape.end() - 2);
  const std::vector<int64_t> b_batch(b.shape.begin(), b.shape.end() - 2);
  const size_t rank = std::max(a_batch.size(), b_batch.size());
  std::vector<int64_t> out_batch(rank), a_dims(rank, 1), b_dims(rank, 1);
  std::copy(a_batch.begin(), a_batch.end(), a_dims.begin() + (rank - a_batch.size()));
  std::copy(b_batch.begin(), b_batch.end(), b_dims.begin() + (rank - b_batch.size()));
  for (size_t i = 0; i < rank; ++i) {
    if (a_dims[i] != b_dims[i] && a_dims[i] != 1 && b_dims[i] != 1) {
      node.Fail("batch dims of input 'A' " + ShapeString(a.shape) + " and input 'B' " + ShapeString(b.shape) +
                " do not broadcast");
    }
    out_batch[i] = a_dims[i] == 1 ? b_dims[i] : a_dims[i];
  }
  g.a_batches = ElementCount(a_batch);
  g.b_batches = ElementCount(b_batch);
  g.out_batches = ElementCount(out_batch);
  g.a_index.resize(static_cast<size_t>(g.out_batches));
  g.b_index.resize(static_cast<size_t>(g.out_batches));
  for (int64_t o = 0; o < g.out_batches; ++o) {
    int64_t rest = o, ai = 0, bi = 0, a_stride = 1, b_stride = 1;
    for (size_t i = rank; i-- > 0;) {
      const int64_t coord = rest % out_batch[i];
      rest /= out_batch[i];
      ai += (a_dims[i] == 1 ? 0 : coord) * a_stride;
      bi += (b_dims[i] == 1 ? 0 : coord) * b_stride;
      a_stride *= a_dims[i];
      b_stride *= b_dims[i];
    }
    g.a_index[static_cast<size_t>(o)] = ai;
    g.b_index[static_cast<size_t>(o)] = bi;
  }
  g.out_shape = out_batch;
  g.out_shape.push_back(g.m);
  g.out_shape.push_back(g.n);
  g.b = b.As<float>();
  return g;
}

struct ActMatMulSchema {
  static constexpr const char* kName = "BlockActMatMul";
  static constexpr size_t kInputCount = 4;
  static constexpr size_t kOutputCount = 3;
  static bool InputOptional(size_t index) { return index == 1 || index == 2; }
  static bool OutputOptional(size_t index) { return index > 0; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  static OrtStatusPtr ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept;
};

// What the CPU and CUDA kernels of BlockActMatMul share: the node and its in_* / out_* / op
// attributes (read once, at kernel creation), and the validated inputs and allocated result of a call.
class ActMatMulKernelBase {
 public:
  ActMatMulKernelBase(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node),
        in_(ReadOperandAttrs(info, node_)),
        out_(ReadResultAttrs(info, node_)),
        attrs_(ReadActMatMulAttrs(info, node_)) {}

  static bool InputOnHost(size_t) { return false; }

 protected:
  struct Call {
    Operand a;
    ActMatMulGeometry g;
    Result r;
  };

  // Reads and checks A, then B against A, then allocates the result (in that order).
  Call Prepare(const Ort::KernelContext& ctx) const {
    Call c;
    c.a = ReadOperand(ctx, node_, in_);
    c.g = CheckActMatMul(ctx, node_, attrs_, c.a);
    c.r = AllocateResult(ctx, node_, out_, c.g.out_shape);
    return c;
  }

  NodeRef node_;
  OperandAttrs in_;
  ResultAttrs out_;
  ActMatMulAttrs attrs_;
};

}  // namespace nonlinear
}  // namespace bct
