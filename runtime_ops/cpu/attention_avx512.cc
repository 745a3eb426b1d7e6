// BlockAttention's rows (Kernels(isa).attention_rows, cpu/kernel_table.h) in AVX-512 registers: the
// float32 operations of bct/attention_math.h in its order, so the same bits as the portable rows
// (cpu/portable_kernels_impl.h) and the numpy spec. A group of up to four query rows is worked on a
// key tile at a time: per row the tile's scores (dots * scale + mask), NaN check, max (integer keys,
// as nl::row_max), rescale, p = exp_f32(s - m) (16 lanes, four vectors in flight) and the lane sum;
// then the rows' p x V advance together key by key with the rows' outputs in registers, so each V
// load feeds every row of the group. Head sizes up to kMaxDh; other cases (no dots given, a mask
// read with another key stride) run the portable rows.
#include <algorithm>
#include <cstdint>

#include <immintrin.h>

#include "bct/attention_math.h"
#include "bct/nonlinear_math.h"
#include "cpu/kernel_table.h"

#if BCT_X86_SIMD
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// GCC 12 warns about the undefined vector behind masked intrinsics; nothing reads it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "cpu/avx512_math.h"  // after the target pragma: its inline functions are AVX-512 code

namespace bct {
namespace cpu {
namespace {

using avx512_math::ExpOfClampedR;
using avx512_math::TailMask;

constexpr int64_t kTile = nl::kAttentionKeyTile;  // 64 keys: four vectors of 16
constexpr int kTileVectors = static_cast<int>(kTile / 16);
constexpr int64_t kMaxDh = nl::kAttentionMaxValueCodesDh;  // 128: eight vectors
constexpr int kMaxRows = 4;

// Loops over the registers of a group, unrolled before scalar replacement so the arrays of vectors
// stay in registers (GCC keeps a memory copy of them otherwise).
#define BCT_UNROLL _Pragma("GCC unroll 8")

// nl::exp_f32 of R vectors x that are <= 0 or a quiet NaN (s - m of a tile: m is the largest non-NaN
// score): the clamp at kExpHi is then a no-op, and a NaN lane needs no select, as every operation
// returns its NaN operand (the same bits as exp_f32's `return x`).
template <int R>
inline void ExpOfNonPositive(__m512* x) {
  const __m512 lo = _mm512_set1_ps(nl::kExpLo);
  __m512 xk[R], y[R], k[R];
  BCT_UNROLL for (int i = 0; i < R; ++i) xk[i] = _mm512_max_ps(lo, x[i]);  // second operand: a NaN x stays
  ExpOfClampedR<R>(xk, y, k);
  BCT_UNROLL for (int i = 0; i < R; ++i) {
    // x < lo: 0 (ordered compare: a NaN lane keeps its NaN)
    x[i] = _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x[i], lo, _CMP_NLT_UQ), y[i], k[i]);
  }
}

inline __mmask16 TileLanes(int64_t len, int v) {
  return len > 16 * v ? TailMask(len - 16 * v) : static_cast<__mmask16>(0);
}

// Step 1 of nl::attention_tile_probs with the dots given: the tile's scores s = dots * scale + mask
// into tile; a NaN score poisons the row; returns the largest non-NaN score (-inf if none). A float
// max: it may differ from nl::row_max only in the sign of a zero maximum, which changes no result.
inline float TileScores(nl::AttentionRowState& st, const float* dots, int64_t len, float scale, const float* mask,
                        int64_t mask_stride, float* tile) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __mmask16 nan_seen = 0;
  __m512 best = _mm512_set1_ps(float_from_bits(0xff800000u));
  BCT_UNROLL for (int v = 0; v < kTileVectors; ++v) {
    const __mmask16 valid = TileLanes(len, v);
    __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, dots + 16 * v), vscale);
    if (mask != nullptr) {
      s = _mm512_add_ps(s, mask_stride == 0 ? _mm512_set1_ps(mask[0]) : _mm512_maskz_loadu_ps(valid, mask + 16 * v));
    }
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(valid, s, s, _CMP_UNORD_Q);
    nan_seen = static_cast<__mmask16>(nan_seen | nan);
    best = _mm512_mask_max_ps(best, static_cast<__mmask16>(valid & ~nan), best, s);
    _mm512_store_ps(tile + 16 * v, s);
  }
  st.poisoned = st.poisoned || nan_seen != 0;
  return _mm512_reduce_max_ps(best);
}

