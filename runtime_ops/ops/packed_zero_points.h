// Integer zero points packed at the code width (attribute zero_points_packed = 1 on BlockMatMul,
// BlockGather and BlockDequantize, docs/ops.md): the constant zero-points input holds, per row of
// blocks, ceil(num_blocks * bits / 8) bytes packed like a row of codes (4-bit: two a byte). Kernels
// unpack them once, at creation, into the one-byte-a-block layout they read, so no kernel changes.
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
// view every call validates in place of the packed input (shape [..., num_blocks]; data is set by the
// kernel: host bytes on CPU, the device copy on CUDA).
struct UnpackedZeroPoints {
  std::vector<uint8_t> values;
  InputTensor view;
};

// Unpacks the constant input `index` (named input_name) of zero points packed at `bits` bits, rows of
// num_blocks. Fails naming the input when it is not a constant uint8 initializer or its last dim is
// not ceil(num_blocks * bits / 8).
inline UnpackedZeroPoints UnpackConstantZeroPoints(const OrtKernelInfo* info, const NodeRef& node, size_t index,
                                                   const char* input_name, int bits, int64_t num_blocks_per_row) {
  const InputTensor packed = ConstantInput(Ort::ConstKernelInfo(info), index);
  const std::string name = std::string("input '") + input_name + "'";
  if (!packed.present) {
    node.Fail(name + " must be a constant initializer when attribute 'zero_points_packed' is 1");
  }
  ExpectDtype(node, input_name, packed, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  ExpectMinRank(node, input_name, packed, 1);
  const int64_t packed_row = row_bytes(num_blocks_per_row, bits);
  if (packed.shape.back() != packed_row) {
    node.Fail(name + " (zero_points_packed=1) last dim must be ceil(num_blocks * bits / 8) = ceil(" +
              std::to_string(num_blocks_per_row) + " * " + std::to_string(bits) + " / 8) = " +
              std::to_string(packed_row) + ", got shape " + ShapeString(packed.shape));
  }
  const int64_t rows = packed_row == 0 ? 0 : packed.size / packed_row;
  UnpackedZeroPoints unpacked;
  unpacked.values.resize(static_cast<size_t>(rows * num_blocks_per_row));
  const uint8_t* bytes = packed.As<uint8_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = bytes + r * packed_row;
    uint8_t* out = unpacked.values.data() + r * num_blocks_per_row;
    for (int64_t b = 0; b < num_blocks_per_row; ++b) out[b] = static_cast<uint8_t>(get_code(row, b, bits, packed_row));
  }
  unpacked.view.present = true;
  unpacked.view.dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  unpacked.view.shape = packed.shape;
  unpacked.view.shape.back() = num_blocks_per_row;
  unpacked.view.size = rows * num_blocks_per_row;
  unpacked.view.data = unpacked.values.data();
  return unpacked;
}

}  // namespace bct
