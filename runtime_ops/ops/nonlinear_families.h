// The five row-wise nonlinear op families (docs/ops.md): their attributes, their op-specific inputs
// and their row function. Shared by the CPU kernels (cpu/nonlinear_row_op.h calls Row) and the CUDA
// kernels (which read Params and run the same bct/nonlinear_math.h row functions on the device).
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {

// Optional float attribute with a default.
inline float AttrFloat(const OrtKernelInfo* info, const char* name, float default_value) {
  float value = 0.0f;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, &value)) {
    api.ReleaseStatus(status);
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
  static constexpr size_t kOutputCount = 3;
  static bool InputOptional(size_t index) {
    return index == 1 || index == 2 || (index >= 3 && Family::ExtraInputOptional(index - 3));
  }
  static bool OutputOptional(size_t index) { return index > 0; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  static OrtStatusPtr ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
    try {
      return InferResult(ctx, InferOperandDims(ctx));
    } catch (...) {
      return nullptr;  // advisory; the kernel validates at run time
    }
  }
};

// CPU row entry points (cpu/gelu.cc, cpu/silu.cc, cpu/softmax.cc, cpu/norm.cc): the nl:: row functions compiled
// once per x86 instruction set (GCC target_clones) with the same float32 operations, so the result
// is the same bits on every CPU. The *Baseline twins are the same source compiled for baseline
// x86-64 only: kernels created while BCT_ONNX_BASELINE_SIMD is set use them, which lets the tests
// check the code every CPU without AVX2 runs. The CUDA kernels call neither.
void GeluRowCpu(float* y, int64_t n, nl::GeluForm form);
void SiluRowCpu(float* y, int64_t n);
void SoftmaxRowCpu(float* y, int64_t n);
void LayerNormRowCpu(float* y, int64_t n, const float* scale, const float* bias, float epsilon);
void RMSNormRowCpu(float* y, int64_t n, const float* scale, float epsilon);
void GeluRowCpuBaseline(float* y, int64_t n, nl::GeluForm form);
void SiluRowCpuBaseline(float* y, int64_t n);
void SoftmaxRowCpuBaseline(float* y, int64_t n);
void LayerNormRowCpuBaseline(float* y, int64_t n, const float* scale, const float* bias, float epsilon);
void RMSNormRowCpuBaseline(float* y, int64_t n, const float* scale, float epsilon);

// The row function a CPU kernel uses, chosen when it is created: explicit AVX-512 code
// (cpu/nonlinear_avx512.cc; Gelu's exact form only) where the CPU has it and neither
// BCT_ONNX_BASELINE_SIMD nor BCT_ONNX_ISA (scalar, avx2, avxvnni) says otherwise, else the ISA clones
// above (or their baseline twins). Same bits on every path.
using SoftmaxRowFn = void (*)(float* y, int64_t n);
using GeluRowFn = void (*)(float* y, int64_t n, nl::GeluForm form);
SoftmaxRowFn SelectSoftmaxRowCpu(bool baseline);
// Several consecutive rows of n (y rows n apart) at once, or nullptr where the CPU path has no such
// function (the kernel then calls the row function per row).
using SoftmaxRowsFn = void (*)(float* y, int64_t rows, int64_t n);
SoftmaxRowsFn SelectSoftmaxRowsCpu(bool baseline);
GeluRowFn SelectGeluRowCpu(bool baseline, nl::GeluForm form);

// BCT_ONNX_BASELINE_SIMD set (and not "0"): use the baseline-ISA CPU loops (read at kernel creation).
inline bool BaselineSimdRequested() {
  const char* value = std::getenv("BCT_ONNX_BASELINE_SIMD");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

struct GeluFamily {
  static constexpr const char* kName = "BlockGelu";
  static constexpr size_t kExtraInputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  GeluFamily(const OrtKernelInfo* info, const NodeRef& node) : baseline(BaselineSimdRequested()) {
    const std::string approximate = AttrString(info, "approximate", "none");
    if (approximate == "none") {
      form = nl::GeluForm::kErf;
    } else if (approximate == "tanh") {
      form = nl::GeluForm::kTanh;
    } else {
      node.Fail("attribute 'approximate' must be 'none' or 'tanh', got '" + approximate + "'");
    }
    row = SelectGeluRowCpu(baseline, form);
  }
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, int64_t) const { return {}; }
  void Row(const Params&, float* y, int64_t n) const { row(y, n, form); }
  bool baseline;
  nl::GeluForm form = nl::GeluForm::kErf;
  GeluRowFn row = nullptr;
};

