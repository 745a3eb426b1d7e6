// The five row-wise nonlinear op families (docs/ops.md): their attributes and their op-specific
// inputs. Shared by the CPU kernels (cpu/nonlinear_row_op.h: RunRowsCpu runs each family's row
// function from the kernel's table) and the CUDA kernels (SetOp in cuda/nonlinear_ops_cuda.cc).
#pragma once

#include <algorithm>
#include <string>
#include <utility>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {

// Optional float attribute with a default (an error when of another type, e.g. epsilon=1 as an int).
inline float AttrFloat(const OrtKernelInfo* info, const char* name, float default_value) {
  float value = 0.0f;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, &value)) {
    AttrReadFailed(status, name, "a float");
    return default_value;
  }
  return value;
}

// The ops normalise / reduce over the last axis only; an explicit axis must say so.
inline void CheckLastAxis(const OrtKernelInfo* info, const NodeRef& node) {
  const int64_t axis = AttrInt(info, "axis", -1);
  if (axis != -1) node.Fail("attribute 'axis' must be -1 (the last axis), got " + std::to_string(axis));
}

inline float ReadEpsilon(const OrtKernelInfo* info, const NodeRef& node, float default_value) {
  const float eps = AttrFloat(info, "epsilon", default_value);
  if (!(eps >= 0.0f)) node.Fail("attribute 'epsilon' must be >= 0, got " + std::to_string(eps));
  return eps;
}

// Schema shared by the CPU and CUDA registrations of one row op family.
template <class Family>
struct RowOpSchema {
  static constexpr const char* kName = Family::kName;
  static constexpr size_t kInputCount = 3 + Family::kExtraInputs;
  static constexpr size_t kOutputCount = 3 + Family::kExtraOutputs;
  static bool InputOptional(size_t index) {
    return index == 1 || index == 2 || (index >= 3 && Family::ExtraInputOptional(index - 3));
  }
  static bool OutputOptional(size_t index) { return index > 0; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  static OrtStatusPtr ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
    try {
      const InferDims logical = InferOperandDims(ctx);
      // Extra outputs (the residual sum of the Add + norm ops) are float32 like the operand.
      for (size_t i = 0; i < Family::kExtraOutputs; ++i) {
        if (OrtStatus* s = InferFloatOutput(ctx, 3 + i, logical)) Ort::GetApi().ReleaseStatus(s);
      }
      return InferResult(ctx, logical);
    } catch (...) {
      return nullptr;  // advisory; the kernel validates at run time
    }
  }
};

struct GeluFamily {
  static constexpr const char* kName = "BlockGelu";
  static constexpr size_t kExtraInputs = 0;
  static constexpr size_t kExtraOutputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  GeluFamily(const OrtKernelInfo* info, const NodeRef& node) {
    const std::string approximate = AttrString(info, "approximate", "none");
    if (approximate == "none") {
      form = nl::GeluForm::kErf;
    } else if (approximate == "tanh") {
      form = nl::GeluForm::kTanh;
    } else {
      node.Fail("attribute 'approximate' must be 'none' or 'tanh', got '" + approximate + "'");
    }
  }
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, const Operand&) const { return {}; }
  nl::GeluForm form = nl::GeluForm::kErf;
};

// BlockSilu: no attributes of its own.
struct SiluFamily {
  static constexpr const char* kName = "BlockSilu";
  static constexpr size_t kExtraInputs = 0;
  static constexpr size_t kExtraOutputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  SiluFamily(const OrtKernelInfo*, const NodeRef&) {}
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, const Operand&) const { return {}; }
};

struct SoftmaxFamily {
  static constexpr const char* kName = "BlockSoftmax";
  static constexpr size_t kExtraInputs = 0;
  static constexpr size_t kExtraOutputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  SoftmaxFamily(const OrtKernelInfo* info, const NodeRef& node) { CheckLastAxis(info, node); }
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, const Operand&) const { return {}; }
};

