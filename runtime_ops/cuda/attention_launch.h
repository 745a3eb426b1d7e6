// Plain C++ launcher of BlockAttention's CUDA kernels (cuda/attention.cu); all the host side
// (cuda/attention_op_cuda.cc, compiled with the ORT headers) sees of them. Pointers are device
// pointers; stream is a cudaStream_t; returns nullptr on success or the first CUDA error string.
#pragma once

#include <cstdint>

#include "bct/attention_math.h"
#include "block_launch.h"

namespace bct {
namespace cuda {

// Q [batch, q_heads, sq, dh] float32; K, V [batch, kv_heads, sk, dh] float32 or codes in kv_fmt (axis
// dh); k_direct: K's codes are symmetric in the op's blocks and are used as they are; mask nullptr or
// read at mask[b * s0 + h * s1 + i * s2 + j * s3]; y [batch, q_heads, sq, dh]. packed: Q, float K,
// V and y are [batch, s, heads * dh] instead (an encoder's head split / merge in the op); then Q, K and
// V rows of one position lie q_stride, k_stride, v_stride rows of dh apart (0: their heads; more when
// they are parts of one packed projection).
struct AttentionArgs {
  int act_bits = 8;
  int64_t block_size = 32;
  float scale = 1.0f;
  bool causal = false;
  int64_t batch = 0, q_heads = 0, kv_heads = 0, sq = 0, sk = 0, dh = 0;
  bool packed = false;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0;
  const float* q = nullptr;
  bool kv_quantized = false;
  bool k_direct = false;
  RowFormat kv_fmt{};
  const float* k = nullptr;
  const uint8_t* k_codes = nullptr;
  const void* k_scales = nullptr;
  const uint8_t* k_zero_points = nullptr;
  const float* v = nullptr;
  const uint8_t* v_codes = nullptr;
  const void* v_scales = nullptr;
  const uint8_t* v_zero_points = nullptr;
  const float* mask = nullptr;
  int64_t mask_strides[4] = {0, 0, 0, 0};
  float* y = nullptr;
};

const char* LaunchAttention(const AttentionArgs& args, void* stream);

// The decoder step (BlockAttention with K_new / V_new): Q [B, Hq, Sq, Dh] or [B, Sq, Hq * Dh] before
// rotary, the new rows, cos / sin (nullptr: no rotary), the past cache (float rows, or symmetric codes
// with scales of scale_kind) and the present cache to write ([B, Hkv, past + Sq, *]).
struct AttentionStepArgs {
  nl::AttentionStepDims dims{};
  const float* q = nullptr;
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  bool codes = false;
  int bits = 8;
  int64_t kv_block_size = 32;
  int scale_kind = 0;  // bct::ScaleKind as int
  int64_t row_bytes = 0, num_blocks = 0;
  const void* past_k = nullptr;
  const void* past_v = nullptr;
  const void* past_k_scales = nullptr;
  const void* past_v_scales = nullptr;
  void* present_k = nullptr;
  void* present_v = nullptr;
  void* present_k_scales = nullptr;
  void* present_v_scales = nullptr;
};

// a: the attention of LaunchAttention over the present cache (its q, k / v pointers and y are set
// here from s and y); y: the op's output, in s.dims' layout.
const char* LaunchAttentionStep(AttentionArgs a, const AttentionStepArgs& s, float* y, void* stream);

}  // namespace cuda
}  // namespace bct
