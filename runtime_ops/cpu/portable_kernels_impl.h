// Portable C++ kernels, compiled once per instruction-set path: each cpu/portable_kernels_<path>.cc
// includes every header first, then sets its target (`#pragma GCC target`), defines
// BCT_PORTABLE_PATH (the namespace of its copy) and includes this file. The compiler vectorises the
// loops for that target; the float32 operations and their order are those of the source
// (-ffp-contract=off, no fast-math), so every copy gives the same bits. Only headers already
// included before the target pragma are used here, so no inline function of another file is
// emitted for the target (an ODR hazard).
#ifndef BCT_PORTABLE_PATH
#error "define BCT_PORTABLE_PATH (the namespace of this copy) before including portable_kernels_impl.h"
#endif

namespace bct {
namespace cpu {
namespace BCT_PORTABLE_PATH {

// The activation quantizer (cpu/act_quantize.h). The element of largest magnitude is found by an
// integer max over the magnitudes' bit patterns (the float order for non-NaN values; vectorisable),
// then the first element with that magnitude; a block holding a NaN takes choose_symmetric_scale.
void QuantizeActRows(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size, const ActCodes& out) {
  const int zp = 1 << (bits - 1);
  const int64_t nb = num_blocks(k, block_size);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t b0 = blk * block_size;
      const int64_t len = std::min(block_size, k - b0);
      const float* xb = x + r * k + b0;
      uint32_t top = 0;
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t u = float_bits(xb[i]) & 0x7fffffffu;
        top = u > top ? u : top;
      }
      float scale;
      if (top > 0x7f800000u) {  // a NaN
        scale = choose_symmetric_scale(xb, len, bits, ScaleKind::kFloat32).value;
      } else {
        int64_t first = 0;
        while ((float_bits(xb[first]) & 0x7fffffffu) != top) ++first;
        scale = symmetric_scale_of_extreme(xb[first], bits, ScaleKind::kFloat32).value;
      }
      out.scales[r * nb + blk] = act_scale(scale);
      const float inv = inverse_scale(scale);
      int8_t* qb = out.codes + r * out.row_stride + blk * out.block_stride;
      int32_t sum = 0;
      for (int64_t i = 0; i < len; ++i) {
        const int code = static_cast<int>(code_of(xb[i], inv, bits, true, 0)) - zp;
        qb[i] = static_cast<int8_t>(code);
        sum += code;
      }
      if (out.sums != nullptr) out.sums[r * nb + blk] = sum;
    }
  }
}

// The K-major quantizer: per column, the first element of largest magnitude (integer compare of the
// magnitude bits, strict, in k order) gives scale = m / -2**(bits-1); columns are worked on in
// chunks whose state stays on the stack. Column blocks holding a NaN are redone exactly.
void QuantizeActColumns(const float* b, int64_t n, int64_t len, int bits, int8_t* q, float* scales) {
  constexpr int64_t kChunk = 256;
  const int zp = 1 << (bits - 1);
  uint32_t best_u[kChunk];
  float best_v[kChunk], inv[kChunk];
  uint8_t has_nan[kChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t cols = std::min(kChunk, n - j0);
    const float* bc = b + j0;
    for (int64_t j = 0; j < cols; ++j) {
      const uint32_t u = float_bits(bc[j]) & 0x7fffffffu;
      best_u[j] = u;
      best_v[j] = bc[j];
      has_nan[j] = u > 0x7f800000u ? 1 : 0;
    }
    for (int64_t i = 1; i < len; ++i) {
      const float* row = bc + i * n;
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t u = float_bits(row[j]) & 0x7fffffffu;
        const bool take = u > best_u[j];
        best_u[j] = take ? u : best_u[j];
        best_v[j] = take ? row[j] : best_v[j];
        has_nan[j] = static_cast<uint8_t>(has_nan[j] | (u > 0x7f800000u ? 1 : 0));
      }
    }
    for (int64_t j = 0; j < cols; ++j) {
      const float scale = fdiv(best_v[j], -static_cast<float>(zp));
      scales[j0 + j] = act_scale(scale);
      inv[j] = inverse_scale(scale);
    }
    for (int64_t i = 0; i < len; ++i) {
      const float* row = bc + i * n;
      int8_t* qr = q + i * n + j0;
      for (int64_t j = 0; j < cols; ++j) {
        qr[j] = static_cast<int8_t>(static_cast<int>(code_of(row[j], inv[j], bits, true, 0)) - zp);
      }
    }
    for (int64_t j = 0; j < cols; ++j) {
      if (has_nan[j]) QuantizeActColumnExactly(b, n, len, bits, j0 + j, q, scales);
    }
  }
}

// BlockActMatMul's int8 block dot, vectorised over the N columns of a K-major B: per block, exact
// int32 dot products acc[j], then y[j] += float(acc[j]) * (a_scale * b_scale[j]) in block order from
// 0 (nl::act_dot's arithmetic).
void ActDotRow(const int8_t* qa, const float* sa, const int8_t* qkn, const float* sbn, int64_t n, int64_t k,
               int64_t block_size, int64_t nb, int32_t* acc, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = 0.0f;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t b0 = blk * block_size;
    const int64_t len = std::min(block_size, k - b0);
    for (int64_t j = 0; j < n; ++j) acc[j] = 0;
    for (int64_t i = b0; i < b0 + len; ++i) {
      const int32_t ai = qa[i];
      const int8_t* q = qkn + i * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += ai * static_cast<int32_t>(q[j]);
    }
    const float* sb = sbn + blk * n;
    for (int64_t j = 0; j < n; ++j) y[j] = fadd(y[j], fmul(static_cast<float>(acc[j]), fmul(sa[blk], sb[j])));
  }
}

// The row functions of the nonlinear ops, as bct/nonlinear_math.h writes them (inlined here, so
// compiled for this path).
__attribute__((flatten)) void GeluRow(float* y, int64_t n, nl::GeluForm form) { nl::gelu_row(y, n, form); }
__attribute__((flatten)) void SiluRow(float* y, int64_t n) { nl::silu_row(y, n); }
__attribute__((flatten)) void SoftmaxRows(float* y, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) nl::softmax_row(y + r * n, n);
}
__attribute__((flatten)) void LayerNormRow(float* y, int64_t n, const float* scale, const float* bias, float epsilon) {
  nl::layer_norm_row(y, n, scale, bias, epsilon);
}
__attribute__((flatten)) void RMSNormRow(float* y, int64_t n, const float* scale, float epsilon) {
  nl::rms_norm_row(y, n, scale, epsilon);
}
__attribute__((flatten)) void AttentionRows(const int8_t* q, const float* qs, int64_t rows, int64_t row0, int64_t sq,
                                            int64_t sk, bool causal, const nl::AttentionKeys& kv, float scale,
                                            const float* mask, int64_t mask_row_stride, int64_t mask_key_stride,
                                            float* y) {
  float tile[nl::kAttentionKeyTile];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = row0 + r;
    const float* mask_row = mask != nullptr ? mask + i * mask_row_stride : nullptr;
    nl::attention_row(q + r * kv.dh, qs + r * kv.nb, kv, nl::attention_visible_keys(i, sq, sk, causal), scale,
                      mask_row, mask_key_stride, tile, y + r * kv.dh);
  }
}

}  // namespace BCT_PORTABLE_PATH
}  // namespace cpu
}  // namespace bct