// The rest of nl::attention_tile_probs once the tile's max is known: a raised max rescales l and y
// [dh]; p = exp_f32(s - m) into tile (lanes from len on 0), l += lane_sum(p). Returns false when the
// tile adds nothing (the max is still -inf).
inline bool TileProbs(nl::AttentionRowState& st, float m_tile, int64_t len, float* tile, float* y, int64_t dh) {
  const float m_new = m_tile > st.m ? m_tile : st.m;
  if (m_new == float_from_bits(0xff800000u)) return false;
  // Nothing live yet (m = -inf: l = 0, y = +0): the rescale by exp_f32(-inf) = 0 leaves them as they are.
  if (m_new != st.m && st.m != float_from_bits(0xff800000u)) {
    const float corr = nl::exp_f32(fsub(st.m, m_new));
    st.l = fmul(st.l, corr);
    const __m512 vcorr = _mm512_set1_ps(corr);
    for (int64_t d = 0; d < dh; d += 16) _mm512_store_ps(y + d, _mm512_mul_ps(_mm512_load_ps(y + d), vcorr));
  }
  st.m = m_new;
  const __m512 vm = _mm512_set1_ps(st.m);
  __m512 s[kTileVectors];
  BCT_UNROLL for (int v = 0; v < kTileVectors; ++v) s[v] = _mm512_sub_ps(_mm512_load_ps(tile + 16 * v), vm);
  ExpOfNonPositive<kTileVectors>(s);
  // the lane sum: lane j of 8 adds elements j, j + 8, ... in order (nl::lane_sum); p >= 0, so the
  // zeros of the lanes past len add nothing
  __m256 acc = _mm256_setzero_ps();
  BCT_UNROLL for (int v = 0; v < kTileVectors; ++v) {
    const __m512 p = _mm512_maskz_mov_ps(TileLanes(len, v), s[v]);
    _mm512_store_ps(tile + 16 * v, p);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(p));
    acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(p, 1));
  }
  alignas(32) float lanes[nl::kLanes];
  _mm256_store_ps(lanes, acc);
  st.l = fadd(st.l, nl::combine_lanes(lanes));
  return true;
}

// y_r += p_r[t] * v[t] for t < len[r], key by key, for the R rows of a group (outputs y [R][kMaxDh],
// NV vectors of 16 each, the last one masked by last; a row not yet started reads y_r as +0, as
// nl::attention_row_start sets it); keys all rows take run for every row at once.
template <int R, int NV>
inline void AccumulateValues(const float (*p)[kTile], const int64_t* len, const bool* started, const float* values,
                             int64_t value_stride, __mmask16 last, float (*y)[kMaxDh]) {
  __m512 acc[R][NV];
  BCT_UNROLL for (int r = 0; r < R; ++r) {
    BCT_UNROLL for (int v = 0; v < NV; ++v) {
      acc[r][v] = started[r] ? _mm512_load_ps(y[r] + 16 * v) : _mm512_setzero_ps();
    }
  }
  int64_t common = len[0];
  BCT_UNROLL for (int r = 1; r < R; ++r) common = std::min(common, len[r]);
  for (int64_t t = 0; t < common; ++t) {
    const float* row = values + t * value_stride;
    __m512 vv[NV];
    BCT_UNROLL for (int v = 0; v < NV; ++v) vv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
    BCT_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r][t]);
      BCT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_mul_ps(pr, vv[v]));
    }
  }
  BCT_UNROLL for (int r = 0; r < R; ++r) {
    BCT_UNROLL for (int v = 0; v < NV; ++v) _mm512_store_ps(y[r] + 16 * v, acc[r][v]);
  }
  for (int r = 0; r < R; ++r) {  // the keys only some rows take (causal rows of one group), in memory
    for (int64_t t = common; t < len[r]; ++t) {
      const float* row = values + t * value_stride;
      const __m512 pr = _mm512_set1_ps(p[r][t]);
      for (int v = 0; v < NV; ++v) {
        const __m512 vv = v == NV - 1 ? _mm512_maskz_loadu_ps(last, row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
        _mm512_store_ps(y[r] + 16 * v, _mm512_add_ps(_mm512_load_ps(y[r] + 16 * v), _mm512_mul_ps(pr, vv)));
      }
    }
  }
}

