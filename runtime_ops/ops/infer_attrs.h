// Attribute reads and the output setter of type and shape inference, shared by BlockQuantize
// (ops/quantize_shape.cc) and the nonlinear ops / BlockActMatMul (ops/nonlinear_infer.cc). Written
// against the C API so that nothing here can throw into ONNX Runtime: a missing or unreadable
// attribute is reported by the return value (or the fallback), never by an error status.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bct/op_common.h"

namespace bct {

// Reads int attribute `name` into *value; false (value untouched) when absent or unreadable.
inline bool InferIntAttr(OrtShapeInferContext* ctx, const char* name, int64_t* value) {
  const OrtApi& api = Ort::GetApi();
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* s = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    api.ReleaseStatus(s);
    return false;
  }
  if (attr == nullptr) return false;
  size_t out = 0;
  if (OrtStatus* s = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, value, sizeof(*value), &out)) {
    api.ReleaseStatus(s);
    return false;
  }
  return true;
}

// Reads string attribute `name`; `fallback` when absent, empty or unreadable.
inline std::string InferStringAttr(OrtShapeInferContext* ctx, const char* name, const char* fallback) {
  const OrtApi& api = Ort::GetApi();
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* s = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    api.ReleaseStatus(s);
    return fallback;
  }
  if (attr == nullptr) return fallback;
  size_t size = 0;
  if (OrtStatus* s = api.ReadOpAttr(attr, ORT_OP_ATTR_STRING, nullptr, 0, &size)) api.ReleaseStatus(s);
  if (size == 0) return fallback;
  std::string text(size, '\0');
  if (OrtStatus* s = api.ReadOpAttr(attr, ORT_OP_ATTR_STRING, text.data(), size, &size)) {
    api.ReleaseStatus(s);
    return fallback;
  }
  text.resize(size);
  while (!text.empty() && text.back() == '\0') text.pop_back();
  return text;
}

// The scales' dtype a scale_kind attribute (`name`, default "float16") asks for; an unknown kind
// gives float16 here and is reported by the kernel.
inline ONNXTensorElementDataType InferScaleDtype(OrtShapeInferContext* ctx, const char* name) {
  const std::string kind = InferStringAttr(ctx, name, "float16");
  if (kind == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (kind == "pow2") return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// Sets output `index` to dtype with dims and their symbolic names (one per dim; "" for none).
inline OrtStatusPtr InferSetOutput(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType dtype,
                                   const std::vector<int64_t>& dims, std::vector<const char*> symbols) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = api.CreateTensorTypeAndShapeInfo(&info)) return s;
  OrtStatus* s = api.SetTensorElementType(info, dtype);
  if (!s) s = api.SetDimensions(info, dims.data(), dims.size());
  if (!s) s = api.SetSymbolicDimensions(info, symbols.data(), symbols.size());
  if (!s) s = api.ShapeInferContext_SetOutputTypeShape(ctx, index, info);
  api.ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

}  // namespace bct
