// CPU kernel template of the row-wise compressed nonlinear ops (BlockGelu, BlockSilu, BlockSoftmax,
// BlockLayerNorm, BlockRMSNorm): for every row of the last axis, in parallel,
//   load (copy float32, or cpu::DequantizeRow) -> Family::Row (bct/nonlinear_math.h) -> store
//   (into Y, or cpu::QuantizeRow into codes / scales / zero points).
// The families (and RowOpSchema, the op declaration shared with CUDA) are in ops/nonlinear_families.h.
// A Family supplies kName, its extra inputs (after the operand's three slots) and the row function:
//   struct Family {
//     static constexpr const char* kName; static constexpr size_t kExtraInputs;
//     static bool ExtraInputOptional(size_t extra_index);
//     Family(const OrtKernelInfo*, const NodeRef&);            // reads op attributes
//     struct Params {...};
//     Params Prepare(const Ort::KernelContext&, const NodeRef&, int64_t axis_size) const;  // extra inputs
//     void Row(const Params&, float* y, int64_t axis_size) const;
//   };
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/nonlinear_io.h"
#include "row_kernels.h"

namespace bct {
namespace nonlinear {

// Family::Rows when the family has it (several rows at once), else Family::Row per row.
template <class Family, class Params>
auto RunRowsImpl(const Family& family, const Params& params, float* y, int64_t count, int64_t d, int)
    -> decltype(family.Rows(params, y, count, d)) {
  family.Rows(params, y, count, d);
}

template <class Family, class Params>
void RunRowsImpl(const Family& family, const Params& params, float* y, int64_t count, int64_t d, long) {
  for (int64_t i = 0; i < count; ++i) family.Row(params, y + i * d, d);
}

template <class Family, class Params>
void RunRows(const Family& family, const Params& params, float* y, int64_t count, int64_t d) {
  RunRowsImpl(family, params, y, count, d, 0);
}

template <class Family>
class RowOpCpuKernel : public RowOpKernelBase<Family> {
 public:
  using RowOpKernelBase<Family>::RowOpKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(this->node_, [&] {
      Ort::KernelContext ctx(context);
      const typename RowOpKernelBase<Family>::Call call = this->Prepare(ctx);
      const Operand& x = call.x;
      const Result& r = call.r;
      const int64_t d = x.axis_size;
      cpu::RowFormat in_fmt = OperandRowFormat<cpu::RowFormat>(this->in_, x, d);
      cpu::RowFormat out_fmt = ResultRowFormat<cpu::RowFormat>(this->out_, r);
      in_fmt.simd = out_fmt.simd = simd_;
      const cpu::PackedRows source(in_fmt, x.codes, x.scales, x.zero_points);
      const cpu::MutablePackedRows sink(out_fmt, r.codes, r.scales, r.zero_points);
      const int64_t min_rows = std::max<int64_t>(1, 8192 / d);
      // A quantized result is computed a group of rows at a time into a buffer, then quantized in one
      // call (QuantizeRows shares the per-block scale work among the group's blocks).
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / d));
      ParallelFor(ctx, x.rows, min_rows, [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(r.quantized ? static_cast<size_t>(group * d) : 0);
        for (int64_t row0 = begin; row0 < end; row0 += group) {
          const int64_t count = std::min(group, end - row0);
          float* y = r.quantized ? buffer.data() : r.y + row0 * d;
          if (x.quantized) {
            source.DequantizeRange(row0, count, y);
          } else {
            std::memcpy(y, x.x + row0 * d, static_cast<size_t>(count * d) * sizeof(float));
          }
          RunRows(this->family_, call.params, y, count, d);
          if (r.quantized) sink.QuantizeRange(buffer.data(), row0, count);
        }
      });
    });
  }

 private:
  // SIMD level of the dequantize / quantize row loops, from the environment at kernel creation
  // (BCT_ONNX_BASELINE_SIMD, BCT_ONNX_ISA), so tests can force each path.
  cpu::RowSimd simd_ = cpu::RowSimdFromEnvironment();
};

}  // namespace nonlinear
}  // namespace bct
