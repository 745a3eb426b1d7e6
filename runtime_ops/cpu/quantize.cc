// BlockQuantize on CPU: X float32 [..., D] -> packed codes, stored scales, zero points.
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"

namespace bct {
namespace {

class QuantizeCpuKernel : public QuantizeKernelBase {
 public:
  QuantizeCpuKernel(const OrtKernelInfo* info, const NodeRef& node) : QuantizeKernelBase(info, node), isa_(cpu::KernelIsa(node_)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const QuantizeCall c = PrepareQuantize(ctx, node_, attrs_);
      const RowsGeometry& g = c.g;
      cpu::RowFormat fmt = BlockRowFormat<cpu::RowFormat>(attrs_.block, g);
      fmt.isa = isa_;
      const cpu::MutablePackedRows sink(fmt, c.out.codes, c.out.scales, c.out.zero_points);
      const float* x_data = c.x.As<float>();
      const int64_t min_rows = std::max<int64_t>(1, 8192 / g.axis_size);
      ParallelFor(ctx, g.rows, min_rows, [&](int64_t begin, int64_t end) {
        sink.QuantizeRange(x_data + begin * g.axis_size, begin, end - begin);
      });
    });
  }

 private:
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
};

}  // namespace

void AppendQuantizeCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<QuantizeSchema, QuantizeCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
