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
// scales qs) over its KV head's keys (kq, ks) and values [batch * kv_heads, sk, dh]; tile: scratch of
// nl::kAttentionKeyTile floats. Writes a.y's row.
BCT_HD BCT_INLINE void AttentionRowOne(const AttentionArgs& a, const int8_t* qq, const float* qs, const int8_t* kq,
                                       const float* ks, const float* values, int64_t row, float* tile) {
  const int64_t nb = num_blocks(a.dh, a.block_size);
  const int64_t i = row % a.sq;
  const int64_t head_index = row / a.sq;
  const int64_t b = head_index / a.q_heads, h = head_index % a.q_heads;
  const int64_t kv_head = b * a.kv_heads + h / (a.q_heads / a.kv_heads);
  nl::AttentionKeys kv;
  kv.codes = kq + kv_head * a.sk * a.dh;
  kv.scales = ks + kv_head * a.sk * nb;
  kv.values = values + kv_head * a.sk * a.dh;
  kv.dh = a.dh;
  kv.nb = nb;
  kv.block_size = a.block_size;
  const float* mask = a.mask != nullptr
                          ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] + i * a.mask_strides[2]
                          : nullptr;
  nl::attention_row(qq + row * a.dh, qs + row * nb, kv, nullptr, nl::attention_visible_keys(i, a.sq, a.sk, a.causal),
                    a.scale, mask, a.mask_strides[3], tile, a.y + row * a.dh);
}

}  // namespace cuda
}  // namespace bct
