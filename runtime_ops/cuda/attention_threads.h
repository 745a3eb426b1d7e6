// The work of one CUDA thread of BlockAttention's kernels (cuda/attention.cu), as host/device code,
// so tests/cuda_threads_on_host.cc runs every "thread" on the CPU against the numpy spec. Q rows and
// float K rows are quantized per (row, block) by matmul_threads.h's QuantizeActBlockOne; the other
// steps are below. One thread per query row runs bct/attention_math.h's attention_row, computing
// its block dots key by key (the CPU computes the same values a strip at a time).
#pragma once

#include <cstdint>

#include "attention_launch.h"
#include "bct/attention_math.h"
#include "bct/block_math.h"
#include "block_threads.h"

namespace bct {
namespace cuda {

// Thread r of the K-codes kernel: key row r's stored codes (symmetric, the op's blocks) as signed
// codes kq [r, dh] and float32 scales ks [r, nb].
BCT_HD BCT_INLINE void AttentionKeyCodesOne(const AttentionArgs& a, int64_t r, int8_t* kq, float* ks) {
  const int64_t nb = a.kv_fmt.num_blocks;
  nl::signed_codes_of_row(a.k_codes + r * a.kv_fmt.row_bytes, a.dh, a.kv_fmt.bits, a.kv_fmt.row_bytes,
                          static_cast<ScaleKind>(a.kv_fmt.scale_kind), a.k_scales, r * nb, nb, kq + r * a.dh,
                          ks + r * nb);
}

// Thread t of a dequantize kernel over K or V codes: element t of [rows, dh].
BCT_HD BCT_INLINE float AttentionDequantizeOne(const AttentionArgs& a, const uint8_t* codes, const void* scales,
                                               const uint8_t* zero_points, int64_t t) {
  const int64_t row = t / a.dh;
  return DequantizeOne(a.kv_fmt, codes, scales, zero_points, row, t - row * a.dh);
}

// Thread `row` of the attention kernel: query row `row` of [batch, q_heads, sq] (signed codes qq,
// scales qs, in Q's storage order) over its KV head's keys (kq, ks) and values (in K's and V's order:
// [batch * kv_heads, sk, dh], or [batch, sk, kv_heads, dh] when a.packed); tile: scratch of
// nl::kAttentionKeyTile floats. Writes a.y's row.
BCT_HD BCT_INLINE void AttentionRowOne(const AttentionArgs& a, const int8_t* qq, const float* qs, const int8_t* kq,
                                       const float* ks, const float* values, int64_t row, float* tile) {
  const int64_t nb = num_blocks(a.dh, a.block_size);
  const int64_t i = row % a.sq;
  const int64_t head_index = row / a.sq;
  const int64_t b = head_index / a.q_heads, h = head_index % a.q_heads;
  const int64_t kv_h = h / (a.q_heads / a.kv_heads);
  const int64_t key0 = nl::attention_row_index(a.packed, a.kv_heads, a.sk, b, kv_h, 0);
  const int64_t stored = nl::attention_row_index(a.packed, a.q_heads, a.sq, b, h, i);  // Q's and Y's row
  nl::AttentionKeys kv;
  kv.codes = kq + key0 * a.dh;
  kv.scales = ks + key0 * nb;
  kv.values = values + key0 * a.dh;
  kv.dh = a.dh;
  kv.nb = nb;
  kv.block_size = a.block_size;
  kv.key_step = a.packed ? a.kv_heads : 1;
  kv.value_step = kv.key_step;
  const float* mask = a.mask != nullptr
                          ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] + i * a.mask_strides[2]
                          : nullptr;
  nl::attention_row(qq + stored * a.dh, qs + stored * nb, kv, nullptr, nl::attention_visible_keys(i, a.sq, a.sk, a.causal),
                    a.scale, mask, a.mask_strides[3], tile, a.y + stored * a.dh);
}

// Whether a.packed Q, K or V rows lie further apart than their heads (parts of one packed projection).
BCT_HD BCT_INLINE bool AttentionStrided(const AttentionArgs& a) {
  return a.packed && ((a.q_stride != 0 && a.q_stride != a.q_heads) || (a.k_stride != 0 && a.k_stride != a.kv_heads) ||
                      (a.v_stride != 0 && a.v_stride != a.kv_heads));
}

// Thread t of the unpack kernel (AttentionStrided): element t of Q [B, Sq, Hq * Dh], then of K, then of
// V [B, Sk, Hkv * Dh], each without gaps, into out (the three one after the other).
BCT_HD BCT_INLINE void AttentionUnpackOne(const AttentionArgs& a, int64_t t, float* out) {
  const int64_t q_n = a.batch * a.sq * a.q_heads * a.dh, kv_n = a.batch * a.sk * a.kv_heads * a.dh;
  const float* src = a.q;
  int64_t heads = a.q_heads, stride = a.q_stride, e = t;
  if (t >= q_n + kv_n) {
    src = a.v, heads = a.kv_heads, stride = a.v_stride, e = t - q_n - kv_n;
  } else if (t >= q_n) {
    src = a.k, heads = a.kv_heads, stride = a.k_stride, e = t - q_n;
  }
  const int64_t width = heads * a.dh, position = e / width;
  out[t] = src[position * (stride != 0 ? stride : heads) * a.dh + e % width];
}

// ---------------------------------------------------------------------------------------------
// The decoder step's kernels (cuda/attention.cu LaunchAttentionStep), one thread each.

// Thread r of the Q kernel: Q row r of [B, Hq, Sq] with rotary, into q_out [r, dh].
BCT_HD BCT_INLINE void AttentionStepQRowOne(const AttentionStepArgs& s, int64_t r, float* q_out) {
  nl::step_input_row(s.dims, s.q, s.dims.q_heads, r, true, s.cos, s.sin, q_out + r * s.dims.dh);
}

// Thread t of the new-rows kernel (n = B * Hkv * Sq rows each of K and V): t < n is K row t with
// rotary, else V row t - n; into fresh [2n, dh].
BCT_HD BCT_INLINE void AttentionStepNewRowOne(const AttentionStepArgs& s, int64_t t, float* fresh) {
  const int64_t n = s.dims.batch * s.dims.kv_heads * s.dims.sq;
  const bool key = t < n;
  nl::step_input_row(s.dims, key ? s.k_new : s.v_new, s.dims.kv_heads, key ? t : t - n, key, s.cos, s.sin,
                     fresh + t * s.dims.dh);
}

// Thread t of the present kernel (rows = B * Hkv * (past + Sq) each of K and V): present row t of K
// (t < rows) or V: the past row copied, or the new row from fresh appended (quantized with codes).
BCT_HD BCT_INLINE void AttentionStepPresentRowOne(const AttentionStepArgs& s, int64_t t, const float* fresh) {
  const nl::AttentionStepDims& d = s.dims;
  const int64_t total = d.past + d.sq, rows = d.batch * d.kv_heads * total;
  const bool key = t < rows;
  const int64_t row = key ? t : t - rows;
  const int64_t bh = row / total, j = row % total;
  const int64_t row_nbytes = s.codes ? s.row_bytes : d.dh * static_cast<int64_t>(sizeof(float));
  const auto* past = static_cast<const uint8_t*>(key ? s.past_k : s.past_v);
  auto* present = static_cast<uint8_t*>(key ? s.present_k : s.present_v);
  const ScaleKind kind = static_cast<ScaleKind>(s.scale_kind);
  const int64_t scale_nbytes = s.codes ? s.num_blocks * static_cast<int64_t>(ScaleItemSize(kind)) : 0;
  if (j < d.past) {
    const int64_t from = bh * d.past + j;
    for (int64_t b = 0; b < row_nbytes; ++b) present[row * row_nbytes + b] = past[from * row_nbytes + b];
    if (s.codes) {
      const auto* past_scales = static_cast<const uint8_t*>(key ? s.past_k_scales : s.past_v_scales);
      auto* present_scales = static_cast<uint8_t*>(key ? s.present_k_scales : s.present_v_scales);
      for (int64_t b = 0; b < scale_nbytes; ++b) present_scales[row * scale_nbytes + b] = past_scales[from * scale_nbytes + b];
    }
    return;
  }
  const int64_t n = d.batch * d.kv_heads * d.sq;
  const float* x = fresh + ((key ? 0 : n) + bh * d.sq + (j - d.past)) * d.dh;
  if (s.codes) {
    nl::quantize_cache_row(x, d.dh, s.bits, s.kv_block_size, kind, s.row_bytes, present + row * s.row_bytes,
                           key ? s.present_k_scales : s.present_v_scales, row * s.num_blocks);
  } else {
    float* out = reinterpret_cast<float*>(present) + row * d.dh;
    for (int64_t e = 0; e < d.dh; ++e) out[e] = x[e];
  }
}

// Thread r of the packed-Y kernel: row r of y_heads [B, Hq, Sq, Dh] into y [B, Sq, Hq * Dh].
BCT_HD BCT_INLINE void AttentionStepYRowOne(const AttentionStepArgs& s, int64_t r, const float* y_heads, float* y) {
  const nl::AttentionStepDims& d = s.dims;
  const int64_t i = r % d.sq, bh = r / d.sq;
  float* out = y + nl::step_row_offset(d, d.q_heads, bh / d.q_heads, bh % d.q_heads, i);
  for (int64_t e = 0; e < d.dh; ++e) out[e] = y_heads[r * d.dh + e];
}

}  // namespace cuda
}  // namespace bct
