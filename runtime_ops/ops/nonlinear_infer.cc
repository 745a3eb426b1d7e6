// Type and shape inference of the nonlinear ops and BlockActMatMul (ops/nonlinear_io.h), written
// against the C API so nothing here can throw into ONNX Runtime. Unknown dims are set to -1.
#include <atomic>
#include <string>
#include <vector>

#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {

InferDims InferInputDims(OrtShapeInferContext* ctx, size_t index) {
  InferDims out;
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by ctx
  if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, index, &info)) {
    api.ReleaseStatus(s);
    return out;
  }
  size_t rank = 0;
  if (OrtStatus* s = api.GetDimensionsCount(info, &rank)) {
    api.ReleaseStatus(s);
    return out;
  }
  if (rank == 0) return out;  // unknown rank (or a scalar, which the kernel rejects)
  std::vector<int64_t> dims(rank);
  std::vector<const char*> symbols(rank, nullptr);
  if (OrtStatus* s = api.GetDimensions(info, dims.data(), rank)) {
    api.ReleaseStatus(s);
    return out;
  }
  if (OrtStatus* s = api.GetSymbolicDimensions(info, symbols.data(), rank)) {
    api.ReleaseStatus(s);
    return out;
  }
  out.known = true;
  for (size_t i = 0; i < rank; ++i) {
    const bool symbolic = symbols[i] != nullptr && symbols[i][0] != '\0';
    out.symbols.emplace_back(symbolic ? symbols[i] : "");
    out.dims.push_back(symbolic || dims[i] < 0 ? -1 : dims[i]);
  }
  return out;
}

InferDims InferOperandDims(OrtShapeInferContext* ctx) {
  InferDims d = InferInputDims(ctx, 0);
  if (!d.known) return d;
  int64_t bits = 0;
  InferIntAttr(ctx, "in_bits", &bits);
  if (bits == 0) return d;
  int64_t axis_size = 0;
  InferIntAttr(ctx, "in_axis_size", &axis_size);
  int64_t axis = -1;
  if (axis_size > 0) {
    axis = axis_size;
  } else if (bits >= kMinBits && bits <= kMaxBits && d.dims.back() > 0 && (d.dims.back() * 8) % bits == 0) {
    axis = d.dims.back() * 8 / bits;
  }
  d.dims.back() = axis;
  d.symbols.back() = "";
  return d;
}

namespace {

// A fresh symbolic name for a dim nothing is known about: ONNX Runtime would read -1 without a
// name as a dim of size -1 (and warn when the real size differs).
std::string FreshSymbol() {
  static std::atomic<uint64_t> counter{0};
  return "bct_dim_" + std::to_string(counter.fetch_add(1));
}

// Sets output index to dtype with the leading dims of `lead` (all but its last) and a last dim of
// `last` / `last_symbol` (-1 and "": unknown).
OrtStatusPtr SetOutput(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType dtype,
                       const InferDims& lead, int64_t last, const std::string& last_symbol = "") {
  std::vector<int64_t> dims(lead.dims.begin(), lead.dims.end() - 1);
  std::vector<std::string> names(lead.symbols.begin(), lead.symbols.end() - 1);
  dims.push_back(last);
  names.push_back(last > 0 ? "" : last_symbol);
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 0 && names[i].empty()) names[i] = FreshSymbol();
    if (!names[i].empty()) dims[i] = -1;
  }
  std::vector<const char*> symbols;
  for (const std::string& n : names) symbols.push_back(n.c_str());
  return InferSetOutput(ctx, index, dtype, dims, symbols);
}

}  // namespace

static InferDims AssumedRank3() {
  InferDims d;
  d.known = true;
  d.dims = {-1, -1, -1};
  d.symbols = {"", "", ""};
  return d;
}

OrtStatusPtr InferFloatOutput(OrtShapeInferContext* ctx, size_t index, const InferDims& inferred) {
  const InferDims logical = inferred.known ? inferred : AssumedRank3();  // as InferResult below
  return SetOutput(ctx, index, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, logical, logical.dims.back(),
                   logical.symbols.back());
}

OrtStatusPtr InferResult(OrtShapeInferContext* ctx, const InferDims& inferred) {
  // An operand of unknown rank: the outputs still need their dtypes (ONNX Runtime would otherwise type
  // them like an input, and the kernel would refuse its own output), so they get a transformer's rank 3
  // with unknown dims; the kernel's shapes win at run time (ONNX Runtime warns if the rank differs).
  const InferDims logical = inferred.known ? inferred : AssumedRank3();
  const OrtApi& api = Ort::GetApi();
  int64_t bits = 0, block_size = 0, symmetric = 1;
  InferIntAttr(ctx, "out_bits", &bits);
  if (bits == 0) {
    if (OrtStatus* s = SetOutput(ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, logical, logical.dims.back(),
                                 logical.symbols.back())) {
      return s;
    }
    // Outputs the attributes do not ask for get a type so that the kernel, not type inference,
    // reports them (index out of range when absent: ignored).
    for (size_t i = 1; i < 3; ++i) {
      if (OrtStatus* s = SetOutput(ctx, i, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, logical, -1)) api.ReleaseStatus(s);
    }
    return nullptr;
  }
  InferIntAttr(ctx, "out_block_size", &block_size);
  InferIntAttr(ctx, "out_symmetric", &symmetric);
  const ONNXTensorElementDataType scale_dtype = InferScaleDtype(ctx, "out_scale_kind");
  const int64_t d = logical.dims.back();
  const bool bits_ok = bits >= kMinBits && bits <= kMaxBits;
  const int64_t codes_last = (d > 0 && bits_ok) ? row_bytes(d, static_cast<int>(bits)) : -1;
  const int64_t blocks_last = (d > 0 && block_size >= 1) ? num_blocks(d, block_size) : -1;
  if (OrtStatus* s = SetOutput(ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, logical, codes_last)) return s;
  // A node missing an output the attributes ask for is reported by the kernel in its own words.
  if (OrtStatus* s = SetOutput(ctx, 1, scale_dtype, logical, blocks_last)) api.ReleaseStatus(s);
  if (OrtStatus* s = SetOutput(ctx, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, logical, blocks_last)) api.ReleaseStatus(s);
  return nullptr;
}

}  // namespace nonlinear
}  // namespace bct

