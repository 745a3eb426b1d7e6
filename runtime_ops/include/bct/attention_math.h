// BlockAttention's arithmetic for one query row (docs/ops.md), host and device code: the numpy
// specification is bct_onnx/reference_attention.py, written in this order. Scores of a tile of
// kAttentionKeyTile keys are BlockActMatMul's block dots (nl::act_dot) times `scale` plus the mask;
// an online softmax (running max m, sum l, output y) rescales by exp(m - m_new) when a tile raises the
// max and then adds p * V key by key, so the probability row is never stored. Every float operation
// is rounded on its own (fmul/fadd, no FMA), so CPU paths, CUDA and numpy give the same bits.
#pragma once

#include <cstdint>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"

namespace bct {
namespace nl {

constexpr int64_t kAttentionKeyTile = 64;
constexpr int64_t kAttentionMaxValueCodesDh = 128;

// The keys of one KV head: signed Q x K^T codes [sk, dh] with float32 scales [sk, nb], V [sk, dh];
// key j's code and scale rows are j * key_step rows from the first, its V row j * value_step rows
// (1: heads first [B, H, S, *]; H: [B, S, H * *]). The CPU kernels also take V as 8-bit symmetric
// cache codes (values nullptr; heads first; dh <= kAttentionMaxValueCodesDh): value_codes [sk, dh] with
// float32 scales [sk, value_nb] of blocks of value_block_size, each value (code - 128) * scale as
// block_format.dequantize gives it; the code rows from value_codes_split on are then read from
// value_codes_rest (a decoder step reads its past rows from the past cache, its new rows from the
// present one): value_code_row.
struct AttentionKeys {
  const int8_t* codes;
  const float* scales;
  const float* values;
  int64_t dh;
  int64_t nb;
  int64_t block_size;
  int64_t key_step = 1;
  int64_t value_step = 1;
  const uint8_t* value_codes = nullptr;
  const float* value_scales = nullptr;
  int64_t value_nb = 0;
  int64_t value_block_size = 0;
  const uint8_t* value_codes_rest = nullptr;
  int64_t value_codes_split = INT64_MAX;  // every row from value_codes when not set
};

// V's code row t (value_codes given).
BCT_HD BCT_INLINE const uint8_t* value_code_row(const AttentionKeys& kv, int64_t t) {
  return t < kv.value_codes_split ? kv.value_codes + t * kv.dh
                                  : kv.value_codes_rest + (t - kv.value_codes_split) * kv.dh;
}

// Row (b, h, i) of a tensor of `heads` heads and `seq` positions, [B, H, S, *] (heads first) or
// [B, S, H * *] (packed), counted in rows of its last dim (the head size, or the blocks of a row).
BCT_HD BCT_INLINE int64_t attention_row_index(bool packed, int64_t heads, int64_t seq, int64_t b, int64_t h,
                                              int64_t i) {
  return packed ? (b * seq + i) * heads + h : (b * heads + h) * seq + i;
}

// Stored symmetric codes of one row (a compressed K in the op's block format) as signed int8 codes
// q = u - 2**(bits-1), and its scales widened to float32 (NaN for a non-finite scale, as act_scale).
BCT_HD BCT_INLINE void signed_codes_of_row(const uint8_t* row, int64_t dh, int bits, int64_t row_nbytes,
                                           ScaleKind kind, const void* scales, int64_t first_block, int64_t nb,
                                           int8_t* q, float* q_scales) {
  const int zp = 1 << (bits - 1);
  if (bits == 8) {  // one code per byte: u - 128 is the byte with its top bit flipped (vectorises)
    for (int64_t i = 0; i < dh; ++i) q[i] = static_cast<int8_t>(row[i] ^ 0x80u);
  } else {
    for (int64_t i = 0; i < dh; ++i) q[i] = static_cast<int8_t>(static_cast<int>(get_code(row, i, bits, row_nbytes)) - zp);
  }
  for (int64_t b = 0; b < nb; ++b) q_scales[b] = act_scale(scale_value(kind, scales, first_block + b));
}

// The running state of one query row's online softmax.
struct AttentionRowState {
  float m;        // running max (-inf: nothing live yet)
  float l;        // running sum of p
  bool poisoned;  // a NaN score: the row is NaN
};

BCT_HD BCT_INLINE AttentionRowState attention_row_start(float* y, int64_t dh) {
  for (int64_t d = 0; d < dh; ++d) y[d] = 0.0f;
  return AttentionRowState{float_from_bits(0xff800000u), 0.0f, false};
}

// One tile of keys [t0, t0 + len) of a row: scores into tile (dots[j] when given, else
// act_dot(q, key j)), times scale, plus mask[j * mask_stride] (mask may be nullptr); a raised max
// rescales l and y by exp(m - m_new); then tile[t] = p = exp(s - m) and l += lane_sum(p). Returns
// false when the tile adds nothing (the max is still -inf): y must then not be updated.
BCT_HD BCT_INLINE bool attention_tile_probs(AttentionRowState& st, const int8_t* q, const float* q_scales,
                                            const AttentionKeys& kv, const float* dots, int64_t t0, int64_t len,
                                            float scale, const float* mask, int64_t mask_stride, float* tile,
                                            float* y) {
  const int64_t dh = kv.dh;
  // Scores in separate simple loops (each one vectorises on the CPU paths).
  if (dots != nullptr) {
    for (int64_t t = 0; t < len; ++t) tile[t] = fmul(dots[t0 + t], scale);
  } else {
    for (int64_t t = 0; t < len; ++t) {
      const int64_t j = t0 + t;
      const int64_t row = j * kv.key_step;
      tile[t] = fmul(act_dot(q, q_scales, kv.codes + row * dh, kv.scales + row * kv.nb, dh, kv.block_size), scale);
    }
  }
  if (mask != nullptr) {
    const float* mt = mask + t0 * mask_stride;
    if (mask_stride == 1) {
      for (int64_t t = 0; t < len; ++t) tile[t] = fadd(tile[t], mt[t]);
    } else {
      for (int64_t t = 0; t < len; ++t) tile[t] = fadd(tile[t], mt[t * mask_stride]);
    }
  }
  int nan_seen = 0;
  for (int64_t t = 0; t < len; ++t) nan_seen |= is_nan(tile[t]) ? 1 : 0;
  st.poisoned = st.poisoned || nan_seen != 0;
  const float m_tile = row_max(tile, len);
  const float m_new = m_tile > st.m ? m_tile : st.m;
  if (m_new == float_from_bits(0xff800000u)) return false;
  if (m_new != st.m) {
    const float corr = exp_f32(fsub(st.m, m_new));
    st.l = fmul(st.l, corr);
    for (int64_t d = 0; d < dh; ++d) y[d] = fmul(y[d], corr);
    st.m = m_new;
  }
  for (int64_t t = 0; t < len; ++t) tile[t] = exp_f32(fsub(tile[t], st.m));
  st.l = fadd(st.l, lane_sum(tile, len));  // the tile's p summed in lane order, then added to l
  return true;
}

// y += p[t] * v[t] for the keys of a tile, in key order (values: the tile's first V row; rows
// value_stride floats apart).
BCT_HD BCT_INLINE void attention_tile_values(const float* p, int64_t len, const float* values, int64_t value_stride,
                                             int64_t dh, float* y) {
  for (int64_t t = 0; t < len; ++t) {
    const float* v = values + t * value_stride;
    for (int64_t d = 0; d < dh; ++d) y[d] = fadd(y[d], fmul(p[t], v[d]));
  }
}

// y * (1 / l); 0 for a row with no live key, NaN for a poisoned row.
BCT_HD BCT_INLINE void attention_row_finish(const AttentionRowState& st, float* y, int64_t dh) {
  if (st.poisoned || st.l == 0.0f) {
    const float fill = st.poisoned ? float_from_bits(0x7fc00000u) : 0.0f;
    for (int64_t d = 0; d < dh; ++d) y[d] = fill;
    return;
  }
  const float inv = fdiv(1.0f, st.l);
  for (int64_t d = 0; d < dh; ++d) y[d] = fmul(y[d], inv);
}

// One output row y [dh] of query codes q [dh] / q_scales [nb] over keys [0, keys) of `kv`: the steps
// above, tile by tile. dots: nullptr, or the block dots act_dot(q, key j) already computed (the CPU
// computes a strip of rows at once with BlockActMatMul's dot kernels: the same values). mask: nullptr,
// or the additive mask of this row read at mask[j * mask_stride] (stride 0: one value for every key).
// tile: scratch of kAttentionKeyTile floats. A row with no live key is 0; a row with a NaN score (a NaN
// or infinity in a block of its query or of a key, or a NaN mask) is NaN.
BCT_HD BCT_INLINE void attention_row(const int8_t* q, const float* q_scales, const AttentionKeys& kv, const float* dots,
                                     int64_t keys, float scale, const float* mask, int64_t mask_stride, float* tile,
                                     float* y) {
  AttentionRowState st = attention_row_start(y, kv.dh);
  for (int64_t t0 = 0; t0 < keys; t0 += kAttentionKeyTile) {
    const int64_t len = (keys - t0) < kAttentionKeyTile ? (keys - t0) : kAttentionKeyTile;
    if (attention_tile_probs(st, q, q_scales, kv, dots, t0, len, scale, mask, mask_stride, tile, y)) {
      attention_tile_values(tile, len, kv.values + t0 * kv.value_step * kv.dh, kv.value_step * kv.dh, kv.dh, y);
    }
  }
  attention_row_finish(st, y, kv.dh);
}

// Keys query row i (of sq) may see: all sk, or with causal the first i + 1 + (sk - sq).
BCT_HD BCT_INLINE int64_t attention_visible_keys(int64_t i, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  const int64_t visible = i + 1 + (sk - sq);
  return visible < 0 ? 0 : (visible > sk ? sk : visible);
}

// ---------------------------------------------------------------------------------------------
// The decoder step (BlockAttention with new keys and values, reference_attention.attention_step):
// rotary embedding of Q and the new keys, the new rows appended to the cache (quantized when the
// cache holds codes), and Q / K_new / V_new / Y in [B, S, H * Dh] ("packed") or [B, H, S, Dh].

struct AttentionStepDims {
  int64_t batch, q_heads, kv_heads, sq, past, dh;
  bool packed;              // Q, K_new, V_new and Y are [B, S, H * Dh]
  int64_t rot;              // rotary width R (0: no rotary); cos / sin rows [Bc, Sq, R]
  int64_t cos_batch_stride; // elements between the batches of cos / sin (0: one batch for all)
};

// Offset of the row (batch b, head h of `heads`, position i) in a [B, H, S, Dh] or [B, S, H * Dh] tensor.
BCT_HD BCT_INLINE int64_t step_row_offset(const AttentionStepDims& d, int64_t heads, int64_t b, int64_t h,
                                          int64_t i) {
  return d.packed ? ((b * d.sq + i) * heads + h) * d.dh : ((b * heads + h) * d.sq + i) * d.dh;
}

// Rotary embedding, rotate_half form, of one row: out = x * cos + rotate_half(x) * sin on the first
// rot elements (rotate_half(x) = [-x[rot/2:rot], x[:rot/2]]), the rest copied; each operation
// rounded on its own, as the exporters' Mul / Neg / Mul / Add nodes are.
BCT_HD BCT_INLINE void rotary_row(const float* x, const float* cos, const float* sin, int64_t rot, int64_t dh,
                                  float* out) {
  const int64_t half = rot / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = fadd(fmul(x[d], cos[d]), fmul(-x[d + half], sin[d]));
  for (int64_t d = half; d < rot; ++d) out[d] = fadd(fmul(x[d], cos[d]), fmul(x[d - half], sin[d]));
  for (int64_t d = rot; d < dh; ++d) out[d] = x[d];
}

// Row r of [B, heads, Sq] (heads first) of the step input x (Q or K_new: rotary applied when
// rotate and d.rot > 0; V_new: copied) into out [dh].
BCT_HD BCT_INLINE void step_input_row(const AttentionStepDims& d, const float* x, int64_t heads, int64_t r,
                                      bool rotate, const float* cos, const float* sin, float* out) {
  const int64_t i = r % d.sq, bh = r / d.sq;
  const int64_t b = bh / heads, h = bh % heads;
  const float* src = x + step_row_offset(d, heads, b, h, i);
  if (rotate && d.rot > 0) {
    const int64_t c = b * d.cos_batch_stride + i * d.rot;
    rotary_row(src, cos + c, sin + c, d.rot, d.dh, out);
  } else {
    for (int64_t e = 0; e < d.dh; ++e) out[e] = src[e];
  }
}

// One cache row x [dh] as symmetric codes (row of row_nbytes bytes) and scales at scales[first_block..]:
// BlockQuantize's arithmetic (block_format.quantize): the scale of each block from its extreme, its
// stored form, then codes from the stored scale's inverse.
BCT_HD BCT_INLINE void quantize_cache_row(const float* x, int64_t dh, int bits, int64_t block_size, ScaleKind kind,
                                          int64_t row_nbytes, uint8_t* row, void* scales, int64_t first_block) {
  for (int64_t byte = 0; byte < row_nbytes; ++byte) row[byte] = 0;
  for (int64_t begin = 0, blk = 0; begin < dh; begin += block_size, ++blk) {
    const int64_t n = (dh - begin) < block_size ? (dh - begin) : block_size;
    const StoredScale s = choose_symmetric_scale(x + begin, n, bits, kind);
    store_scale(kind, scales, first_block + blk, s);
    const float inv = inverse_scale(s.value);
    for (int64_t e = 0; e < n; ++e) put_code(row, begin + e, bits, code_of(x[begin + e], inv, bits, true, 0));
  }
}

}  // namespace nl
}  // namespace bct
