// The operand convention of the compressed nonlinear ops and BlockActMatMul (docs/ops.md,
// "Operand convention"), shared by their CPU and CUDA kernels:
//
//   in_bits = 0:     input 0 is float32 X [..., D]; inputs 1, 2 absent (empty names).
//   in_bits = 2..8:  input 0 is uint8 codes [..., row_bytes(D)], input 1 its scales [..., nb]
//                    (float16 / float32 / uint8 pow2, kind read from the dtype), input 2 its zero
//                    points [..., nb] iff in_symmetric = 0. D = in_axis_size, or (0) row_bytes*8/bits.
//   out_bits = 0:    output 0 is float32 Y [..., D].
//   out_bits = 2..8: output 0 codes, output 1 scales (out_scale_kind), output 2 zero points iff
//                    out_symmetric = 0: exactly block_format.quantize along the last axis.
//
// Host code only (ORT headers). Validation failures name the input or attribute at fault.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/infer_attrs.h"

namespace bct {
namespace nonlinear {

// in_* attributes: how input 0..2 encode the op's main operand.
struct OperandAttrs {
  int bits = 0;  // 0: float input
  int64_t block_size = 0;
  bool symmetric = true;
  int64_t axis_size = 0;  // 0: derive from the codes' last dim
};

// out_* attributes: how output 0..2 encode the result.
struct ResultAttrs {
  int bits = 0;  // 0: float output
  int64_t block_size = 0;
  bool symmetric = true;
  ScaleKind scale_kind = ScaleKind::kFloat16;
};

inline void CheckBitsAttr(const NodeRef& node, const char* name, int64_t bits) {
  if (bits != 0 && (bits < kMinBits || bits > kMaxBits)) {
    node.Fail(std::string("attribute '") + name + "' must be 0 (float) or in 2..8, got " + std::to_string(bits));
  }
}

inline bool ReadFlag(const OrtKernelInfo* info, const NodeRef& node, const char* name, int64_t default_value) {
  const int64_t v = AttrInt(info, name, default_value);
  if (v != 0 && v != 1) node.Fail(std::string("attribute '") + name + "' must be 0 or 1, got " + std::to_string(v));
  return v == 1;
}

inline OperandAttrs ReadOperandAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  OperandAttrs a;
  const int64_t bits = AttrInt(info, "in_bits", 0);
  CheckBitsAttr(node, "in_bits", bits);
  a.bits = static_cast<int>(bits);
  a.symmetric = ReadFlag(info, node, "in_symmetric", 1);
  a.axis_size = AttrInt(info, "in_axis_size", 0);
  if (a.axis_size < 0) node.Fail("attribute 'in_axis_size' must be >= 0 (0: derive), got " + std::to_string(a.axis_size));
  if (a.bits > 0) {
    a.block_size = AttrInt(info, "in_block_size", 0);
    if (a.block_size < 1 || a.block_size > kMaxBlockSize) {
      node.Fail("attribute 'in_block_size' must be in 1.." + std::to_string(kMaxBlockSize) + " when in_bits > 0, got " +
                std::to_string(a.block_size));
    }
  }
  return a;
}

inline ResultAttrs ReadResultAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  ResultAttrs a;
  const int64_t bits = AttrInt(info, "out_bits", 0);
  CheckBitsAttr(node, "out_bits", bits);
  a.bits = static_cast<int>(bits);
  a.symmetric = ReadFlag(info, node, "out_symmetric", 1);
  a.scale_kind = ParseScaleKind(AttrString(info, "out_scale_kind", "float16"), node, "out_scale_kind");
  if (a.bits > 0) {
    a.block_size = AttrInt(info, "out_block_size", 0);
    if (a.block_size < 1 || a.block_size > kMaxBlockSize) {
      node.Fail("attribute 'out_block_size' must be in 1.." + std::to_string(kMaxBlockSize) + " when out_bits > 0, got " +
                std::to_string(a.block_size));
    }
  }
  return a;
}

// The validated main operand of one call. Pointers address the provider's memory.
struct Operand {
  bool quantized = false;
  const float* x = nullptr;        // float input
  const uint8_t* codes = nullptr;  // quantized input
  const void* scales = nullptr;
  const uint8_t* zero_points = nullptr;  // nullptr when symmetric
  ScaleKind scale_kind = ScaleKind::kFloat16;
  std::vector<int64_t> shape;  // logical shape [..., D]
  int64_t rows = 0;
  int64_t axis_size = 0;  // D
  int64_t row_bytes = 0;
  int64_t num_blocks = 0;
};

inline std::vector<int64_t> Leading(const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end() - 1);
}