#include "ops/act_matmul_io.h"
#include "ops/attention_io.h"

namespace bct {
namespace nonlinear {

OrtStatusPtr ORT_API_CALL ActMatMulSchema::InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  try {
    const InferDims a = InferOperandDims(ctx);
    const InferDims b = InferInputDims(ctx, 3);
    if (!a.known || !b.known || a.dims.size() < 2 || b.dims.size() < 2) return InferResult(ctx, InferDims{});
    int64_t transpose_b = 0;
    InferIntAttr(ctx, "transpose_b", &transpose_b);
    const size_t ra = a.dims.size() - 2, rb = b.dims.size() - 2, rank = std::max(ra, rb);
    InferDims out;
    out.known = true;
    for (size_t i = 0; i < rank; ++i) {
      const bool has_a = i + ra >= rank, has_b = i + rb >= rank;
      const int64_t da = has_a ? a.dims[i + ra - rank] : 1, db = has_b ? b.dims[i + rb - rank] : 1;
      const std::string sa = has_a ? a.symbols[i + ra - rank] : "", sb = has_b ? b.symbols[i + rb - rank] : "";
      if (da == 1) {
        out.dims.push_back(db);
        out.symbols.push_back(sb);
      } else if (db == 1 || (da == db && da > 0) || (da > 1 && db < 0)) {
        out.dims.push_back(da);
        out.symbols.push_back(da > 0 ? "" : sa);
      } else if (db > 1 && da < 0) {
        out.dims.push_back(db);
        out.symbols.push_back("");
      } else {
        out.dims.push_back(-1);
        out.symbols.push_back(!sa.empty() && sa == sb ? sa : "");
      }
    }
    out.dims.push_back(a.dims[a.dims.size() - 2]);
    out.symbols.push_back(a.symbols[a.symbols.size() - 2]);
    const size_t n_index = transpose_b ? b.dims.size() - 2 : b.dims.size() - 1;
    out.dims.push_back(b.dims[n_index]);
    out.symbols.push_back(b.symbols[n_index]);
    return InferResult(ctx, out);
  } catch (...) {
    return nullptr;
  }
}

// BlockAttention: Y has Q's shape, float32; the present cache (outputs 1..4, with the step inputs)
// has the type of the past (inputs 1, 4, 2, 5) and its dims but the sequence length.
OrtStatusPtr ORT_API_CALL AttentionSchema::InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  try {
    InferDims y = InferInputDims(ctx, 0);
    int64_t q_heads = 0, kv_heads = 0;
    InferIntAttr(ctx, "q_heads", &q_heads);
    InferIntAttr(ctx, "kv_heads", &kv_heads);
    if (y.known && y.dims.size() == 3 && kv_heads > 0 && !InferInputDims(ctx, 1).known) {
      // Q's tensor also holds K (and V, when absent): Y has Q's heads only.
      const InferDims v = InferInputDims(ctx, 4);
      const int64_t heads = q_heads + (v.known ? 1 : 2) * kv_heads;
      const bool fits = y.dims[2] > 0 && heads > 0 && y.dims[2] % heads == 0;
      y.dims[2] = fits ? q_heads * (y.dims[2] / heads) : -1;
      y.symbols[2] = "";
    }
    if (OrtStatus* s = InferResult(ctx, y)) return s;
    const OrtApi& api = Ort::GetApi();
    const size_t past_of[4] = {1, 4, 2, 5};  // present K, V, K scales, V scales
    for (size_t out = 1; out <= 4; ++out) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by ctx
      ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, past_of[out - 1], &info)) {
        api.ReleaseStatus(s);
        continue;
      }
      if (info == nullptr) continue;
      if (OrtStatus* s = api.GetTensorElementType(info, &dtype)) {
        api.ReleaseStatus(s);
        continue;
      }
      InferDims past = InferInputDims(ctx, past_of[out - 1]);
      if (!past.known || past.dims.size() != 4) past = InferDims{{-1, -1, -1, -1}, {"", "", "", ""}, true};
      past.dims[2] = -1;
      past.symbols[2] = "";
      if (OrtStatus* s = SetOutput(ctx, out, dtype, past, past.dims[3], past.symbols[3])) api.ReleaseStatus(s);
    }
    return nullptr;
  } catch (...) {
    return nullptr;
  }
}

}  // namespace nonlinear
}  // namespace bct
