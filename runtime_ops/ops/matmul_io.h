// BlockMatMul (docs/ops.md): attributes, validation and shape inference shared by its CPU kernel
// (cpu/matmul_op.cc) and CUDA kernel (cuda/matmul_op_cuda.cc).
//
// Inputs: A float32 [..., K] (or, with in_bits > 0, uint8 codes [..., row_bytes(K, in_bits)]),
// W_codes uint8 [N, row_bytes(K)], W_scales float16|float32|uint8 [N, nb], W_zero_points [N, nb]
// (optional, present iff symmetric=0: uint8 integer zero points, or float16/float32 float offsets),
// bias float32 [N] (optional), A_scales [..., nb(K, in_block_size)] and A_zero_points (iff
// in_symmetric=0) of a quantized A (the operand convention of docs/ops.md with A's scales and zero
// points as trailing inputs 5 and 6, so the weight inputs keep their positions).
// Outputs: Y float32 [..., N], or with out_bits > 0 codes [..., row_bytes(N)], scales, zero points
// (iff out_symmetric=0): exactly block_format.quantize of the float result along N. Attribute
// `epilogue` (bct/epilogue.h) applies GELU or SiLU gating to the product first; with `silu_gate`
// Y has N / 2 columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/epilogue.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace matmul_op {

enum MatMulInput : size_t {
  kA = 0,
  kCodes = 1,
  kScales = 2,
  kZeroPoints = 3,
  kBias = 4,
  kAScales = 5,
  kAZeroPoints = 6
};

// Y's type and shape: A's leading dims, then N (float32), or the result convention of out_*.
inline OrtStatusPtr ORT_API_CALL InferMatMulOutput(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  try {
    nonlinear::InferDims dims = nonlinear::InferInputDims(ctx, kA);
    int64_t n = -1;
    InferIntAttr(ctx, "N", &n);
    if (n > 0 && InferStringAttr(ctx, "epilogue", "none") == "silu_gate") n /= 2;
    if (!dims.known) {
      // A's rank is unknown (seen in T5's decoder): the outputs still need their dtypes (ONNX
      // Runtime would otherwise type them like the last input), so they get a transformer's rank 3
      // ([batch, sequence, N]) with unnamed leading dims. The kernel's output shape wins at run time;
      // ONNX Runtime only warns when the real rank differs.
      dims.known = true;
      dims.dims = {-1, -1, -1};
      dims.symbols = {"", "", ""};
    }
    dims.dims.back() = n > 0 ? n : -1;
    dims.symbols.back() = "";
    return nonlinear::InferResult(ctx, dims);
  } catch (...) {
    return nullptr;
  }
}

struct MatMulSchema {
  static constexpr const char* kName = "BlockMatMul";
  static constexpr size_t kInputCount = 7;
  static constexpr size_t kOutputCount = 3;
  static bool InputOptional(size_t index) { return index >= kZeroPoints; }
  static bool OutputOptional(size_t index) { return index > 0; }
  // Output dtypes follow out_bits / out_scale_kind: InferMatMulOutput sets them.
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) =
      InferMatMulOutput;
};

struct MatMulAttrs {
  BlockAttrs block;  // bits, block_size, symmetric, axis_size = K
  int64_t N = 0;
  int act_bits = 0;
  nonlinear::OperandAttrs in;   // in_bits, in_block_size, in_symmetric (A's encoding)
  nonlinear::ResultAttrs out;   // out_bits, out_block_size, out_symmetric, out_scale_kind (Y's)
  Epilogue epilogue = Epilogue::kNone;

  int64_t out_width() const { return epilogue_width(epilogue, N); }  // Y's last dim

  int64_t K() const { return block.axis_size; }
  int64_t row_bytes() const { return bct::row_bytes(block.axis_size, block.bits); }
  int64_t num_blocks() const { return bct::num_blocks(block.axis_size, block.block_size); }
};

// Attribute `epilogue`: none | gelu | gelu_tanh | silu_gate (N even: gate rows, then up rows).
inline Epilogue ReadEpilogue(const OrtKernelInfo* info, const NodeRef& node, int64_t n) {
  const std::string name = AttrString(info, "epilogue", "none");
  if (name == "none") return Epilogue::kNone;
  if (name == "gelu") return Epilogue::kGelu;
  if (name == "gelu_tanh") return Epilogue::kGeluTanh;
  if (name == "silu_gate") {
    if (n % 2 != 0) {
      node.Fail("attribute 'epilogue' silu_gate needs an even N (gate rows, then up rows), got N = " +
                std::to_string(n));
    }
    return Epilogue::kSiluGate;
  }
  node.Fail("attribute 'epilogue' must be 'none', 'gelu', 'gelu_tanh' or 'silu_gate', got '" + name + "'");
  return Epilogue::kNone;
}