inline std::vector<int64_t> WithLast(const std::vector<int64_t>& shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end() - 1);
  out.push_back(last);
  return out;
}

// Reads and checks inputs 0..2 against the in_* attributes.
inline Operand ReadOperand(const Ort::KernelContext& ctx, const NodeRef& node, const OperandAttrs& attrs) {
  Operand op;
  const InputTensor x = GetInput(ctx, 0);
  const InputTensor scales = GetInput(ctx, 1);
  const InputTensor zero_points = GetInput(ctx, 2);
  if (!x.present) node.Fail("input 'X' is required");
  ExpectMinRank(node, "X", x, 1);
  if (attrs.bits == 0) {
    if (x.dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      node.Fail(std::string("input 'X' must be float32 when in_bits=0, got ") + DtypeName(x.dtype) +
                " (set in_bits for a quantized input)");
    }
    if (scales.present) node.Fail("input 'X_scales' must be absent (empty name) when in_bits=0");
    if (zero_points.present) node.Fail("input 'X_zero_points' must be absent (empty name) when in_bits=0");
    op.x = x.As<float>();
    op.shape = x.shape;
    op.axis_size = x.shape.back();
    if (op.axis_size < 1) node.Fail("input 'X' last dim must be >= 1, got shape " + ShapeString(x.shape));
    op.rows = ElementCount(Leading(x.shape));
    return op;
  }
  op.quantized = true;
  if (x.dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    node.Fail(std::string("input 'X' must be uint8 codes when in_bits=") + std::to_string(attrs.bits) + ", got " +
              DtypeName(x.dtype));
  }
  const int64_t last = x.shape.back();
  if (attrs.axis_size > 0) {
    op.axis_size = attrs.axis_size;
    if (last != row_bytes(op.axis_size, attrs.bits)) {
      node.Fail("input 'X' last dim must be row_bytes(in_axis_size " + std::to_string(op.axis_size) + ", in_bits " +
                std::to_string(attrs.bits) + ") = " + std::to_string(row_bytes(op.axis_size, attrs.bits)) +
                ", got shape " + ShapeString(x.shape));
    }
  } else {
    if (last < 1 || (last * 8) % attrs.bits != 0) {
      node.Fail("cannot derive D from input 'X' last dim " + std::to_string(last) + " (" + std::to_string(last * 8) +
                " bits is not a multiple of in_bits " + std::to_string(attrs.bits) + "); set attribute 'in_axis_size'");
    }
    op.axis_size = last * 8 / attrs.bits;
  }
  op.row_bytes = last;
  op.num_blocks = num_blocks(op.axis_size, attrs.block_size);
  if (!scales.present) node.Fail("input 'X_scales' is required when in_bits > 0");
  op.scale_kind = ScaleKindOfInput(scales, node, "X_scales", "pow2");
  const std::vector<int64_t> block_shape = WithLast(x.shape, op.num_blocks);
  if (scales.shape != block_shape) {
    node.Fail("input 'X_scales' must have shape " + ShapeString(block_shape) + " (X's leading dims and ceil(D " +
              std::to_string(op.axis_size) + " / in_block_size " + std::to_string(attrs.block_size) +
              ")), got " + ShapeString(scales.shape));
  }
  if (attrs.symmetric) {
    if (zero_points.present) node.Fail("input 'X_zero_points' must be absent when in_symmetric=1");
  } else {
    if (!zero_points.present) node.Fail("input 'X_zero_points' is required when in_symmetric=0");
    ExpectDtype(node, "X_zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    if (zero_points.shape != block_shape) {
      node.Fail("input 'X_zero_points' must have shape " + ShapeString(block_shape) + " like 'X_scales', got " +
                ShapeString(zero_points.shape));
    }
    op.zero_points = zero_points.As<uint8_t>();
  }
  op.codes = x.As<uint8_t>();
  op.scales = scales.data;
  op.shape = WithLast(x.shape, op.axis_size);
  op.rows = ElementCount(Leading(x.shape));
  return op;
}

// The allocated outputs of one call for a result of logical shape [..., D].
struct Result {
  bool quantized = false;
  float* y = nullptr;
  uint8_t* codes = nullptr;
  void* scales = nullptr;
  uint8_t* zero_points = nullptr;
  int64_t axis_size = 0;
  int64_t row_bytes = 0;
  int64_t num_blocks = 0;
};

// Row formats (cpu::RowFormat or cuda::RowFormat) of a quantized operand's rows of axis_size
// values (an Operand, or BlockMatMul's activation) and of a quantized result's rows.
template <class Format, class Quantized>
Format OperandRowFormat(const OperandAttrs& attrs, const Quantized& x, int64_t axis_size) {
  return MakeRowFormat<Format>(attrs.bits, attrs.block_size, attrs.symmetric, x.scale_kind, axis_size, x.row_bytes,
                               x.num_blocks);
}

