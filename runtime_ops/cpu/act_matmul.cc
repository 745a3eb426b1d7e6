// BlockActMatMul on CPU (docs/ops.md): A [..., M, K] x B [..., K, N], both activations, quantized
// at run time along K (nl::quantize_act_row), integer dot products per block scaled by
// a_scale * b_scale and accumulated in float32 in block order (nl::act_dot), numpy-style batch
// broadcasting; the result is stored as float32 or requantized along N (cpu::QuantizeRow).
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "bct/nonlinear_math.h"
#include "bct/op_common.h"
#include "cpu/act_matmul_vnni.h"
#include "cpu/isa_clones.h"
#include "ops/act_matmul_io.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/nonlinear_io.h"
#include "row_kernels.h"

namespace bct {
namespace nonlinear {
namespace {

// One output row, vectorised over the N columns: B's codes are stored K-major (qkn [K, N]) and its
// scales block-major (sbn [nb, N]). Per block, exact int32 dot products acc[j] are formed, then
// y[j] += float(acc[j]) * (a_scale * b_scale[j]) in block order from 0: nl::act_dot's arithmetic.
BCT_ALWAYS_INLINE void ActDotRowImpl(const int8_t* qa_row, const float* sa_row, const int8_t* qkn, const float* sbn,
                              int64_t n, int64_t k, int64_t block_size, int64_t nb, int32_t* acc, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = 0.0f;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t b0 = blk * block_size;
    const int64_t len = std::min(block_size, k - b0);
    for (int64_t j = 0; j < n; ++j) acc[j] = 0;
    for (int64_t i = b0; i < b0 + len; ++i) {
      const int32_t ai = qa_row[i];
      const int8_t* q = qkn + i * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += ai * static_cast<int32_t>(q[j]);
    }
    const float sa = sa_row[blk];
    const float* sb = sbn + blk * n;
    for (int64_t j = 0; j < n; ++j) y[j] = fadd(y[j], fmul(static_cast<float>(acc[j]), fmul(sa, sb[j])));
  }
}

// nl::quantize_act_row, faster: the element of largest magnitude is found by an integer max over the
// magnitudes' bit patterns (same order as the floats for non-NaN values; vectorisable), then the
// first element with that magnitude gives the scale as choose_symmetric_scale does. A block holding
// a NaN goes through choose_symmetric_scale itself, so the result is the same bits in every case.
BCT_ALWAYS_INLINE void QuantizeActRowImpl(const float* x, int64_t k, int bits, int64_t block_size, int8_t* q, float* scales) {
  const int zp = 1 << (bits - 1);
  for (int64_t b0 = 0, blk = 0; b0 < k; b0 += block_size, ++blk) {
    const int64_t len = std::min(block_size, k - b0);
    const float* xb = x + b0;
    uint32_t top = 0;
    for (int64_t i = 0; i < len; ++i) {
      uint32_t u;
      std::memcpy(&u, xb + i, sizeof u);
      u &= 0x7fffffffu;
      top = u > top ? u : top;
    }
    float scale;
    if (top > 0x7f800000u) {  // a NaN
      scale = choose_symmetric_scale(xb, len, bits, ScaleKind::kFloat32).value;
    } else {
      int64_t first = 0;
      for (; first < len; ++first) {
        uint32_t u;
        std::memcpy(&u, xb + first, sizeof u);
        if ((u & 0x7fffffffu) == top) break;
      }
      scale = fdiv(xb[first], -static_cast<float>(zp));
    }
    scales[blk] = scale;
    const float inv = inverse_scale(scale);
    int8_t* qb = q + b0;
    for (int64_t i = 0; i < len; ++i) qb[i] = static_cast<int8_t>(static_cast<int>(code_of(xb[i], inv, bits, true, 0)) - zp);
  }
}

// Block `len` rows x n columns of a row-major B [K, N] (the rows of one block along K), quantized per
// column exactly as nl::quantize_act_row quantizes that column, without gathering columns: per
// column, the first element of largest magnitude (integer compare of magnitude bits, strict, in k
// order) gives scale = m / -2**(bits-1). q receives [len][n] signed codes, scales [n]. Columns
// holding a NaN are flagged in has_nan (the caller redoes them with choose_symmetric_scale).
BCT_ALWAYS_INLINE void QuantizeBlockKMajorImpl(const float* b, int64_t n, int64_t len, int bits, uint32_t* best_u,
                                               float* best_v, float* inv, uint8_t* has_nan, int8_t* q,
                                               float* scales) {
  const int zp = 1 << (bits - 1);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = float_bits(b[j]) & 0x7fffffffu;
    best_u[j] = u;
    best_v[j] = b[j];
    has_nan[j] = u > 0x7f800000u ? 1 : 0;
  }
  for (int64_t i = 1; i < len; ++i) {
    const float* row = b + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t u = float_bits(row[j]) & 0x7fffffffu;
      const bool take = u > best_u[j];
      best_u[j] = take ? u : best_u[j];
      best_v[j] = take ? row[j] : best_v[j];
      has_nan[j] = static_cast<uint8_t>(has_nan[j] | (u > 0x7f800000u ? 1 : 0));
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    scales[j] = fdiv(best_v[j], -static_cast<float>(zp));
    inv[j] = inverse_scale(scales[j]);
  }
  for (int64_t i = 0; i < len; ++i) {
    const float* row = b + i * n;
    int8_t* qr = q + i * n;
    for (int64_t j = 0; j < n; ++j) {
      qr[j] = static_cast<int8_t>(static_cast<int>(code_of(row[j], inv[j], bits, true, 0)) - zp);
    }
  }
}

BCT_ISA_CLONES void ActDotRow(const int8_t* qa_row, const float* sa_row, const int8_t* qkn, const float* sbn, int64_t n,
                              int64_t k, int64_t block_size, int64_t nb, int32_t* acc, float* y) {
  ActDotRowImpl(qa_row, sa_row, qkn, sbn, n, k, block_size, nb, acc, y);
}
void ActDotRowBaseline(const int8_t* qa_row, const float* sa_row, const int8_t* qkn, const float* sbn, int64_t n,
                       int64_t k, int64_t block_size, int64_t nb, int32_t* acc, float* y) {
  ActDotRowImpl(qa_row, sa_row, qkn, sbn, n, k, block_size, nb, acc, y);
}

BCT_ISA_CLONES void QuantizeActRow(const float* x, int64_t k, int bits, int64_t block_size, int8_t* q, float* scales) {
  QuantizeActRowImpl(x, k, bits, block_size, q, scales);
}
void QuantizeActRowBaseline(const float* x, int64_t k, int bits, int64_t block_size, int8_t* q, float* scales) {
  QuantizeActRowImpl(x, k, bits, block_size, q, scales);
}

BCT_ISA_CLONES void QuantizeBlockKMajor(const float* b, int64_t n, int64_t len, int bits, uint32_t* best_u,
                                        float* best_v, float* inv, uint8_t* has_nan, int8_t* q, float* scales) {
  QuantizeBlockKMajorImpl(b, n, len, bits, best_u, best_v, inv, has_nan, q, scales);
}
void QuantizeBlockKMajorBaseline(const float* b, int64_t n, int64_t len, int bits, uint32_t* best_u, float* best_v,
                                 float* inv, uint8_t* has_nan, int8_t* q, float* scales) {
  QuantizeBlockKMajorImpl(b, n, len, bits, best_u, best_v, inv, has_nan, q, scales);
}

class ActMatMulCpuKernel : public ActMatMulKernelBase {
 public:
  ActMatMulCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : ActMatMulKernelBase(info, node), baseline_(BaselineSimdRequested()), use_vnni_(!baseline_ && vnni::Available()) {}

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
      in_fmt.simd = simd_;
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
          std::vector<uint32_t> best_u(static_cast<size_t>(n));
          std::vector<float> best_v(static_cast<size_t>(n)), inv(static_cast<size_t>(n)), scales(static_cast<size_t>(n));
          std::vector<uint8_t> has_nan(static_cast<size_t>(n));
          std::vector<int8_t> block(use_vnni_ ? static_cast<size_t>(bs * n) : 0);
          std::vector<float> column;
          std::vector<int8_t> column_codes;
          for (int64_t t = begin; t < end; ++t) {
            const int64_t batch = t / nb, blk = t % nb;
            const int64_t b0 = blk * bs, len = std::min(bs, k - b0);
            const float* src = g.b + (batch * k + b0) * n;
            int8_t* q = use_vnni_ ? block.data() : qkn.data() + (batch * k + b0) * n;
            float* sc = use_vnni_ ? scales.data() : sbn.data() + (batch * nb + blk) * n;
            if (!cpu::QuantizeColumnsAvx512(src, n, len, bits, simd_, q, sc, has_nan.data())) {
              (baseline_ ? QuantizeBlockKMajorBaseline : QuantizeBlockKMajor)(src, n, len, bits, best_u.data(),
                                                                              best_v.data(), inv.data(),
                                                                              has_nan.data(), q, sc);
            }
            for (int64_t j = 0; j < n; ++j) {
              if (!has_nan[static_cast<size_t>(j)]) continue;
              // A NaN in this column block: the reference scale choice, exactly.
              column.resize(static_cast<size_t>(len));
              column_codes.resize(static_cast<size_t>(len));
              for (int64_t i = 0; i < len; ++i) column[static_cast<size_t>(i)] = src[i * n + j];
              float column_scale = 0.0f;
              nl::quantize_act_row(column.data(), len, bits, len, column_codes.data(), &column_scale);
              sc[j] = column_scale;
              for (int64_t i = 0; i < len; ++i) q[i * n + j] = column_codes[static_cast<size_t>(i)];
            }
            if (use_vnni_) vnni::PackBlock(packed, batch, blk, q, sc);
          }
        });
      }

      // Y rows: (output batch, m) pairs, in groups of consecutive rows of one output batch (their A rows
      // are consecutive too), four at a time through the VNNI dots, quantized a group per call.
      cpu::RowFormat out_fmt = ResultRowFormat<cpu::RowFormat>(out_, r);
      out_fmt.simd = simd_;
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
              (baseline_ ? ActDotRowBaseline : ActDotRow)(qa.get() + (a_row + i) * k, sa.get() + (a_row + i) * nb,
                                                          qkn.data() + b_batch * k * n, sbn.data() + b_batch * nb * n,
                                                          n, k, bs, nb, acc.data(), y + i * n);
            }
          }
          if (r.quantized) sink.QuantizeRange(y, row, count);
          row += count;
        }
      });
    });
  }

 private:
  // nl::quantize_act_row of one row along K: AVX-512 where simd_ allows, else the ISA clones.
  void QuantizeRowOfK(const float* x, int64_t k, int bits, int64_t bs, int8_t* q, float* scales) const {
    QuantizeRowsOfK(x, 1, k, bits, bs, q, scales);
  }

  // The same for `rows` consecutive rows: q [rows, k], scales [rows, nb].
  void QuantizeRowsOfK(const float* x, int64_t rows, int64_t k, int bits, int64_t bs, int8_t* q, float* scales) const {
    if (cpu::QuantizeActRowsAvx512(x, rows, k, bits, bs, simd_, q, scales)) return;
    const int64_t nb = num_blocks(k, bs);
    for (int64_t i = 0; i < rows; ++i) {
      (baseline_ ? QuantizeActRowBaseline : QuantizeActRow)(x + i * k, k, bits, bs, q + i * k, scales + i * nb);
    }
  }

  bool baseline_;  // BCT_ONNX_BASELINE_SIMD: baseline-ISA loops (see ops/nonlinear_families.h)
  bool use_vnni_;
  cpu::RowSimd simd_ = cpu::RowSimdFromEnvironment();  // row loops (BCT_ONNX_BASELINE_SIMD, BCT_ONNX_ISA)
};

}  // namespace

void AppendActMatMulCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<ActMatMulSchema, ActMatMulCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace nonlinear
}  // namespace bct
