// BlockActMatMul on CPU (docs/ops.md): A [..., M, K] x B [..., K, N], both activations, quantized
// at run time along K (the activation quantizer of cpu/act_quantize.h), integer dot products per
// block scaled by a_scale * b_scale and accumulated in float32 in block order (nl::act_dot),
// numpy-style batch broadcasting; the result is stored as float32 or requantized along N
// (cpu::QuantizeRows). Every instruction-set specific function comes from Kernels(isa).
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "cpu/act_matmul_vnni.h"
#include "cpu/kernel_table.h"
#include "ops/act_matmul_io.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/nonlinear_io.h"
#include "ops/ops.h"
#include "cpu/row_kernels.h"

namespace bct {
namespace nonlinear {
namespace {

class ActMatMulCpuKernel : public ActMatMulKernelBase {
 public:
  ActMatMulCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : ActMatMulKernelBase(info, node), isa_(cpu::KernelIsa(node_)), kernels_(cpu::Kernels(isa_)),
        use_vnni_(kernels_.act_dot_vnni) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const Call call = Prepare(ctx);
      const Operand& a = call.a;
      const ActMatMulGeometry& g = call.g;
      const Result& r = call.r;
      const int64_t k = g.k, m = g.m, n = g.n;
      const int64_t nb = num_blocks(k, attrs_.block_size);
      const int bits = attrs_.act_bits;
      const int64_t bs = attrs_.block_size;

      // Quantize A, row by row along K (dequantizing a quantized operand first).
      const int64_t a_rows = g.a_batches * m;
      // Every element is written below: no zero fill.
      std::unique_ptr<int8_t[]> qa(new int8_t[static_cast<size_t>(std::max<int64_t>(1, a_rows * k))]);
      std::unique_ptr<float[]> sa(new float[static_cast<size_t>(std::max<int64_t>(1, a_rows * nb))]);
      cpu::RowFormat in_fmt = OperandRowFormat<cpu::RowFormat>(in_, a, k);
      in_fmt.isa = isa_;
      const cpu::PackedRows source(in_fmt, a.codes, a.scales, a.zero_points);
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / k));  // rows quantized per call
      ParallelFor(ctx, a_rows, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
        std::vector<float> rows(a.quantized ? static_cast<size_t>(group * k) : 0);
        for (int64_t i0 = begin; i0 < end; i0 += group) {
          const int64_t count = std::min(group, end - i0);
          if (a.quantized) source.DequantizeRange(i0, count, rows.data());
          const float* x = a.quantized ? rows.data() : a.x + i0 * k;
          QuantizeRowsOfK(x, count, k, bits, bs, qa.get() + i0 * k, sa.get() + i0 * nb);
        }
      });

