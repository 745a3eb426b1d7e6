// float8e4m3 scales with one per-tensor factor (attribute scale_factor on BlockMatMul, BlockGather
// and BlockDequantize, docs/ops.md): the constant scales input is float8e4m3fn and a block's scale is
// e4m3(byte) * scale_factor in float32 (block_format.scales_to_float32). Kernels widen them once, at
// creation, into float32 scales that every call reads in place of the input, so no kernel changes.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bct/op_common.h"

namespace bct {

// The value of an ONNX FLOAT8E4M3FN byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; no
// infinities, S.1111.111 is NaN.
inline float float_from_e4m3fn(uint8_t stored) {
  const float sign = (stored & 0x80) ? -1.0f : 1.0f;
  const int exponent = (stored >> 3) & 0xF;
  const int mantissa = stored & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m * 2**-9
  return sign * std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);        // 1.m * 2**(e-7)
}

// The kernel's widened scales: float32 values, one a block, and the view every call validates in
// place of the float8e4m3fn input (data is set by the kernel: host bytes on CPU, the device copy on CUDA).
struct WidenedScales {
  std::vector<float> values;
  InputTensor view;
};

// True when the node has attribute scale_factor (then *factor holds it); fails naming the attribute
// when it is not a float, or not finite and > 0.
inline bool ReadScaleFactor(const OrtKernelInfo* info, const NodeRef& node, float* factor) {
  const OrtApi& api = Ort::GetApi();
  float value = 0.0f;
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "scale_factor", &value)) {
    AttrReadFailed(status, "scale_factor", "a float");
    return false;
  }
  if (!std::isfinite(value) || !(value > 0.0f)) {
    node.Fail("attribute 'scale_factor' must be a finite float > 0, got " + std::to_string(value));
  }
  *factor = value;
  return true;
}

// Widens the constant float8e4m3fn scales input `index` (named input_name) of a node with attribute
// scale_factor: value = e4m3(byte) * factor, one float32 multiply. Fails naming the input when it is
// not a constant initializer of dtype float8e4m3fn.
inline WidenedScales WidenConstantScales(const OrtKernelInfo* info, const NodeRef& node, size_t index,
                                         const char* input_name, float factor) {
  const Ort::ConstKernelInfo kernel_info(info);
  const InputTensor scales = ConstantInput(kernel_info, index);
  const std::string name = std::string("input '") + input_name + "'";
  if (!scales.present) node.Fail(name + " must be a constant initializer when attribute 'scale_factor' is set");
  if (scales.dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN) {
    node.Fail(name + " must be float8e4m3fn when attribute 'scale_factor' is set, got " + DtypeName(scales.dtype));
  }
  WidenedScales widened;
  widened.values.resize(static_cast<size_t>(scales.size));
  const uint8_t* bytes = scales.As<uint8_t>();
  for (int64_t b = 0; b < scales.size; ++b) widened.values[b] = float_from_e4m3fn(bytes[b]) * factor;
  widened.view = scales;
  widened.view.dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  widened.view.data = widened.values.data();
  return widened;
}

}  // namespace bct