// A float32 [D] op-specific input (LayerNorm scale / bias, RMSNorm scale), checked against D. The
// pointer addresses the provider's memory (host on CPU, device on CUDA).
inline const float* ReadVectorInput(const Ort::KernelContext& ctx, const NodeRef& node, size_t index,
                                    const char* name, int64_t axis_size, bool optional) {
  const InputTensor in = GetInput(ctx, index);
  if (!in.present) {
    if (optional) return nullptr;
    node.Fail(std::string("input '") + name + "' is required");
  }
  ExpectDtype(node, name, in, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (in.shape.size() != 1 || in.shape[0] != axis_size) {
    node.Fail(std::string("input '") + name + "' must have shape [" + std::to_string(axis_size) +
              "] (the normalised axis D), got " + ShapeString(in.shape));
  }
  return in.As<float>();
}

struct LayerNormFamily {
  static constexpr const char* kName = "BlockLayerNorm";
  static constexpr size_t kExtraInputs = 2;  // scale, bias (optional)
  static constexpr size_t kExtraOutputs = 0;
  static bool ExtraInputOptional(size_t extra) { return extra == 1; }
  LayerNormFamily(const OrtKernelInfo* info, const NodeRef& node)
      : epsilon(ReadEpsilon(info, node, 1e-5f)) {
    CheckLastAxis(info, node);
  }
  struct Params {
    const float* scale;
    const float* bias;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x) const {
    const int64_t d = x.axis_size;
    return Params{ReadVectorInput(ctx, node, 3, "scale", d, false), ReadVectorInput(ctx, node, 4, "bias", d, true)};
  }
  float epsilon;
};

struct RMSNormFamily {
  static constexpr const char* kName = "BlockRMSNorm";
  static constexpr size_t kExtraInputs = 1;  // scale
  static constexpr size_t kExtraOutputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  RMSNormFamily(const OrtKernelInfo* info, const NodeRef& node)
      : epsilon(ReadEpsilon(info, node, 1e-5f)) {
    CheckLastAxis(info, node);
  }
  struct Params {
    const float* scale;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x) const {
    return Params{ReadVectorInput(ctx, node, 3, "scale", x.axis_size, false)};
  }
  float epsilon;
};

// The residual input of the Add + norm ops: float32 with the operand's logical shape [..., D], or
// broadcast over leading dims as in ONNX Runtime's SkipLayerNormalization (e.g. [1, S, D] or [S, D]
// for [B, S, D]): without its leading 1s, skip's shape is a suffix of the operand's. Sets *rows to
// the number of skip rows (operand row r reads skip row r % rows).
inline const float* ReadSkipInput(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x,
                                  int64_t* rows) {
  const InputTensor in = GetInput(ctx, 3);
  if (!in.present) node.Fail("input 'skip' is required");
  ExpectDtype(node, "skip", in, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  size_t first = 0;
  while (first + 1 < in.shape.size() && in.shape[first] == 1) ++first;
  const size_t kept = in.shape.size() - first;
  bool suffix = !in.shape.empty() && kept <= x.shape.size();
  for (size_t i = 0; suffix && i < kept; ++i) suffix = in.shape[first + i] == x.shape[x.shape.size() - kept + i];
  if (!suffix) {
    node.Fail("input 'skip' must have the operand's shape " + ShapeString(x.shape) +
              " or broadcast to it over leading dims (e.g. [1, S, D]), got " + ShapeString(in.shape));
  }
  *rows = std::max<int64_t>(1, in.size / std::max<int64_t>(1, x.axis_size));
  return in.As<float>();
}

// Output 3 of the Add + norm ops, x + skip in float32 (the residual stream goes on), when the node has it.
inline float* AllocateSum(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x) {
  void* data = nullptr;
  AllocateOutput(ctx, node, 3, "sum", x.shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &data);
  return static_cast<float*>(data);
}

// BlockAddLayerNorm / BlockAddRMSNorm (ONNX Runtime's SkipLayerNormalization /
// SkipSimplifiedLayerNormalization): v = x + skip (float32), output 3 = v, then the norm of v.
struct AddParams {
  const float* skip;
  int64_t skip_rows;  // operand row r adds skip row r % skip_rows
  float* sum;         // nullptr: the node has no output 3
};

struct AddLayerNormFamily {
  static constexpr const char* kName = "BlockAddLayerNorm";
  static constexpr size_t kExtraInputs = 3;  // skip, scale, bias (optional)
  static constexpr size_t kExtraOutputs = 1;  // sum
  static bool ExtraInputOptional(size_t extra) { return extra == 2; }
  AddLayerNormFamily(const OrtKernelInfo* info, const NodeRef& node) : epsilon(ReadEpsilon(info, node, 1e-5f)) {
    CheckLastAxis(info, node);
  }
  struct Params {
    AddParams add;
    const float* scale;
    const float* bias;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x) const {
    const int64_t d = x.axis_size;
    AddParams add{nullptr, 1, AllocateSum(ctx, node, x)};
    add.skip = ReadSkipInput(ctx, node, x, &add.skip_rows);
    return Params{add, ReadVectorInput(ctx, node, 4, "scale", d, false), ReadVectorInput(ctx, node, 5, "bias", d, true)};
  }
  float epsilon;
};

struct AddRMSNormFamily {
  static constexpr const char* kName = "BlockAddRMSNorm";
  static constexpr size_t kExtraInputs = 2;  // skip, scale
  static constexpr size_t kExtraOutputs = 1;  // sum
  static bool ExtraInputOptional(size_t) { return false; }
  AddRMSNormFamily(const OrtKernelInfo* info, const NodeRef& node) : epsilon(ReadEpsilon(info, node, 1e-5f)) {
    CheckLastAxis(info, node);
  }
  struct Params {
    AddParams add;
    const float* scale;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, const Operand& x) const {
    AddParams add{nullptr, 1, AllocateSum(ctx, node, x)};
    add.skip = ReadSkipInput(ctx, node, x, &add.skip_rows);
    return Params{add, ReadVectorInput(ctx, node, 4, "scale", x.axis_size, false)};
  }
  float epsilon;
};

// What the CPU and CUDA kernels of a row op family share: the node, its in_* / out_* attributes and
// the family (read once, at kernel creation), and the validated inputs and allocated result of a call.
template <class Family>
class RowOpKernelBase {
 public:
  RowOpKernelBase(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), in_(ReadOperandAttrs(info, node_)), out_(ReadResultAttrs(info, node_)), family_(info, node_) {}

  static bool InputOnHost(size_t) { return false; }

 protected:
  struct Call {
    Operand x;
    typename Family::Params params;
    Result r;
  };

  // Reads and checks the operand and the family's inputs, then allocates the result (in that order).
  Call Prepare(const Ort::KernelContext& ctx) const {
    Operand x = ReadOperand(ctx, node_, in_);
    const typename Family::Params params = family_.Prepare(ctx, node_, x);
    const Result r = AllocateResult(ctx, node_, out_, x.shape);
    return Call{std::move(x), params, r};
  }

  NodeRef node_;
  OperandAttrs in_;
  ResultAttrs out_;
  Family family_;
};

}  // namespace nonlinear
}  // namespace bct