      // Quantize B along K, one column (row of B^T) per step. Stored K-major for the generic path
      // (codes [batch, K, N], scales [batch, nb, N]) or in the VNNI layout (vnni::PackedB).
      const int64_t b_rows = g.b_batches * n;
      std::vector<int8_t> qkn(use_vnni_ ? 0 : static_cast<size_t>(b_rows * k));
      std::vector<float> sbn(use_vnni_ ? 0 : static_cast<size_t>(b_rows * nb));
      vnni::PackedB packed;
      if (use_vnni_) vnni::InitPackedB(packed, g.b_batches, n, k, bs);
      if (attrs_.transpose_b) {
        // B^T rows are contiguous along K: quantize them like A's rows.
        ParallelFor(ctx, b_rows, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
          const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / k));
          std::vector<int8_t> codes(static_cast<size_t>(group * k));
          std::vector<float> scales(static_cast<size_t>(group * nb));
          for (int64_t i0 = begin; i0 < end; i0 += group) {
            const int64_t count = std::min(group, end - i0);
            QuantizeRowsOfK(g.b + i0 * k, count, k, bits, bs, codes.data(), scales.data());
            for (int64_t t = 0; t < count; ++t) {
              const int64_t i = i0 + t;
              const int64_t batch = i / n, col = i % n;
              const int8_t* qc = codes.data() + t * k;
              const float* scc = scales.data() + t * nb;
              if (use_vnni_) {
                vnni::PackColumn(packed, batch, col, qc, scc);
                continue;
              }
              int8_t* q = qkn.data() + batch * k * n + col;
              for (int64_t j = 0; j < k; ++j) q[j * n] = qc[j];
              float* sc = sbn.data() + batch * nb * n + col;
              for (int64_t blk = 0; blk < nb; ++blk) sc[blk * n] = scc[blk];
            }
          }
        });
      } else {
        // B [K, N] row-major: one (batch, block) per step, all columns at once.
        ParallelFor(ctx, g.b_batches * nb, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scales(use_vnni_ ? static_cast<size_t>(n) : 0);
          std::vector<int8_t> block(use_vnni_ ? static_cast<size_t>(bs * n) : 0);
          for (int64_t t = begin; t < end; ++t) {
            const int64_t batch = t / nb, blk = t % nb;
            const int64_t b0 = blk * bs, len = std::min(bs, k - b0);
            const float* src = g.b + (batch * k + b0) * n;
            int8_t* q = use_vnni_ ? block.data() : qkn.data() + (batch * k + b0) * n;
            float* sc = use_vnni_ ? scales.data() : sbn.data() + (batch * nb + blk) * n;
            kernels_.quantize_act_columns(src, n, len, bits, q, sc);
            if (use_vnni_) vnni::PackBlock(packed, batch, blk, q, sc);
          }
        });
      }

      // Y rows: (output batch, m) pairs, in groups of consecutive rows of one output batch (their A rows
      // are consecutive too), four at a time through the VNNI dots, quantized a group per call.
      cpu::RowFormat out_fmt = ResultRowFormat<cpu::RowFormat>(out_, r);
      out_fmt.isa = isa_;
      const cpu::MutablePackedRows sink(out_fmt, r.codes, r.scales, r.zero_points);
      const int64_t out_rows = g.out_batches * m;
      const int64_t out_group = 16;
      ParallelFor(ctx, out_rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * k)), [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(r.quantized ? static_cast<size_t>(out_group * n) : 0);
        std::vector<int32_t> acc(use_vnni_ ? 0 : static_cast<size_t>(n));
        std::vector<uint8_t> scratch(use_vnni_ ? static_cast<size_t>(4 * nb * packed.groups * 4) : 0);
        for (int64_t row = begin; row < end;) {
          const int64_t ob = row / m, mi = row % m;
          const int64_t count = std::min({out_group, end - row, m - mi});
          const int64_t a_row = g.a_index[static_cast<size_t>(ob)] * m + mi;
          const int64_t b_batch = g.b_index[static_cast<size_t>(ob)];
          float* y = r.quantized ? buffer.data() : r.y + row * n;
          if (use_vnni_) {
            vnni::DotRows(packed, b_batch, qa.get() + a_row * k, sa.get() + a_row * nb, count, scratch.data(), y, n);
          } else {
            for (int64_t i = 0; i < count; ++i) {
              kernels_.act_dot_row(qa.get() + (a_row + i) * k, sa.get() + (a_row + i) * nb, qkn.data() + b_batch * k * n,
                                   sbn.data() + b_batch * nb * n, n, k, bs, nb, acc.data(), y + i * n);
            }
          }
          if (r.quantized) sink.QuantizeRange(y, row, count);
          row += count;
        }
      });
    });
  }

 private:
  // The activation quantizer along K of `rows` consecutive rows: q [rows, k], scales [rows, nb].
  void QuantizeRowsOfK(const float* x, int64_t rows, int64_t k, int bits, int64_t bs, int8_t* q, float* scales) const {
    cpu::ActCodes out;
    out.codes = q;
    out.row_stride = k;
    out.block_stride = bs;
    out.scales = scales;
    kernels_.quantize_act_rows(x, rows, k, bits, bs, out);
  }

  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  const cpu::KernelTable& kernels_;
  bool use_vnni_;
};

}  // namespace
}  // namespace nonlinear

void AppendActMatMulCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<nonlinear::ActMatMulSchema, nonlinear::ActMatMulCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
