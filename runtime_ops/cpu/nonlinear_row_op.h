// CPU kernel template of the row-wise compressed nonlinear ops (BlockGelu, BlockSilu, BlockSoftmax,
// BlockLayerNorm, BlockRMSNorm, and the Add + norm ops): for every row of the last axis, in parallel,
//   load (read float32, or cpu::DequantizeRows; the Add + norm ops add the residual here) -> the
//   family's row function -> store (into Y, or cpu::QuantizeRows into codes / scales / zero points),
// in groups of rows. A quantized result's group is staged in per-thread scratch (cpu/thread_scratch.h):
// a call allocates nothing, and one row (a decoder step) runs on the calling thread. The families (and RowOpSchema, the op declaration shared with CUDA) are in
// ops/nonlinear_families.h; RunRowsCpu below calls each family's row function from the kernel's
// table (cpu/kernel_table.h), as SetOp in cuda/nonlinear_ops_cuda.cc picks the CUDA one.
#pragma once

#include <algorithm>
#include <cstring>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/nonlinear_io.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"
#include "cpu/thread_scratch.h"

namespace bct {
namespace nonlinear {

// `count` consecutive rows of d (y rows d apart; the first is row `row0` of the operand), in place,
// with the family's row function.
inline void RunRowsCpu(const cpu::KernelTable& k, const GeluFamily& f, const GeluFamily::Params&, float* y, int64_t, int64_t count, int64_t d) {
  for (int64_t i = 0; i < count; ++i) k.gelu_row(y + i * d, d, f.form);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const SiluFamily&, const SiluFamily::Params&, float* y, int64_t, int64_t count, int64_t d) {
  for (int64_t i = 0; i < count; ++i) k.silu_row(y + i * d, d);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const SoftmaxFamily&, const SoftmaxFamily::Params&, float* y, int64_t, int64_t count, int64_t d) {
  k.softmax_rows(y, count, d);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const LayerNormFamily& f, const LayerNormFamily::Params& p,
                       float* y, int64_t, int64_t count, int64_t d) {
  k.layer_norm_rows(y, count, d, p.scale, p.bias, f.epsilon);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const RMSNormFamily& f, const RMSNormFamily::Params& p, float* y, int64_t, int64_t count, int64_t d) {
  k.rms_norm_rows(y, count, d, p.scale, f.epsilon);
}

// Loads `count` float32 rows of the operand (src: the input, or y itself when it was dequantized
// there) into y, before the row function runs in place on y.
template <class Params>
inline void LoadRows(const cpu::KernelTable&, const Params&, const float* src, float* y, int64_t, int64_t count,
                     int64_t d) {
  if (src != y) std::memcpy(y, src, static_cast<size_t>(count * d) * sizeof(float));
}

// The Add of the Add + norm ops, fused into the load: y = src + skip (float32, one rounding each),
// also written to the sum output; the table's add_row (compiled per path) adds each row.
inline void AddSkipRows(const cpu::KernelTable& k, const AddParams& p, const float* src, float* y, int64_t row0,
                        int64_t count, int64_t d) {
  for (int64_t i = 0; i < count; ++i) {
    const float* skip = p.skip + ((row0 + i) % p.skip_rows) * d;
    k.add_row(src + i * d, skip, d, y + i * d, p.sum != nullptr ? p.sum + (row0 + i) * d : nullptr);
  }
}
inline void LoadRows(const cpu::KernelTable& k, const AddLayerNormFamily::Params& p, const float* src, float* y,
                     int64_t row0, int64_t count, int64_t d) {
  AddSkipRows(k, p.add, src, y, row0, count, d);
}
inline void LoadRows(const cpu::KernelTable& k, const AddRMSNormFamily::Params& p, const float* src, float* y,
                     int64_t row0, int64_t count, int64_t d) {
  AddSkipRows(k, p.add, src, y, row0, count, d);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const AddLayerNormFamily& f, const AddLayerNormFamily::Params& p,
                       float* y, int64_t, int64_t count, int64_t d) {
  k.layer_norm_rows(y, count, d, p.scale, p.bias, f.epsilon);
}
inline void RunRowsCpu(const cpu::KernelTable& k, const AddRMSNormFamily& f, const AddRMSNormFamily::Params& p,
                       float* y, int64_t, int64_t count, int64_t d) {
  k.rms_norm_rows(y, count, d, p.scale, f.epsilon);
}

template <class Family>
class RowOpCpuKernel : public RowOpKernelBase<Family> {
 public:
  RowOpCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : RowOpKernelBase<Family>(info, node), isa_(cpu::KernelIsa(this->node_)), kernels_(cpu::Kernels(isa_)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(this->node_, [&] {
      Ort::KernelContext ctx(context);
      const typename RowOpKernelBase<Family>::Call call = this->Prepare(ctx);
      const Operand& x = call.x;
      const Result& r = call.r;
      const int64_t d = x.axis_size;
      cpu::RowFormat in_fmt = OperandRowFormat<cpu::RowFormat>(this->in_, x, d);
      cpu::RowFormat out_fmt = ResultRowFormat<cpu::RowFormat>(this->out_, r);
      in_fmt.isa = out_fmt.isa = isa_;
      const cpu::PackedRows source(in_fmt, x.codes, x.scales, x.zero_points);
      const cpu::MutablePackedRows sink(out_fmt, r.codes, r.scales, r.zero_points);
      const int64_t min_rows = std::max<int64_t>(1, 8192 / d);
      // A quantized result is computed a group of rows at a time into a buffer, then quantized in one
      // call (QuantizeRows shares the per-block scale work among the group's blocks).
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / d));
      ParallelFor(ctx, x.rows, min_rows, [&](int64_t begin, int64_t end) {
        float* buffer =
            r.quantized ? cpu::ThreadScratch<float, cpu::ScratchSlot::kRowGroup>(static_cast<size_t>(group * d)) : nullptr;
        for (int64_t row0 = begin; row0 < end; row0 += group) {
          const int64_t count = std::min(group, end - row0);
          float* y = r.quantized ? buffer : r.y + row0 * d;
          const float* src = y;
          if (x.quantized) {
            source.DequantizeRange(row0, count, y);
          } else {
            src = x.x + row0 * d;
          }
          LoadRows(kernels_, call.params, src, y, row0, count, d);
          RunRowsCpu(kernels_, this->family_, call.params, y, row0, count, d);
          if (r.quantized) sink.QuantizeRange(buffer, row0, count);
        }
      });
    });
  }

 private:
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD), so tests can force each path
  const cpu::KernelTable& kernels_;
};

}  // namespace nonlinear
}  // namespace bct
