// BlockGather on CPU: rows of a blockwise table, dequantized (an embedding lookup).
// Indices are validated first (so an error names the offending value); rows are then decoded in
// parallel over ORT's intra-op threads with the SIMD row loops of row_kernels.cc.
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "row_kernels.h"

namespace bct {
namespace {

class GatherCpuKernel {
 public:
  GatherCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadBlockAttrs(info, node_, "axis_size")) {}

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor indices = GetInput(ctx, 0);
      const InputTensor codes = GetInput(ctx, 1);
      const InputTensor scales = GetInput(ctx, 2);
      const InputTensor zero_points = GetInput(ctx, 3);
      const RowsGeometry g = CheckQuantizedRows(node_, attrs_, codes, scales, zero_points, /*table=*/true);
      const std::vector<int64_t> rows = NormalizeIndices(node_, indices, codes.shape[0]);
      std::vector<int64_t> out_shape = indices.shape;
      out_shape.push_back(g.axis_size);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", out_shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      cpu::RowFormat fmt{attrs_.bits, attrs_.block_size, attrs_.symmetric, g.scale_kind,
                         g.axis_size, g.row_bytes, g.num_blocks};
      const auto* code_data = codes.As<uint8_t>();
      const auto* scale_bytes = static_cast<const uint8_t*>(scales.data);
      const size_t scale_row_bytes = static_cast<size_t>(g.num_blocks) * ScaleItemSize(g.scale_kind);
      const auto* zp_data = zero_points.present ? zero_points.As<uint8_t>() : nullptr;
      const int64_t min_rows = std::max<int64_t>(1, 32768 / g.axis_size);
      ParallelFor(ctx, static_cast<int64_t>(rows.size()), min_rows, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t r = rows[static_cast<size_t>(i)];
          cpu::DequantizeRow(fmt, code_data + r * g.row_bytes, scale_bytes + r * scale_row_bytes,
                             zp_data ? zp_data + r * g.num_blocks : nullptr, y + i * g.axis_size);
        }
      });
    });
  }

 private:
  NodeRef node_;
  BlockAttrs attrs_;
};

}  // namespace

void AppendGatherCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<GatherSchema, GatherCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