// Rows [t0, t0 + count) of V given as 8-bit cache codes into out [count, dh]: (code - 128) * scale,
// the portable DequantizeValueCodes' bits (the code and the bias are exact floats: one rounding, the
// product's), 16 codes a step, each lane's block scale permuted from the row's scales in a register. A
// row of more than 16 blocks runs the portable loop.
void DequantizeValueCodesAvx512(const nl::AttentionKeys& kv, int64_t t0, int64_t count, float* out) {
  const int64_t dh = kv.dh, bs = kv.value_block_size, nb = kv.value_nb;
  if (nb > 16 || bs <= 0 || dh > kMaxDh) return avx512::DequantizeValueCodes(kv, t0, count, out);
  const int64_t chunks = (dh + 15) / 16;
  __m512i block_of[kMaxDh / 16];  // each lane's block within the row
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) int32_t index[16];
    for (int64_t l = 0; l < 16; ++l) index[l] = static_cast<int32_t>(std::min(c * 16 + l, dh - 1) / bs);
    block_of[c] = _mm512_load_si512(index);
  }
  const __mmask16 scale_lanes = static_cast<__mmask16>((1u << nb) - 1u);
  const __mmask16 last = TailMask(dh - 16 * (chunks - 1));
  const __m512 bias = _mm512_set1_ps(128.0f);
  for (int64_t t = 0; t < count; ++t) {
    const uint8_t* row = nl::value_code_row(kv, t0 + t);
    const __m512 scales = _mm512_maskz_loadu_ps(scale_lanes, kv.value_scales + (t0 + t) * nb);
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 m = c == chunks - 1 ? last : static_cast<__mmask16>(0xffff);
      const __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, row + 16 * c)));
      const __m512 value = _mm512_mul_ps(_mm512_sub_ps(code, bias), _mm512_permutexvar_ps(block_of[c], scales));
      _mm512_mask_storeu_ps(out + t * dh + 16 * c, m, value);
    }
  }
}

using AccumulateFn = void (*)(const float (*)[kTile], const int64_t*, const bool*, const float*, int64_t, __mmask16,
                              float (*)[kMaxDh]);

// Rows of a group for NV vectors per row: R * NV accumulators plus NV values within the 32 registers.
constexpr int GroupRows(int64_t vectors) { return vectors <= 5 ? 4 : (vectors <= 6 ? 3 : 2); }

template <int NV>
AccumulateFn AccumulateFor(int rows) {
  constexpr int most = GroupRows(NV);
  if constexpr (most >= 4) {
    if (rows >= 4) return AccumulateValues<4, NV>;
  }
  if constexpr (most >= 3) {
    if (rows == 3) return AccumulateValues<3, NV>;
  }
  return rows >= 2 ? AccumulateValues<2, NV> : AccumulateValues<1, NV>;
}

AccumulateFn Accumulator(int64_t vectors, int rows) {
  switch (vectors) {
    case 1: return AccumulateFor<1>(rows);
    case 2: return AccumulateFor<2>(rows);
    case 3: return AccumulateFor<3>(rows);
    case 4: return AccumulateFor<4>(rows);
    case 5: return AccumulateFor<5>(rows);
    case 6: return AccumulateFor<6>(rows);
    case 7: return AccumulateFor<7>(rows);
    default: return AccumulateFor<8>(rows);
  }
}

}  // namespace