inline MatMulAttrs ReadMatMulAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  MatMulAttrs attrs;
  attrs.block = ReadBlockAttrs(info, node, "K");
  attrs.N = AttrInt(info, node, "N");
  if (attrs.N < 1) node.Fail("attribute 'N' must be >= 1, got " + std::to_string(attrs.N));
  const int64_t act_bits = AttrInt(info, "act_bits", 0);
  if (act_bits != 0 && (act_bits < kMinBits || act_bits > kMaxBits)) {
    node.Fail("attribute 'act_bits' must be 0 (float activations) or in 2..8, got " + std::to_string(act_bits));
  }
  attrs.act_bits = static_cast<int>(act_bits);
  attrs.in = nonlinear::ReadOperandAttrs(info, node);
  attrs.out = nonlinear::ReadResultAttrs(info, node);
  attrs.epilogue = ReadEpilogue(info, node, attrs.N);
  if (attrs.in.axis_size != 0 && attrs.in.axis_size != attrs.K()) {
    node.Fail("attribute 'in_axis_size' must be 0 or K = " + std::to_string(attrs.K()) + ", got " +
              std::to_string(attrs.in.axis_size));
  }
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

inline void ExpectShape(const NodeRef& node, const char* name, const InputTensor& in, const std::vector<int64_t>& want,
                 const char* meaning) {
  if (in.shape != want) {
    node.Fail(std::string("input '") + name + "' must have shape " + meaning + " = " + ShapeString(want) +
              ", got " + ShapeString(in.shape));
  }
}

