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
__attribute__((flatten)) void LayerNormRows(float* y, int64_t rows, int64_t n, const float* scale, const float* bias,
                                            float epsilon) {
  for (int64_t r = 0; r < rows; ++r) nl::layer_norm_row(y + r * n, n, scale, bias, epsilon);
}
void AddRow(const float* a, const float* b, int64_t n, float* y, float* sum) {
  if (sum != nullptr) {
    for (int64_t j = 0; j < n; ++j) sum[j] = y[j] = fadd(a[j], b[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = fadd(a[j], b[j]);
  }
}
__attribute__((flatten)) void RMSNormRows(float* y, int64_t rows, int64_t n, const float* scale, float epsilon) {
  for (int64_t r = 0; r < rows; ++r) nl::rms_norm_row(y + r * n, n, scale, epsilon);
}
// BlockAttention's rows (bct/attention_math.h), four at a time: each runs its own tile steps, then
// the four p x V accumulations advance together key by key, so four independent add chains are in
// flight instead of one; for head sizes 32 and 64 the four output rows stay in registers over a tile
// (the same operations per row, in the same order: the same bits).
constexpr int kAttentionRows = 4;

template <int64_t kDh>
inline void AccumulateTileFixed(const float (*p)[nl::kAttentionKeyTile], const int64_t* len, int n, int64_t tile_len,
                                const float* values, int64_t value_stride, float* y, int64_t y_stride) {
  float acc[kAttentionRows][kDh];
  for (int r = 0; r < kAttentionRows; ++r) {
    for (int64_t d = 0; d < kDh; ++d) acc[r][d] = r < n ? y[r * y_stride + d] : 0.0f;
  }
  bool every_key = n == kAttentionRows;  // all four rows take every key of the tile (an encoder's tiles)
  for (int r = 0; r < n; ++r) every_key = every_key && len[r] == tile_len;
  if (every_key) {  // the same operations without the per-row key checks
    for (int64_t t = 0; t < tile_len; ++t) {
      const float* v = values + t * value_stride;
      for (int r = 0; r < kAttentionRows; ++r) {
        const float pr = p[r][t];
        for (int64_t d = 0; d < kDh; ++d) acc[r][d] = fadd(acc[r][d], fmul(pr, v[d]));
      }
    }
  } else {
    for (int64_t t = 0; t < tile_len; ++t) {
      const float* v = values + t * value_stride;
      for (int r = 0; r < kAttentionRows; ++r) {
        if (t >= len[r]) continue;
        const float pr = p[r][t];
        for (int64_t d = 0; d < kDh; ++d) acc[r][d] = fadd(acc[r][d], fmul(pr, v[d]));
      }
    }
  }
  for (int r = 0; r < n; ++r) {
    for (int64_t d = 0; d < kDh; ++d) y[r * y_stride + d] = acc[r][d];
  }
}

inline void AccumulateTile(const float (*p)[nl::kAttentionKeyTile], const int64_t* len, int n, int64_t tile_len,
                           const float* values, int64_t value_stride, int64_t dh, float* y, int64_t y_stride) {
  if (dh == 32) return AccumulateTileFixed<32>(p, len, n, tile_len, values, value_stride, y, y_stride);
  if (dh == 64) return AccumulateTileFixed<64>(p, len, n, tile_len, values, value_stride, y, y_stride);
  for (int64_t t = 0; t < tile_len; ++t) {
    const float* v = values + t * value_stride;
    for (int r = 0; r < n; ++r) {
      if (t >= len[r]) continue;
      const float pr = p[r][t];
      float* yr = y + r * y_stride;
      for (int64_t d = 0; d < dh; ++d) yr[d] = fadd(yr[d], fmul(pr, v[d]));
    }
  }
}

// Rows [t0, t0 + count) of V given as 8-bit symmetric cache codes (nl::AttentionKeys) into out [count, dh]:
// (code - 128) * scale, block_format.dequantize's float32 values.
void DequantizeValueCodes(const nl::AttentionKeys& kv, int64_t t0, int64_t count, float* out) {
  const int64_t dh = kv.dh, bs = kv.value_block_size;
  for (int64_t t = 0; t < count; ++t) {
    const uint8_t* row = nl::value_code_row(kv, t0 + t);
    const float* scales = kv.value_scales + (t0 + t) * kv.value_nb;
    float* o = out + t * dh;
    for (int64_t b0 = 0, blk = 0; b0 < dh; b0 += bs, ++blk) {
      const int64_t end = std::min(dh, b0 + bs);
      const float s = scales[blk];
      for (int64_t d = b0; d < end; ++d) o[d] = fmul(fsub(static_cast<float>(row[d]), 128.0f), s);
    }
  }
}

__attribute__((flatten)) void AttentionRows(const int8_t* q, const float* qs, const float* dots, int64_t rows,
                                            int64_t row0, int64_t sq, int64_t sk, bool causal,
                                            const nl::AttentionKeys& kv, float scale, const float* mask,
                                            int64_t mask_row_stride, int64_t mask_key_stride, float* y,
                                            int64_t y_stride) {
  const int64_t dh = kv.dh;
  // V as cache codes: a tile's rows dequantized into tile_values (in L1) before its p x V.
  const int64_t value_stride = kv.value_codes != nullptr ? dh : kv.value_step * dh;
  alignas(64) float tile_values[nl::kAttentionKeyTile * nl::kAttentionMaxValueCodesDh];
  float tiles[kAttentionRows][nl::kAttentionKeyTile];
  for (int64_t r0 = 0; r0 < rows; r0 += kAttentionRows) {
    const int n = static_cast<int>(std::min<int64_t>(kAttentionRows, rows - r0));
    nl::AttentionRowState st[kAttentionRows];
    int64_t keys[kAttentionRows] = {0, 0, 0, 0};
    int64_t most = 0;
    for (int r = 0; r < n; ++r) {
      st[r] = nl::attention_row_start(y + (r0 + r) * y_stride, dh);
      keys[r] = nl::attention_visible_keys(row0 + r0 + r, sq, sk, causal);
      most = std::max(most, keys[r]);
    }
    for (int64_t t0 = 0; t0 < most; t0 += nl::kAttentionKeyTile) {
      int64_t len[kAttentionRows] = {0, 0, 0, 0};
      for (int r = 0; r < n; ++r) {
        const int64_t i = row0 + r0 + r;
        const int64_t left = keys[r] - t0;
        len[r] = left <= 0 ? 0 : std::min<int64_t>(left, nl::kAttentionKeyTile);
        if (len[r] == 0) continue;
        const float* mask_row = mask != nullptr ? mask + i * mask_row_stride : nullptr;
        const bool with_q = dots == nullptr;  // else q and qs are not read (and may be nullptr)
        if (!nl::attention_tile_probs(st[r], with_q ? q + (r0 + r) * dh : nullptr,
                                      with_q ? qs + (r0 + r) * kv.nb : nullptr, kv,
                                      dots != nullptr ? dots + (r0 + r) * sk : nullptr, t0, len[r], scale, mask_row,
                                      mask_key_stride, tiles[r], y + (r0 + r) * y_stride)) {
          len[r] = 0;
        }
      }
      const int64_t tile_len = *std::max_element(len, len + kAttentionRows);
      const float* values = kv.values + t0 * value_stride;
      if (kv.value_codes != nullptr) {
        DequantizeValueCodes(kv, t0, tile_len, tile_values);
        values = tile_values;
      }
      AccumulateTile(tiles, len, n, tile_len, values, value_stride, dh, y + r0 * y_stride, y_stride);
    }
    for (int r = 0; r < n; ++r) nl::attention_row_finish(st[r], y + (r0 + r) * y_stride, dh);
  }
}

// BlockScaleErrors (weight_quantizer._column_errors): for every candidate c and row j, the weighted
// squared error of rounding the K-major block x[:, j] with the float32 scale scales[c, j] (and zero
// point zero_points[c, j]). The float32 operations of the numpy steps, one at a time (no FMA), and the
// sum over the block's elements in their order from 0, as einsum's three-operand sum; rows are worked
// on in chunks whose sums stay on the stack, so the loop over a chunk's rows vectorises.
void ScaleErrors(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,
                 int64_t candidates, const float* importance, int bits, bool symmetric, float* errors) {
  constexpr int64_t kChunk = 256;
  // round_half_even's range: |x * inv| beyond it clips to qmin / qmax either way
  constexpr float kRange = 4194304.0f;  // 2**22
  const float qmin = symmetric ? -static_cast<float>(1 << (bits - 1)) : 0.0f;
  const float qmax = symmetric ? static_cast<float>((1 << (bits - 1)) - 1) : static_cast<float>((1 << bits) - 1);
  float inv[kChunk];
  float acc[kChunk];
  for (int64_t c = 0; c < candidates; ++c) {
    const float* s = scales + c * n;
    const float* z = zero_points != nullptr ? zero_points + c * n : nullptr;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t m = std::min(kChunk, n - j0);
      const float* sc = s + j0;
      for (int64_t j = 0; j < m; ++j) {
        inv[j] = inverse_scale(sc[j]);
        acc[j] = 0.0f;
      }
      for (int64_t i = 0; i < len; ++i) {
        const float* xi = x + i * n + j0;
        const float w = importance[i];
        if (z == nullptr) {
          for (int64_t j = 0; j < m; ++j) {
            const float q = clampf(round_half_even(clampf(fmul(xi[j], inv[j]), -kRange, kRange)), qmin, qmax);
            const float d = fsub(fmul(q, sc[j]), xi[j]);
            acc[j] = fadd(acc[j], fmul(fmul(d, d), w));
          }
        } else {
          const float* zc = z + j0;
          for (int64_t j = 0; j < m; ++j) {
            const float r = round_half_even(clampf(fmul(xi[j], inv[j]), -kRange, kRange));
            const float q = fsub(clampf(fadd(r, zc[j]), 0.0f, qmax), zc[j]);
            const float d = fsub(fmul(q, sc[j]), xi[j]);
            acc[j] = fadd(acc[j], fmul(fmul(d, d), w));
          }
        }
      }
      float* e = errors + c * n + j0;
      for (int64_t j = 0; j < m; ++j) e[j] = acc[j];
    }
  }
}

// BlockScaleErrors with reduce=0 (weight_quantizer.block_scale_diffs): the rounding differences
// d = q * scale - x of blocks held row by row, x [n, len], for every candidate: diffs [candidates, n, len].
// The caller sums their squares itself (numpy's einsum, whose order it keeps).
void ScaleDiffs(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,
                int64_t candidates, int bits, bool symmetric, float* diffs) {
  constexpr float kRange = 4194304.0f;  // 2**22, as ScaleErrors
  const float qmin = symmetric ? -static_cast<float>(1 << (bits - 1)) : 0.0f;
  const float qmax = symmetric ? static_cast<float>((1 << (bits - 1)) - 1) : static_cast<float>((1 << bits) - 1);
  for (int64_t c = 0; c < candidates; ++c) {
    for (int64_t j = 0; j < n; ++j) {
      const float s = scales[c * n + j];
      const float inv = inverse_scale(s);
      const float* xj = x + j * len;
      float* d = diffs + (c * n + j) * len;
      if (zero_points == nullptr) {
        for (int64_t i = 0; i < len; ++i) {
          const float q = clampf(round_half_even(clampf(fmul(xj[i], inv), -kRange, kRange)), qmin, qmax);
          d[i] = fsub(fmul(q, s), xj[i]);
        }
      } else {
        const float z = zero_points[c * n + j];
        for (int64_t i = 0; i < len; ++i) {
          const float r = round_half_even(clampf(fmul(xj[i], inv), -kRange, kRange));
          d[i] = fsub(fmul(fsub(clampf(fadd(r, z), 0.0f, qmax), z), s), xj[i]);
        }
      }
    }
  }
}

// BlockGptqColumns (gptq._gptq_walk's per-column loop over one quantization block, integer codes): column i of
// the K-major block [len, n] (float64, corrected in place) is rounded with the rows' float32 scale, inverse
// scale (and zero point: nullptr when symmetric) into levels [len, n], its error (w - q * scale) * d_i into
// errors [len, n] (float64), and the rows of the block's later columns j get fma(-hinv[i, j], err, w_j), as
// OpenBLAS's dger computes them for the numpy walk. The steps of the numpy loop one at a time: the float64
// weight rounded to float32, float32 multiply, np.rint (nearbyint: ties to even, -0.0 kept), np.clip or
// np.maximum / np.minimum (NaN passes), float32 products, float64 difference and product.
void GptqColumns(double* block, int64_t len, int64_t n, const double* hinv, const double* inverse_diagonal,
                 const float* scale, const float* inverse, const float* zero, int bits, bool symmetric, float* levels,
                 double* errors) {
  const float low = symmetric ? -static_cast<float>(1 << (bits - 1)) : 0.0f;
  const float high = symmetric ? static_cast<float>((1 << (bits - 1)) - 1) : static_cast<float>((1 << bits) - 1);
  for (int64_t i = 0; i < len; ++i) {
    const double* column = block + i * n;
    float* level = levels + i * n;
    double* err = errors + i * n;
    const double d = inverse_diagonal[i];
    if (zero == nullptr) {
      for (int64_t r = 0; r < n; ++r) {
        const float q = clampf(std::nearbyint(static_cast<float>(column[r]) * inverse[r]), low, high);
        level[r] = q;
        err[r] = (column[r] - static_cast<double>(q * scale[r])) * d;
      }
    } else {
      for (int64_t r = 0; r < n; ++r) {
        const float q = nan_min(nan_max(std::nearbyint(static_cast<float>(column[r]) * inverse[r]) + zero[r], low), high);
        level[r] = q;
        err[r] = (column[r] - static_cast<double>((q - zero[r]) * scale[r])) * d;
      }
    }
    for (int64_t j = i + 1; j < len; ++j) {
      const double t = -1.0 * hinv[i * len + j];
      double* row = block + j * n;
      for (int64_t r = 0; r < n; ++r) row[r] = std::fma(t, err[r], row[r]);
    }
  }
}

}  // namespace BCT_PORTABLE_PATH
}  // namespace cpu
}  // namespace bct
