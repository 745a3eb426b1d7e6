// BlockDequantize on CPU: codes [..., row_bytes(D)], scales [..., nb], zero_points -> Y [..., D].
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "row_kernels.h"

namespace bct {
namespace {

class DequantizeCpuKernel {
 public:
  DequantizeCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadBlockAttrs(info, node_, "axis_size")) {}

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor codes = GetInput(ctx, 0);
      const InputTensor scales = GetInput(ctx, 1);
      const InputTensor zero_points = GetInput(ctx, 2);
      const RowsGeometry g = CheckQuantizedRows(node_, attrs_, codes, scales, zero_points, /*table=*/false);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", WithLastDim(codes.shape, g.axis_size),
                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      cpu::RowFormat fmt{attrs_.bits, attrs_.block_size, attrs_.symmetric, g.scale_kind,
                         g.axis_size, g.row_bytes, g.num_blocks};
      const auto* code_data = codes.As<uint8_t>();
      const auto* scale_bytes = static_cast<const uint8_t*>(scales.data);
      const size_t scale_row_bytes = static_cast<size_t>(g.num_blocks) * ScaleItemSize(g.scale_kind);
      const auto* zp_data = zero_points.present ? zero_points.As<uint8_t>() : nullptr;
      const int64_t min_rows = std::max<int64_t>(1, 16384 / g.axis_size);
      ParallelFor(ctx, g.rows, min_rows, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          cpu::DequantizeRow(fmt, code_data + r * g.row_bytes, scale_bytes + r * scale_row_bytes,
                             zp_data ? zp_data + r * g.num_blocks : nullptr, y + r * g.axis_size);
        }
      });
    });
  }

 private:
  NodeRef node_;
  BlockAttrs attrs_;
};

}  // namespace

void AppendDequantizeCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<DequantizeSchema, DequantizeCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
