// BlockDequantize on CPU: codes [..., row_bytes(D)], scales [..., nb], zero_points -> Y [..., D].
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "ops/packed_zero_points.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"

namespace bct {
namespace {

class DequantizeCpuKernel : public DequantizeKernelBase {
 public:
  DequantizeCpuKernel(const OrtKernelInfo* info, const NodeRef& node) : DequantizeKernelBase(info, node), isa_(cpu::KernelIsa(node_)) {
    if (ReadZeroPointsPacked(info, node_, attrs_.symmetric)) {  // unpacked once and kept
      unpacked_zero_points_ = UnpackConstantZeroPoints(info, node_, 2, "zero_points", 1, "scales", attrs_.bits);
      zero_points_packed_ = true;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const DequantizeCall c = PrepareDequantize(ctx, node_, attrs_, zero_points_packed_ ? &unpacked_zero_points_.view : nullptr);
      const RowsGeometry& g = c.g;
      cpu::RowFormat fmt = BlockRowFormat<cpu::RowFormat>(attrs_, g);
      fmt.isa = isa_;
      const cpu::PackedRows source(fmt, c.codes.As<uint8_t>(), c.scales.data,
                                   c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr);
      const int64_t min_rows = std::max<int64_t>(1, 16384 / g.axis_size);
      ParallelFor(ctx, g.rows, min_rows, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) source.Dequantize(r, c.y + r * g.axis_size);
      });
    });
  }

 private:
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  bool zero_points_packed_ = false;
  UnpackedZeroPoints unpacked_zero_points_;  // zero_points_packed = 1: one byte a block
};

}  // namespace

void AppendDequantizeCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<DequantizeSchema, DequantizeCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
