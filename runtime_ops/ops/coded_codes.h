// Entropy-coded weight codes (attribute codes_coding = "huffman" on BlockMatMul and BlockGather,
// docs/ops.md): the constant codes input holds a stream (include/bct/code_entropy.h) that the CPU and
// CUDA kernels decode once, at creation, into the packed layout [rows, row_bytes] they read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/code_entropy.h"
#include "bct/op_common.h"

namespace bct {

// True for codes_coding "huffman", false for "none" (the default); anything else fails.
inline bool ReadCodesCoded(const OrtKernelInfo* info, const NodeRef& node) {
  const std::string coding = AttrString(info, "codes_coding", "none");
  if (coding == "none") return false;
  if (coding == code_entropy::kCoding) return true;
  node.Fail("attribute 'codes_coding' must be 'none' or 'huffman', got '" + coding + "'");
}

// The decoded codes of a kernel whose codes input is entropy-coded: packed bytes, and the view the
// validation of every call sees in place of the stream (shape [rows, row_bytes]; data is set by
// the kernel: host bytes on CPU, the device copy on CUDA).
struct DecodedCodes {
  std::vector<uint8_t> packed;
  InputTensor view;
};

// Decodes the constant input `index` (named input_name) of `bits`-bit codes in rows of row_length;
// rows < 0: as many rows as the stream holds (BlockGather's table). Fails naming the input when it
// is not a constant uint8 initializer or the stream is not valid for these attributes.
inline DecodedCodes DecodeConstantCodes(const OrtKernelInfo* info, const NodeRef& node, size_t index,
                                        const char* input_name, int bits, int64_t rows, int64_t row_length) {
  const InputTensor stream = ConstantInput(Ort::ConstKernelInfo(info), index);
  if (!stream.present) {
    node.Fail(std::string("input '") + input_name +
              "' must be a constant initializer when attribute 'codes_coding' is 'huffman'");
  }
  ExpectDtype(node, input_name, stream, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  const uint8_t* bytes = stream.As<uint8_t>();
  const size_t size = static_cast<size_t>(stream.size);
  if (rows < 0) rows = code_entropy::StreamRows(bytes, size);
  DecodedCodes decoded;
  const std::string error = code_entropy::DecodeToPacked(bytes, size, bits, rows, row_length, &decoded.packed);
  if (!error.empty()) node.Fail(std::string("input '") + input_name + "' (codes_coding 'huffman'): " + error);
  decoded.view.present = true;
  decoded.view.dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  decoded.view.shape = {rows, row_bytes(row_length, bits)};
  decoded.view.size = rows * row_bytes(row_length, bits);
  decoded.view.data = decoded.packed.data();
  return decoded;
}

}  // namespace bct
