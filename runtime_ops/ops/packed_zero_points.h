// Integer zero points packed at the code width (attribute zero_points_packed = 1 on BlockMatMul,
// BlockGather and BlockDequantize, docs/ops.md): the constant zero-points input is one dense stream
// uint8 [ceil(count * bits / 8)] of the zero points of every block, in the order of the (constant)
// scales, packed like one row of codes (4-bit: two a byte). Kernels unpack them once, at creation,
// into the one-byte-a-block layout they read, so no kernel changes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/op_common.h"

namespace bct {

// True for zero_points_packed = 1, false for 0 (the default); anything else fails, and so does 1 on
// a symmetric node (it has no zero points).
inline bool ReadZeroPointsPacked(const OrtKernelInfo* info, const NodeRef& node, bool symmetric) {
  const int64_t packed = AttrInt(info, "zero_points_packed", 0);
  if (packed != 0 && packed != 1) {
    node.Fail("attribute 'zero_points_packed' must be 0 or 1, got " + std::to_string(packed));
  }
  if (packed == 1 && symmetric) node.Fail("attribute 'zero_points_packed' is 1 but the node is symmetric (no zero points)");
  return packed == 1;
}

// The unpacked zero points of a kernel whose zero-points input is packed: one byte a block, and the
// view every call validates in place of the packed input (the scales' shape; data is set by the
// kernel: host bytes on CPU, the device copy on CUDA).
struct UnpackedZeroPoints {
  std::vector<uint8_t> values;
  InputTensor view;
};

// Unpacks the constant input `index` (named input_name) of zero points packed at `bits` bits, one a
// block of the constant scales input `scales_index` (scales_name). Fails naming the input when either
// is not a constant initializer or the stream's shape is not [ceil(count * bits / 8)].
inline UnpackedZeroPoints UnpackConstantZeroPoints(const OrtKernelInfo* info, const NodeRef& node, size_t index,
                                                   const char* input_name, size_t scales_index,
                                                   const char* scales_name, int bits) {
  const Ort::ConstKernelInfo kernel_info(info);
  const InputTensor packed = ConstantInput(kernel_info, index);
  const InputTensor scales = ConstantInput(kernel_info, scales_index);
  const std::string name = std::string("input '") + input_name + "'";
  if (!packed.present) {
    node.Fail(name + " must be a constant initializer when attribute 'zero_points_packed' is 1");
  }
  if (!scales.present) {
    node.Fail(std::string("input '") + scales_name +
              "' must be a constant initializer when attribute 'zero_points_packed' is 1 (it gives the zero points' shape)");
  }
  ExpectDtype(node, input_name, packed, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  const int64_t count = scales.size;
  const int64_t stream_bytes = row_bytes(count, bits);
  if (packed.shape.size() != 1 || packed.shape[0] != stream_bytes) {
    node.Fail(name + " (zero_points_packed=1) must have shape [ceil(" + std::to_string(count) + " blocks * " +
              std::to_string(bits) + " bits / 8)] = [" + std::to_string(stream_bytes) + "] for '" + scales_name +
              "' of shape " + ShapeString(scales.shape) + ", got shape " + ShapeString(packed.shape));
  }
  UnpackedZeroPoints unpacked;
  unpacked.values.resize(static_cast<size_t>(count));
  const uint8_t* bytes = packed.As<uint8_t>();
  for (int64_t b = 0; b < count; ++b) unpacked.values[b] = static_cast<uint8_t>(get_code(bytes, b, bits, stream_bytes));
  unpacked.view.present = true;
  unpacked.view.dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  unpacked.view.shape = scales.shape;
  unpacked.view.size = count;
  unpacked.view.data = unpacked.values.data();
  return unpacked;
}

}  // namespace bct