// Checks the weight inputs against the attributes; returns the scale kind and, in zp_kind, what
// W_zero_points holds (its dtype: uint8 zero points or float16/float32 offsets). zero_points and
// bias may be absent (present == false).
inline ScaleKind CheckWeights(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& codes,
                       const InputTensor& scales, const InputTensor& zero_points,
                       ZeroPointKind* zp_kind = nullptr) {
  if (!codes.present) node.Fail("input 'W_codes' is missing");
  if (!scales.present) node.Fail("input 'W_scales' is missing");
  ExpectDtype(node, "W_codes", codes, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  ExpectShape(node, "W_codes", codes, {attrs.N, attrs.row_bytes()}, "[N, ceil(K * bits / 8)]");
  const ScaleKind kind = ScaleKindOfInput(scales, node, "W_scales");
  ExpectShape(node, "W_scales", scales, {attrs.N, attrs.num_blocks()}, "[N, ceil(K / block_size)]");
  if (attrs.block.symmetric && zero_points.present) {
    node.Fail("input 'W_zero_points' must be absent when attribute 'symmetric' is 1");
  }
  if (!attrs.block.symmetric) {
    if (!zero_points.present) node.Fail("input 'W_zero_points' is required when attribute 'symmetric' is 0");
    const ZeroPointKind zk = ZeroPointKindOfInput(zero_points, node, "W_zero_points");
    ExpectShape(node, "W_zero_points", zero_points, {attrs.N, attrs.num_blocks()}, "[N, ceil(K / block_size)]");
    if (zp_kind != nullptr) *zp_kind = zk;
  } else if (zp_kind != nullptr) {
    *zp_kind = ZeroPointKind::kInteger;
  }
  return kind;
}

inline void CheckBias(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& bias) {
  if (!bias.present) return;
  ExpectDtype(node, "bias", bias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectShape(node, "bias", bias, {attrs.N}, "[N]");
}

// The validated activation of one call: float A, or A's codes with their scales and zero points.
struct Activation {
  int64_t rows = 0;              // M: product of A's leading dimensions
  std::vector<int64_t> lead;     // A's leading dimensions
  const float* x = nullptr;      // in_bits = 0
  const uint8_t* codes = nullptr;  // in_bits > 0: [..., row_bytes(K, in_bits)]
  const void* scales = nullptr;
  ScaleKind scale_kind = ScaleKind::kFloat32;
  const uint8_t* zero_points = nullptr;  // nullptr when in_symmetric = 1
  int64_t row_bytes = 0;
  int64_t num_blocks = 0;
};

// True when a quantized A is in the format the kernel quantizes A into itself (act_bits,
// block_size, symmetric, float32 scales): its codes are used directly, without dequantizing.
inline bool IsOwnActivationFormat(const MatMulAttrs& attrs, const Activation& a) {
  return a.codes != nullptr && attrs.act_bits > 0 && attrs.in.bits == attrs.act_bits &&
         attrs.in.block_size == attrs.block.block_size && attrs.in.symmetric && a.scale_kind == ScaleKind::kFloat32;
}

// Checks A (inputs 0, 5, 6) against K and the in_* attributes.
inline Activation CheckActivation(const NodeRef& node, const MatMulAttrs& attrs, const InputTensor& a,
                           const InputTensor& scales, const InputTensor& zero_points) {
  Activation act;
  if (!a.present) node.Fail("input 'A' is missing");
  ExpectMinRank(node, "A", a, 1);
  act.lead.assign(a.shape.begin(), a.shape.end() - 1);
  act.rows = ElementCount(act.lead);
  if (attrs.in.bits == 0) {
    ExpectDtype(node, "A", a, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (a.shape.back() != attrs.K()) {
      node.Fail("input 'A' must have last dimension K = " + std::to_string(attrs.K()) + ", got shape " +
                ShapeString(a.shape));
    }
    if (scales.present) node.Fail("input 'A_scales' must be absent (empty name) when in_bits=0");
    if (zero_points.present) node.Fail("input 'A_zero_points' must be absent (empty name) when in_bits=0");
    act.x = a.As<float>();
    return act;
  }
  const int bits = attrs.in.bits;
  if (a.dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    node.Fail(std::string("input 'A' must be uint8 codes when in_bits=") + std::to_string(bits) + ", got " +
              DtypeName(a.dtype));
  }
  act.row_bytes = row_bytes(attrs.K(), bits);
  act.num_blocks = num_blocks(attrs.K(), attrs.in.block_size);
  if (a.shape.back() != act.row_bytes) {
    node.Fail("input 'A' (codes) must have last dimension row_bytes(K " + std::to_string(attrs.K()) + ", in_bits " +
              std::to_string(bits) + ") = " + std::to_string(act.row_bytes) + ", got shape " + ShapeString(a.shape));
  }
  if (!scales.present) node.Fail("input 'A_scales' (input 5) is required when in_bits > 0");
  act.scale_kind = ScaleKindOfInput(scales, node, "A_scales");
  std::vector<int64_t> block_shape = act.lead;
  block_shape.push_back(act.num_blocks);
  if (scales.shape != block_shape) {
    node.Fail("input 'A_scales' must have shape " + ShapeString(block_shape) + " (A's leading dims and ceil(K " +
              std::to_string(attrs.K()) + " / in_block_size " + std::to_string(attrs.in.block_size) + ")), got " +
              ShapeString(scales.shape));
  }
  if (attrs.in.symmetric) {
    if (zero_points.present) node.Fail("input 'A_zero_points' must be absent when in_symmetric=1");
  } else {
    if (!zero_points.present) node.Fail("input 'A_zero_points' (input 6) is required when in_symmetric=0");
    ExpectDtype(node, "A_zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    if (zero_points.shape != block_shape) {
      node.Fail("input 'A_zero_points' must have shape " + ShapeString(block_shape) + " like 'A_scales', got " +
                ShapeString(zero_points.shape));
    }
    act.zero_points = zero_points.As<uint8_t>();
  }
  act.codes = a.As<uint8_t>();
  act.scales = scales.data;
  return act;
}

inline std::vector<int64_t> OutputShape(const Activation& a, int64_t n) {
  std::vector<int64_t> shape = a.lead;
  shape.push_back(n);
  return shape;
}

// Runs the kernel's tasks on ONNX Runtime's intra-op thread pool (op_common's ParallelFor: one task
// per index here, and an exception in any task is rethrown on the calling thread).
struct MatMulCall {
  Activation a;
  InputTensor codes, scales, zero_points, bias;
  ScaleKind weight_scale_kind = ScaleKind::kFloat16;
  ZeroPointKind weight_zero_point_kind = ZeroPointKind::kInteger;
  nonlinear::Result r;
};

// decoded_codes: the kernel's decoded W_codes when they are entropy-coded (ops/coded_codes.h), used
// in place of the input (which holds the stream); unpacked_zero_points likewise for W_zero_points
// packed at the code width (ops/packed_zero_points.h).
inline MatMulCall PrepareCall(const Ort::KernelContext& ctx, const NodeRef& node, const MatMulAttrs& attrs,
                              const InputTensor* decoded_codes = nullptr,
                              const InputTensor* unpacked_zero_points = nullptr) {
  MatMulCall c;
  c.a = CheckActivation(node, attrs, GetInput(ctx, kA), GetInput(ctx, kAScales), GetInput(ctx, kAZeroPoints));
  c.codes = decoded_codes != nullptr ? *decoded_codes : GetInput(ctx, kCodes);
  c.scales = GetInput(ctx, kScales);
  c.zero_points = unpacked_zero_points != nullptr ? *unpacked_zero_points : GetInput(ctx, kZeroPoints);
  c.bias = GetInput(ctx, kBias);
  c.weight_scale_kind = CheckWeights(node, attrs, c.codes, c.scales, c.zero_points, &c.weight_zero_point_kind);
  CheckBias(node, attrs, c.bias);
  c.r = nonlinear::AllocateResult(ctx, node, attrs.out, OutputShape(c.a, attrs.out_width()));
  return c;
}

}  // namespace matmul_op
}  // namespace bct
