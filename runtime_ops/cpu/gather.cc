// BlockGather on CPU: rows of a blockwise table, dequantized (an embedding lookup).
// Indices are validated first (so an error names the offending value); rows are then decoded in
// parallel over ORT's intra-op threads with the SIMD row loops of row_kernels.cc.
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "row_kernels.h"

namespace bct {
namespace {

class GatherCpuKernel : public DequantizeKernelBase {
 public:
  using DequantizeKernelBase::DequantizeKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const GatherCall c = PrepareGather(ctx, node_, attrs_);
      const RowsGeometry& g = c.g;
      const cpu::PackedRows table(BlockRowFormat<cpu::RowFormat>(attrs_, g), c.codes.As<uint8_t>(), c.scales.data,
                                  c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr);
      const int64_t min_rows = std::max<int64_t>(1, 32768 / g.axis_size);
      ParallelFor(ctx, static_cast<int64_t>(c.rows.size()), min_rows, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) table.Dequantize(c.rows[static_cast<size_t>(i)], c.y + i * g.axis_size);
      });
    });
  }
};

}  // namespace

void AppendGatherCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<GatherSchema, GatherCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