// BlockSilu: no attributes of its own.
struct SiluFamily {
  static constexpr const char* kName = "BlockSilu";
  static constexpr size_t kExtraInputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  SiluFamily(const OrtKernelInfo*, const NodeRef&) : baseline(BaselineSimdRequested()) {}
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, int64_t) const { return {}; }
  void Row(const Params&, float* y, int64_t n) const { (baseline ? SiluRowCpuBaseline : SiluRowCpu)(y, n); }
  bool baseline;
};

struct SoftmaxFamily {
  static constexpr const char* kName = "BlockSoftmax";
  static constexpr size_t kExtraInputs = 0;
  static bool ExtraInputOptional(size_t) { return false; }
  SoftmaxFamily(const OrtKernelInfo* info, const NodeRef& node)
      : baseline(BaselineSimdRequested()), row(SelectSoftmaxRowCpu(baseline)), rows(SelectSoftmaxRowsCpu(baseline)) {
    CheckLastAxis(info, node);
  }
  struct Params {};
  Params Prepare(const Ort::KernelContext&, const NodeRef&, int64_t) const { return {}; }
  void Row(const Params&, float* y, int64_t n) const { row(y, n); }
  // count consecutive rows of n at once (the CPU kernel's groups of rows).
  void Rows(const Params& params, float* y, int64_t count, int64_t n) const {
    if (rows != nullptr) {
      rows(y, count, n);
      return;
    }
    for (int64_t i = 0; i < count; ++i) Row(params, y + i * n, n);
  }
  bool baseline;
  SoftmaxRowFn row;
  SoftmaxRowsFn rows;
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
  static bool ExtraInputOptional(size_t extra) { return extra == 1; }
  LayerNormFamily(const OrtKernelInfo* info, const NodeRef& node)
      : epsilon(ReadEpsilon(info, node, 1e-5f)), baseline(BaselineSimdRequested()) {
    CheckLastAxis(info, node);
  }
  struct Params {
    const float* scale;
    const float* bias;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, int64_t d) const {
    return Params{ReadVectorInput(ctx, node, 3, "scale", d, false), ReadVectorInput(ctx, node, 4, "bias", d, true)};
  }
  void Row(const Params& p, float* y, int64_t n) const {
    (baseline ? LayerNormRowCpuBaseline : LayerNormRowCpu)(y, n, p.scale, p.bias, epsilon);
  }
  float epsilon;
  bool baseline;
};

struct RMSNormFamily {
  static constexpr const char* kName = "BlockRMSNorm";
  static constexpr size_t kExtraInputs = 1;  // scale
  static bool ExtraInputOptional(size_t) { return false; }
  RMSNormFamily(const OrtKernelInfo* info, const NodeRef& node)
      : epsilon(ReadEpsilon(info, node, 1e-5f)), baseline(BaselineSimdRequested()) {
    CheckLastAxis(info, node);
  }
  struct Params {
    const float* scale;
  };
  Params Prepare(const Ort::KernelContext& ctx, const NodeRef& node, int64_t d) const {
    return Params{ReadVectorInput(ctx, node, 3, "scale", d, false)};
  }
  void Row(const Params& p, float* y, int64_t n) const {
    (baseline ? RMSNormRowCpuBaseline : RMSNormRowCpu)(y, n, p.scale, epsilon);
  }
  float epsilon;
  bool baseline;
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
    const typename Family::Params params = family_.Prepare(ctx, node_, x.axis_size);
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

namespace bct {
namespace nonlinear {

// Per-family registration (cpu/gelu.cc, cpu/silu.cc, cpu/softmax.cc, cpu/norm.cc, cpu/act_matmul.cc and the
// CUDA counterparts), called by bct::AppendNonlinearOps (ops/nonlinear_register.cc).
void AppendGeluCpuOps(Ort::CustomOpDomain& domain);
void AppendSiluCpuOps(Ort::CustomOpDomain& domain);
void AppendSoftmaxCpuOps(Ort::CustomOpDomain& domain);
void AppendNormCpuOps(Ort::CustomOpDomain& domain);
void AppendActMatMulCpuOps(Ort::CustomOpDomain& domain);
void AppendNonlinearCudaOps(Ort::CustomOpDomain& domain);

}  // namespace nonlinear
}  // namespace bct