void AttentionRowsAvx512(const int8_t* q, const float* qs, const float* dots, int64_t rows, int64_t row0, int64_t sq,
                         int64_t sk, bool causal, const nl::AttentionKeys& kv, float scale, const float* mask,
                         int64_t mask_row_stride, int64_t mask_key_stride, float* y, int64_t y_stride) {
  const int64_t dh = kv.dh;
  if (dots == nullptr || dh > kMaxDh || dh <= 0 || (mask != nullptr && mask_key_stride != 0 && mask_key_stride != 1)) {
    avx512::AttentionRows(q, qs, dots, rows, row0, sq, sk, causal, kv, scale, mask, mask_row_stride, mask_key_stride,
                          y, y_stride);
    return;
  }
  const int64_t vectors = (dh + 15) / 16;
  const __mmask16 last = TailMask(dh - 16 * (vectors - 1));
  const int group = GroupRows(vectors);
  const int64_t value_stride = kv.value_codes != nullptr ? dh : kv.value_step * dh;
  alignas(64) float tile_values[kTile * kMaxDh];
  alignas(64) float tiles[kMaxRows][kTile];
  alignas(64) float out[kMaxRows][kMaxDh];
  for (int64_t r0 = 0; r0 < rows; r0 += group) {
    const int n = static_cast<int>(std::min<int64_t>(group, rows - r0));
    const AccumulateFn accumulate = Accumulator(vectors, n);
    nl::AttentionRowState st[kMaxRows];
    bool started[kMaxRows] = {false, false, false, false};  // out[r] is +0 until the row's first live tile
    int64_t keys[kMaxRows] = {0, 0, 0, 0};
    int64_t most = 0;
    for (int r = 0; r < n; ++r) {
      st[r] = nl::AttentionRowState{float_from_bits(0xff800000u), 0.0f, false};  // nl::attention_row_start
      keys[r] = nl::attention_visible_keys(row0 + r0 + r, sq, sk, causal);
      most = std::max(most, keys[r]);
    }
    for (int64_t t0 = 0; t0 < most; t0 += kTile) {
      int64_t len[kMaxRows] = {0, 0, 0, 0};
      // The rows' scores and maxima first, then their exponentials: the rows' chains overlap.
      float m_tile[kMaxRows];
      for (int r = 0; r < n; ++r) {
        const int64_t left = keys[r] - t0;
        len[r] = left <= 0 ? 0 : std::min<int64_t>(left, kTile);
        if (len[r] == 0) continue;
        const float* mask_row =
            mask != nullptr ? mask + (row0 + r0 + r) * mask_row_stride + t0 * mask_key_stride : nullptr;
        m_tile[r] = TileScores(st[r], dots + (r0 + r) * sk + t0, len[r], scale, mask_row, mask_key_stride, tiles[r]);
      }
      for (int r = 0; r < n; ++r) {
        if (len[r] > 0 && !TileProbs(st[r], m_tile[r], len[r], tiles[r], out[r], dh)) len[r] = 0;
      }
      const int64_t tile_len = *std::max_element(len, len + n);
      if (tile_len == 0) continue;
      const float* values = tile_values;
      if (kv.value_codes != nullptr) {
        DequantizeValueCodesAvx512(kv, t0, tile_len, tile_values);
      } else {
        values = kv.values + t0 * value_stride;
      }
      accumulate(tiles, len, started, values, value_stride, last, out);
      for (int r = 0; r < n; ++r) started[r] = started[r] || len[r] > 0;
    }
    for (int r = 0; r < n; ++r) {  // nl::attention_row_finish
      float* yr = y + (r0 + r) * y_stride;
      const bool fill = st[r].poisoned || st[r].l == 0.0f;
      const __m512 value = _mm512_set1_ps(st[r].poisoned ? float_from_bits(0x7fc00000u) : 0.0f);
      const __m512 inv = _mm512_set1_ps(fill ? 0.0f : fdiv(1.0f, st[r].l));
      for (int64_t v = 0; v < vectors; ++v) {
        const __mmask16 m = v == vectors - 1 ? last : static_cast<__mmask16>(0xffff);
        _mm512_mask_storeu_ps(yr + 16 * v, m, fill ? value : _mm512_mul_ps(_mm512_load_ps(out[r] + 16 * v), inv));
      }
    }
  }
}

}  // namespace cpu
}  // namespace bct

#endif  // BCT_X86_SIMD
