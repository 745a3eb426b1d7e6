// Op declarations and input validation shared by the CPU and CUDA kernels of BlockQuantize,
// BlockDequantize and BlockGather (docs/ops.md). Both providers register the same op class
// template, so the schema ONNX Runtime builds from them is identical; only the Kernel differs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/op_common.h"

namespace bct {

// ---------------------------------------------------------------------------------------------
// Op declaration: every input is declared with an undefined type so the kernels check dtypes
// themselves and report them in the library's own words.

template <class Schema, class Kernel>
struct BlockCustomOp : Ort::CustomOpBase<BlockCustomOp<Schema, Kernel>, Kernel, /*WithStatus=*/true> {
  explicit BlockCustomOp(const char* provider) : provider_(provider) {
    this->InferOutputShapeFn = Schema::InferOutputShape;  // nullptr for ops without one
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    NodeRef node(Schema::kName, info);
    return Guard(node, [&] { *kernel = new Kernel(info, node); });
  }

  const char* GetName() const { return Schema::kName; }
  const char* GetExecutionProviderType() const { return provider_; }

  size_t GetInputTypeCount() const { return Schema::kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return Schema::InputOptional(index) ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                        : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t index) const {
    return Kernel::InputOnHost(index) ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }

  size_t GetOutputTypeCount() const { return Schema::kOutputCount; }
  ONNXTensorElementDataType GetOutputType(size_t index) const { return Schema::OutputType(index); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return Schema::OutputOptional(index) ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                         : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }

 private:
  const char* provider_;  // nullptr: CPU
};

// BlockQuantize: X -> codes, scales, zero_points (optional output, present iff symmetric=0).
struct QuantizeSchema {
  static constexpr const char* kName = "BlockQuantize";
  static constexpr size_t kInputCount = 1;
  static constexpr size_t kOutputCount = 3;
  static bool InputOptional(size_t) { return false; }
  static bool OutputOptional(size_t index) { return index == 2; }
  static ONNXTensorElementDataType OutputType(size_t index) {
    // The scales' dtype follows the scale_kind attribute; InferOutputShape sets it.
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  static OrtStatusPtr ORT_API_CALL InferOutputShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) noexcept;
};

// BlockDequantize: codes, scales, zero_points (optional) -> Y.
struct DequantizeSchema {
  static constexpr const char* kName = "BlockDequantize";
  static constexpr size_t kInputCount = 3;
  static constexpr size_t kOutputCount = 1;
  static bool InputOptional(size_t index) { return index == 2; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

// BlockGather: indices, codes, scales, zero_points (optional) -> Y.
struct GatherSchema {
  static constexpr const char* kName = "BlockGather";
  static constexpr size_t kInputCount = 4;
  static constexpr size_t kOutputCount = 1;
  static bool InputOptional(size_t index) { return index == 3; }
  static bool OutputOptional(size_t) { return false; }
  static ONNXTensorElementDataType OutputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static constexpr OrtStatusPtr(ORT_API_CALL* InferOutputShape)(const OrtCustomOp*, OrtShapeInferContext*) = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Attributes and validation

// A scale kind attribute (BlockQuantize's scale_kind, the nonlinear ops' out_scale_kind):
// "float16" (default), "float32", "pow2".
inline ScaleKind ParseScaleKind(const std::string& text, const NodeRef& node, const char* attr = "scale_kind") {
  if (text == "float16") return ScaleKind::kFloat16;
  if (text == "float32") return ScaleKind::kFloat32;
  if (text == "pow2") return ScaleKind::kPow2;
  node.Fail(std::string("attribute '") + attr + "' must be 'float16', 'float32' or 'pow2', got '" + text + "'");
}

inline ONNXTensorElementDataType ScaleDtype(ScaleKind kind) {
  switch (kind) {
    case ScaleKind::kFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case ScaleKind::kFloat32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
}

// The scale kind a scales input carries, from its dtype. input_name and uint8_note word the error
// ("input '<input_name>' must be float16, float32 or uint8 (<uint8_note>), got ...").
inline ScaleKind ScaleKindOfInput(const InputTensor& scales, const NodeRef& node, const char* input_name = "scales",
                                  const char* uint8_note = "pow2 exponents") {
  switch (scales.dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return ScaleKind::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return ScaleKind::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return ScaleKind::kPow2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2: return ScaleKind::kFloat8E5M2;
    default:
      node.Fail(std::string("input '") + input_name + "' must be float16, float32, float8e5m2 or uint8 (" +
                uint8_note + "), got " + DtypeName(scales.dtype));
  }
}

// What a zero_points input holds, from its dtype: uint8 integer zero points, or float16 / float32
// float offsets (value = u * scale + offset), as ORT's MatMulNBits tells them apart.
inline ZeroPointKind ZeroPointKindOfInput(const InputTensor& zero_points, const NodeRef& node,
                                          const char* input_name = "zero_points") {
  switch (zero_points.dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return ZeroPointKind::kInteger;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return ZeroPointKind::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return ZeroPointKind::kFloat32;
    default:
      node.Fail(std::string("input '") + input_name +
                "' must be uint8 (integer zero points) or float16 / float32 (float offsets: value = code * scale + "
                "offset), got " + DtypeName(zero_points.dtype));
  }
}

// Geometry of a batch of independent quantized rows.
struct RowsGeometry {
  int64_t rows = 0;       // number of rows (product of the leading dims, or of the indices)
  int64_t axis_size = 0;  // D
  int64_t row_bytes = 0;  // ceil(D * bits / 8)
  int64_t num_blocks = 0; // ceil(D / block_size)
  ScaleKind scale_kind = ScaleKind::kFloat16;
  ZeroPointKind zero_point_kind = ZeroPointKind::kInteger;  // asymmetric: from the zero_points dtype
};

// Checks codes [..., row_bytes(D)], scales [..., nb], zero_points [..., nb] against the attributes
// and each other. lead_rank is the number of leading dims all three share (-1: any, equal).
inline RowsGeometry CheckQuantizedRows(const NodeRef& node, const BlockAttrs& attrs, const InputTensor& codes,
                                       const InputTensor& scales, const InputTensor& zero_points,
                                       bool table) {
  RowsGeometry g;
  g.axis_size = attrs.axis_size;
  g.row_bytes = row_bytes(attrs.axis_size, attrs.bits);
  g.num_blocks = num_blocks(attrs.axis_size, attrs.block_size);
  ExpectDtype(node, "codes", codes, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  g.scale_kind = ScaleKindOfInput(scales, node);
  const size_t min_rank = table ? 2 : 1;
  if (table && codes.shape.size() != 2) {
    node.Fail("input 'codes' must be a 2-D table [V, row_bytes], got shape " + ShapeString(codes.shape));
  }
  ExpectMinRank(node, "codes", codes, min_rank);
  if (codes.shape.back() != g.row_bytes) {
    node.Fail("input 'codes' last dim must be ceil(axis_size * bits / 8) = " + std::to_string(g.row_bytes) +
              " for axis_size=" + std::to_string(attrs.axis_size) + ", bits=" + std::to_string(attrs.bits) +
              ", got shape " + ShapeString(codes.shape));
  }
  std::vector<int64_t> expect(codes.shape.begin(), codes.shape.end() - 1);
  expect.push_back(g.num_blocks);
  if (scales.shape != expect) {
    node.Fail("input 'scales' must have shape " + ShapeString(expect) + " (codes' leading dims and ceil(" +
              std::to_string(attrs.axis_size) + " / block_size " + std::to_string(attrs.block_size) +
              ") blocks), got " + ShapeString(scales.shape));
  }
  if (attrs.symmetric) {
    if (zero_points.present) node.Fail("input 'zero_points' must be absent when symmetric=1");
  } else {
    if (!zero_points.present) node.Fail("input 'zero_points' is required when symmetric=0");
    g.zero_point_kind = ZeroPointKindOfInput(zero_points, node);
    if (zero_points.shape != expect) {
      node.Fail("input 'zero_points' must have shape " + ShapeString(expect) + " like 'scales', got " +
                ShapeString(zero_points.shape));
    }
  }
  g.rows = ElementCount(std::vector<int64_t>(codes.shape.begin(), codes.shape.end() - 1));
  return g;
}

// The row format of a kernel (Format: cpu::RowFormat or cuda::RowFormat, the same fields in the
// same order; CUDA's scale_kind is an int).
template <class Format>
Format MakeRowFormat(int bits, int64_t block_size, bool symmetric, ScaleKind scale_kind, int64_t axis_size,
                     int64_t row_bytes, int64_t num_blocks,
                     ZeroPointKind zero_point_kind = ZeroPointKind::kInteger) {
  Format fmt{};
  fmt.bits = bits;
  fmt.block_size = block_size;
  fmt.symmetric = symmetric;
  fmt.scale_kind = static_cast<decltype(fmt.scale_kind)>(scale_kind);
  fmt.axis_size = axis_size;
  fmt.row_bytes = row_bytes;
  fmt.num_blocks = num_blocks;
  fmt.zero_point_kind = static_cast<decltype(fmt.zero_point_kind)>(zero_point_kind);
  return fmt;
}

template <class Format>
Format BlockRowFormat(const BlockAttrs& attrs, const RowsGeometry& g) {
  return MakeRowFormat<Format>(attrs.bits, attrs.block_size, attrs.symmetric, g.scale_kind, g.axis_size, g.row_bytes,
                               g.num_blocks, g.zero_point_kind);
}

// Gather indices -> table rows in [0, V): checks dtype and range (ONNX Gather: negative counts from
// the end) and names the first offending index.
inline std::vector<int64_t> NormalizeIndices(const NodeRef& node, const InputTensor& indices, int64_t table_rows) {
  std::vector<int64_t> rows(static_cast<size_t>(indices.size));
  auto check = [&](auto* data) {
    for (int64_t i = 0; i < indices.size; ++i) {
      int64_t v = static_cast<int64_t>(data[i]);
      if (v < -table_rows || v >= table_rows) {
        node.Fail("input 'indices' holds " + std::to_string(v) + " at flat position " + std::to_string(i) +
                  ", outside [-" + std::to_string(table_rows) + ", " + std::to_string(table_rows) +
                  ") for a table of " + std::to_string(table_rows) + " rows");
      }
      rows[static_cast<size_t>(i)] = v < 0 ? v + table_rows : v;
    }
  };
  if (indices.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    check(indices.As<int64_t>());
  } else if (indices.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    check(indices.As<int32_t>());
  } else {
    node.Fail(std::string("input 'indices' must be int64 or int32, got ") + DtypeName(indices.dtype));
  }
  return rows;
}

// Output shapes: X [..., D] -> [..., last].
inline std::vector<int64_t> WithLastDim(const std::vector<int64_t>& shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end() - 1);
  out.push_back(last);
  return out;
}

// BlockDequantize's validated inputs (codes, scales, zero_points) and its output Y [..., D].
struct DequantizeCall {
  InputTensor codes, scales, zero_points;
  RowsGeometry g;
  float* y = nullptr;
};

// unpacked_zero_points: the kernel's zero points when they are packed at the code width
// (ops/packed_zero_points.h), used in place of the input.
inline DequantizeCall PrepareDequantize(const Ort::KernelContext& ctx, const NodeRef& node, const BlockAttrs& attrs,
                                        const InputTensor* unpacked_zero_points = nullptr) {
  DequantizeCall c;
  c.codes = GetInput(ctx, 0);
  c.scales = GetInput(ctx, 1);
  c.zero_points = unpacked_zero_points != nullptr ? *unpacked_zero_points : GetInput(ctx, 2);
  c.g = CheckQuantizedRows(node, attrs, c.codes, c.scales, c.zero_points, /*table=*/false);
  c.y = GetOutput<float>(ctx, node, 0, "Y", WithLastDim(c.codes.shape, c.g.axis_size),
                         ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  return c;
}

// BlockGather's validated table (codes, scales, zero_points), the table rows its indices select,
// and its output Y [indices..., D]. The indices must be readable on the host.
struct GatherCall {
  InputTensor codes, scales, zero_points;
  RowsGeometry g;
  std::vector<int64_t> rows;
  float* y = nullptr;
};

// decoded_codes: the kernel's decoded table codes when they are entropy-coded (ops/coded_codes.h);
// unpacked_zero_points: its zero points when they are packed at the code width (ops/packed_zero_points.h).
inline GatherCall PrepareGather(const Ort::KernelContext& ctx, const NodeRef& node, const BlockAttrs& attrs,
                                const InputTensor* decoded_codes = nullptr,
                                const InputTensor* unpacked_zero_points = nullptr) {
  GatherCall c;
  const InputTensor indices = GetInput(ctx, 0);
  c.codes = decoded_codes != nullptr ? *decoded_codes : GetInput(ctx, 1);
  c.scales = GetInput(ctx, 2);
  c.zero_points = unpacked_zero_points != nullptr ? *unpacked_zero_points : GetInput(ctx, 3);
  c.g = CheckQuantizedRows(node, attrs, c.codes, c.scales, c.zero_points, /*table=*/true);
  c.rows = NormalizeIndices(node, indices, c.codes.shape[0]);
  std::vector<int64_t> out_shape = indices.shape;
  out_shape.push_back(c.g.axis_size);
  c.y = GetOutput<float>(ctx, node, 0, "Y", out_shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  return c;
}

// Reads BlockQuantize's attributes (bits, block_size, symmetric, scale_kind).
struct QuantizeAttrs {
  BlockAttrs block;
  ScaleKind scale_kind = ScaleKind::kFloat16;
};

inline QuantizeAttrs ReadQuantizeAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  QuantizeAttrs attrs;
  attrs.block = ReadBlockAttrs(info, node, nullptr);
  attrs.scale_kind = ParseScaleKind(AttrString(info, "scale_kind", "float16"), node);
  return attrs;
}

// Checks X float32 [..., D] of BlockQuantize.
inline RowsGeometry CheckQuantizeInput(const NodeRef& node, const QuantizeAttrs& attrs, const InputTensor& x) {
  ExpectDtype(node, "X", x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  ExpectMinRank(node, "X", x, 1);
  RowsGeometry g;
  g.axis_size = x.shape.back();
  if (g.axis_size < 1) node.Fail("input 'X' last dim must be >= 1, got shape " + ShapeString(x.shape));
  g.row_bytes = row_bytes(g.axis_size, attrs.block.bits);
  g.num_blocks = num_blocks(g.axis_size, attrs.block.block_size);
  g.rows = ElementCount(std::vector<int64_t>(x.shape.begin(), x.shape.end() - 1));
  g.scale_kind = attrs.scale_kind;
  return g;
}

// Allocates BlockQuantize's outputs; zero_points must be wired iff symmetric=0.
struct QuantizeOutputs {
  uint8_t* codes = nullptr;
  void* scales = nullptr;
  uint8_t* zero_points = nullptr;
};

inline QuantizeOutputs GetQuantizeOutputs(const Ort::KernelContext& ctx, const NodeRef& node,
                                          const QuantizeAttrs& attrs, const InputTensor& x, const RowsGeometry& g) {
  QuantizeOutputs out;
  out.codes = GetOutput<uint8_t>(ctx, node, 0, "codes", WithLastDim(x.shape, g.row_bytes),
                                 ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  const std::vector<int64_t> block_shape = WithLastDim(x.shape, g.num_blocks);
  out.scales = GetOutput<void>(ctx, node, 1, "scales", block_shape, ScaleDtype(attrs.scale_kind));
  if (ctx.GetOutputCount() >= 3) {
    out.zero_points = GetOutput<uint8_t>(ctx, node, 2, "zero_points", block_shape,
                                         ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  }
  // An empty batch gives empty outputs, whose data pointers may be null: nothing to check or write.
  if (g.rows == 0) return out;
  if (out.codes == nullptr) node.Fail("output 'codes' is required");
  if (out.scales == nullptr) node.Fail("output 'scales' is required");
  if (!attrs.block.symmetric && out.zero_points == nullptr) {
    node.Fail("output 'zero_points' is required when symmetric=0");
  }
  if (attrs.block.symmetric && out.zero_points != nullptr) {
    node.Fail("output 'zero_points' must be absent when symmetric=1");
  }
  return out;
}

// BlockQuantize's validated input X [..., D] and its allocated outputs.
struct QuantizeCall {
  InputTensor x;
  RowsGeometry g;
  QuantizeOutputs out;
};

inline QuantizeCall PrepareQuantize(const Ort::KernelContext& ctx, const NodeRef& node, const QuantizeAttrs& attrs) {
  QuantizeCall c;
  c.x = GetInput(ctx, 0);
  c.g = CheckQuantizeInput(node, attrs, c.x);
  c.out = GetQuantizeOutputs(ctx, node, attrs, c.x, c.g);
  return c;
}

// What every CPU and CUDA kernel of BlockQuantize, BlockDequantize and BlockGather holds: the node
// and its attributes, read once at kernel creation. Inputs live in the provider's memory unless a
// kernel hides InputOnHost.
template <class Attrs, Attrs (*ReadAttrs)(const OrtKernelInfo*, const NodeRef&)>
class BlockKernelBase {
 public:
  BlockKernelBase(const OrtKernelInfo* info, const NodeRef& node) : node_(node), attrs_(ReadAttrs(info, node_)) {}

  static bool InputOnHost(size_t) { return false; }

 protected:
  NodeRef node_;
  Attrs attrs_;
};

// BlockDequantize's and BlockGather's attributes: bits, block_size, symmetric, axis_size.
inline BlockAttrs ReadCodesAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  return ReadBlockAttrs(info, node, "axis_size");
}

using QuantizeKernelBase = BlockKernelBase<QuantizeAttrs, ReadQuantizeAttrs>;
using DequantizeKernelBase = BlockKernelBase<BlockAttrs, ReadCodesAttrs>;  // and BlockGather's

}  // namespace bct
