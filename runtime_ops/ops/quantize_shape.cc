// Type and shape inference of BlockQuantize: the scales output's dtype follows the scale_kind
// attribute (float16, float32, uint8), which ONNX Runtime cannot know from the declared types.
// Written against the C API so that nothing here can throw into ONNX Runtime.
#include <atomic>
#include <string>
#include <vector>

#include "ops/block_io.h"
#include "ops/infer_attrs.h"

namespace bct {
namespace {

// A fresh symbolic name for a dim nobody named (ORT would take a bare -1 for a concrete value).
std::string FreshDimName() {
  static std::atomic<uint64_t> counter{0};
  return "bct_onnx_dim_" + std::to_string(counter.fetch_add(1));
}

// Sets output index to dtype with X's leading dims and a last dim of `last` (-1: unknown).
OrtStatusPtr SetOutput(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType dtype,
                       const std::vector<int64_t>& lead, const std::vector<const char*>& lead_symbols, int64_t last,
                       const std::string& last_name) {
  std::vector<int64_t> dims(lead);
  std::vector<const char*> symbols(lead_symbols);
  dims.push_back(last);
  symbols.push_back(last >= 0 ? "" : last_name.c_str());
  return InferSetOutput(ctx, index, dtype, dims, symbols);
}

}  // namespace

OrtStatusPtr ORT_API_CALL QuantizeSchema::InferOutputShape(const OrtCustomOp* /*op*/,
                                                            OrtShapeInferContext* ctx) noexcept {
  try {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* input = nullptr;  // owned by ctx
    if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &input)) return s;
    size_t rank = 0;
    if (OrtStatus* s = api.GetDimensionsCount(input, &rank)) return s;
    std::vector<int64_t> dims(rank);
    std::vector<const char*> symbols(rank, nullptr);
    if (rank == 0) {
      // Unknown rank (or a scalar, which the kernel rejects): the outputs still need their dtypes
      // (ONNX Runtime would type them like X, and the kernel would refuse its own outputs), so they
      // get a transformer's rank 3 with unknown dims; the kernel's shapes win at run time.
      rank = 3;
      dims.assign(rank, -1);
      symbols.assign(rank, nullptr);
    } else {
      if (OrtStatus* s = api.GetDimensions(input, dims.data(), rank)) return s;
      if (OrtStatus* s = api.GetSymbolicDimensions(input, symbols.data(), rank)) return s;
    }
    std::vector<std::string> fresh(rank);  // keeps names alive while outputs are set
    for (size_t d = 0; d < rank; ++d) {
      if (symbols[d] == nullptr) symbols[d] = "";
      if (dims[d] < 0 && symbols[d][0] == '\0') {
        fresh[d] = FreshDimName();
        symbols[d] = fresh[d].c_str();
      }
    }
    const int64_t axis_size = dims.back();
    const bool known = axis_size > 0;
    dims.pop_back();
    symbols.pop_back();

    int64_t bits = 0, block_size = 0, symmetric = 1;
    const bool have_bits = InferIntAttr(ctx, "bits", &bits) && bits >= kMinBits && bits <= kMaxBits;
    const bool have_block = InferIntAttr(ctx, "block_size", &block_size) && block_size >= 1;
    InferIntAttr(ctx, "symmetric", &symmetric);
    const ONNXTensorElementDataType scale_dtype = InferScaleDtype(ctx, "scale_kind");

    const int64_t codes_last = (known && have_bits) ? row_bytes(axis_size, static_cast<int>(bits)) : -1;
    const int64_t blocks_last = (known && have_block) ? num_blocks(axis_size, block_size) : -1;
    if (OrtStatus* s = SetOutput(ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, dims, symbols, codes_last, FreshDimName())) return s;
    const std::string blocks_name = FreshDimName();  // scales and zero_points share it
    if (OrtStatus* s = SetOutput(ctx, 1, scale_dtype, dims, symbols, blocks_last, blocks_name)) return s;
    if (symmetric == 0) {
      // A node without the third output is reported by the kernel in the library's own words.
      if (OrtStatus* s = SetOutput(ctx, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, dims, symbols, blocks_last, blocks_name)) {
        api.ReleaseStatus(s);
      }
    }
    return nullptr;
  } catch (...) {
    return nullptr;  // inference is advisory; the kernel validates everything at run time
  }
}

}  // namespace bct