template <class Format>
Format ResultRowFormat(const ResultAttrs& attrs, const Result& r) {
  return MakeRowFormat<Format>(attrs.bits, attrs.block_size, attrs.symmetric, attrs.scale_kind, r.axis_size,
                               r.row_bytes, r.num_blocks);
}

// Allocates output index; returns false when the node does not have it. Unlike GetOutput of
// op_common.h, an empty tensor (null data) still counts as present.
inline bool AllocateOutput(const Ort::KernelContext& ctx, const NodeRef& node, size_t index, const char* name,
                           const std::vector<int64_t>& shape, ONNXTensorElementDataType dtype, void** data) {
  *data = nullptr;
  if (index >= ctx.GetOutputCount()) return false;
  Ort::UnownedValue value = ctx.GetOutput(index, shape);
  if (value == nullptr) return false;
  if (!node.OutputChecked(index)) {  // once per kernel: the graph's type does not change between calls
    const ONNXTensorElementDataType got = value.GetTensorTypeAndShapeInfo().GetElementType();
    if (got != dtype) {
      node.Fail(std::string("output '") + name + "' is declared " + DtypeName(got) + " in the graph but is " +
                DtypeName(dtype));
    }
    node.SetOutputChecked(index);
  }
  *data = value.GetTensorMutableRawData();
  return true;
}

inline Result AllocateResult(const Ort::KernelContext& ctx, const NodeRef& node, const ResultAttrs& attrs,
                             const std::vector<int64_t>& shape) {
  Result r;
  r.axis_size = shape.back();
  const size_t outputs = ctx.GetOutputCount();
  void* data = nullptr;
  if (attrs.bits == 0) {
    if (!AllocateOutput(ctx, node, 0, "Y", shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &data)) {
      node.Fail("output 'Y' is required");
    }
    r.y = static_cast<float*>(data);
    for (size_t i = 1; i < std::min<size_t>(outputs, 3); ++i) {  // slots 1, 2 (3 on: op-specific)
      if (ctx.GetOutput(i, std::vector<int64_t>{0}) != nullptr) {
        node.Fail(std::string("output '") + (i == 1 ? "Y_scales" : "Y_zero_points") +
                  "' must be absent when out_bits=0");
      }
    }
    return r;
  }
  r.quantized = true;
  r.row_bytes = row_bytes(r.axis_size, attrs.bits);
  r.num_blocks = num_blocks(r.axis_size, attrs.block_size);
  const std::vector<int64_t> block_shape = WithLast(shape, r.num_blocks);
  if (!AllocateOutput(ctx, node, 0, "Y", WithLast(shape, r.row_bytes), ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, &data)) {
    node.Fail("output 'Y' (codes) is required");
  }
  r.codes = static_cast<uint8_t*>(data);
  if (!AllocateOutput(ctx, node, 1, "Y_scales", block_shape, ScaleDtype(attrs.scale_kind), &data)) {
    node.Fail("output 'Y_scales' is required when out_bits > 0");
  }
  r.scales = data;
  if (attrs.symmetric) {
    if (outputs >= 3 && ctx.GetOutput(2, block_shape) != nullptr) {
      node.Fail("output 'Y_zero_points' must be absent when out_symmetric=1");
    }
  } else {
    if (!AllocateOutput(ctx, node, 2, "Y_zero_points", block_shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, &data)) {
      node.Fail("output 'Y_zero_points' is required when out_symmetric=0");
    }
    r.zero_points = static_cast<uint8_t*>(data);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Type and shape inference (the output dtypes follow out_bits / out_scale_kind, which ONNX Runtime
// cannot know from declared types). Advisory: never throws, the kernel validates at run time.

struct InferDims {
  std::vector<int64_t> dims;            // -1: unknown
  std::vector<std::string> symbols;     // "" unless symbolic
  bool known = false;                   // rank known (>= 1)
};

InferDims InferInputDims(OrtShapeInferContext* ctx, size_t index);
// Logical dims [..., D] of the main operand from input 0 and the in_* attributes (D may be -1).
InferDims InferOperandDims(OrtShapeInferContext* ctx);
// Sets output index to float32 of logical dims [..., D].
OrtStatusPtr InferFloatOutput(OrtShapeInferContext* ctx, size_t index, const InferDims& logical);
// Sets outputs 0..2 for a result of logical dims [..., D] from the out_* attributes.
OrtStatusPtr InferResult(OrtShapeInferContext* ctx, const InferDims& logical);

}  // namespace nonlinear
}  // namespace bct
