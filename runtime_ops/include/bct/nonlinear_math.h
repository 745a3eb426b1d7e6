// The float32 arithmetic of the compressed nonlinear ops (BlockGelu, BlockSilu, BlockSoftmax,
// BlockLayerNorm, BlockRMSNorm) and of BlockActMatMul, once, for host (C++17) and device (CUDA) code.
//
// bct_onnx/reference_nonlinear.py is the specification; every function here reproduces its numpy
// counterpart bit for bit. To make that possible the transcendental functions are not taken from
// libm or CUDA's math library (which differ from each other and from numpy in the last ulp) but
// evaluated here from fixed polynomials in float32 with every operation rounded on its own
// (bct::fmul/fadd/... from block_math.h: no fused multiply-add, no reassociation):
//
//   exp_f32   Cephes expf: k = rne(x log2 e), r = x - k ln2 (two-part), degree-5 polynomial,
//             times 2**k built from bits. <= 1 ulp from the true exp on [-87, 88]; 0 below -87.
//   erf_f32   |x| clamped to 4, then a ratio of polynomials in x^2 (no exp, no cancellation near 0),
//             at most 1: |error| <= 4e-7 absolute.
//   tanh_f32  1 - 2 / (exp_f32(2x) + 1): |error| <= 1.8e-7 absolute.
//
// Sums over a row use kLanes interleaved float32 accumulators (lane j sums elements i = j mod 8 in
// order), combined pairwise at the end: ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). That order is what the
// numpy spec computes and what a compiler vectorises without reassociating.
#pragma once

#include <cstdint>

#include "bct/block_math.h"

#include <cmath>

namespace bct {
namespace nl {

// Correctly rounded float32 square root on host and device.
BCT_HD BCT_INLINE float fsqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

constexpr int kLanes = 8;

// exp_f32 constants (Cephes expf).
constexpr float kExpHi = 88.0f;
constexpr float kExpLo = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// erf_f32 constants: erf(a) = a * P(a^2) / Q(a^2) on [0, kErfClamp] (a least-squares fit to erf there),
// 1 beyond (erf(4) = 1 - 1.5e-8 rounds to 1): P(z) = N0 + N1 z + ... + N6 z^6, Q(z) = 1 + D1 z + ... + D4 z^4.
constexpr float kErfClamp = 4.0f;
constexpr float kErfN6 = 1.9168949e-08f, kErfN5 = -1.9704373e-06f, kErfN4 = 0.0001521507f, kErfN3 = 0.0041687866f,
                kErfN2 = 0.05205821f, kErfN1 = 0.21114579f, kErfN0 = 1.1283789f;
constexpr float kErfD4 = 0.0010664745f, kErfD3 = 0.01530672f, kErfD2 = 0.11963671f, kErfD1 = 0.52045214f;

// GELU constants.
constexpr float kInvSqrt2 = 0.707106781186547524f;    // 1 / sqrt(2)
constexpr float kSqrt2OverPi = 0.797884560802865356f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

enum class GeluForm : int { kErf = 0, kTanh = 1 };

// SiLU: below this x the result is -0 (|x sigmoid(x)| < 5.4e-37 there; exp_f32(-x) would clamp at 88).
constexpr float kSiluLo = -88.0f;

BCT_HD BCT_INLINE float exp_f32(float x) {
  // Clamp for the arithmetic (NaN -> kExpLo there; the NaN itself is returned at the end). Plain
  // selects, no short-circuit logic, so that compilers vectorise the loops calling this.
  float xk = x > kExpHi ? kExpHi : x;
  xk = xk >= kExpLo ? xk : kExpLo;
  const float k = round_half_even(fmul(xk, kLog2e));  // in [-126, 127]
  const float r = fsub(fsub(xk, fmul(k, kLn2Hi)), fmul(k, kLn2Lo));
  const float z = fmul(r, r);
  float p = kExpP0;
  p = fadd(fmul(p, r), kExpP1);
  p = fadd(fmul(p, r), kExpP2);
  p = fadd(fmul(p, r), kExpP3);
  p = fadd(fmul(p, r), kExpP4);
  p = fadd(fmul(p, r), kExpP5);
  const float y = fadd(fadd(fmul(p, z), r), 1.0f);
  const float two_k = float_from_bits(static_cast<uint32_t>(static_cast<int>(k) + 127) << 23);
  const float out = fmul(y, two_k);
  const float clamped = x < kExpLo ? 0.0f : out;
  return is_nan(x) ? x : clamped;
}

BCT_HD BCT_INLINE float erf_f32(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float a = ax > kErfClamp ? kErfClamp : ax;  // a NaN stays NaN
  const float z = fmul(a, a);
  float num = kErfN6;
  num = fadd(fmul(num, z), kErfN5);
  num = fadd(fmul(num, z), kErfN4);
  num = fadd(fmul(num, z), kErfN3);
  num = fadd(fmul(num, z), kErfN2);
  num = fadd(fmul(num, z), kErfN1);
  num = fadd(fmul(num, z), kErfN0);
  float den = kErfD4;
  den = fadd(fmul(den, z), kErfD3);
  den = fadd(fmul(den, z), kErfD2);
  den = fadd(fmul(den, z), kErfD1);
  den = fadd(fmul(den, z), 1.0f);
  const float r = fdiv(fmul(a, num), den);
  const float v = r > 1.0f ? 1.0f : r;
  return x < 0.0f ? -v : v;
}

BCT_HD BCT_INLINE float tanh_f32(float x) {
  const float e = exp_f32(fmul(2.0f, x));
  return fsub(1.0f, fdiv(2.0f, fadd(e, 1.0f)));
}

// GELU, exact form: 0.5 x (1 + erf(x / sqrt 2)), evaluated as (0.5 x) * (1 + erf(x * (1/sqrt 2))).
BCT_HD BCT_INLINE float gelu_erf(float x) {
  return fmul(fmul(0.5f, x), fadd(1.0f, erf_f32(fmul(x, kInvSqrt2))));
}

// GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x^3 as (x * x) * x.
BCT_HD BCT_INLINE float gelu_tanh(float x) {
  const float x3 = fmul(fmul(x, x), x);
  const float inner = fmul(kSqrt2OverPi, fadd(x, fmul(kGeluCubic, x3)));
  return fmul(fmul(0.5f, x), fadd(1.0f, tanh_f32(inner)));
}

// SiLU (swish, Llama's MLP activation): x * sigmoid(x) = x / (1 + exp(-x)), evaluated as
// x / (1 + exp_f32(-x)); -0 below kSiluLo (also for -inf, whose limit is 0); NaN stays NaN.
BCT_HD BCT_INLINE float silu(float x) {
  const float y = fdiv(x, fadd(1.0f, exp_f32(-x)));
  return x < kSiluLo ? -0.0f : y;
}

BCT_HD BCT_INLINE float gelu(float x, GeluForm form) { return form == GeluForm::kTanh ? gelu_tanh(x) : gelu_erf(x); }

BCT_HD BCT_INLINE float combine_lanes(const float* acc) {
  return fadd(fadd(fadd(acc[0], acc[1]), fadd(acc[2], acc[3])), fadd(fadd(acc[4], acc[5]), fadd(acc[6], acc[7])));
}

// sum_i v[i] in the lane order described at the top.
BCT_HD BCT_INLINE float lane_sum(const float* v, int64_t n) {
  float acc[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] = fadd(acc[j], v[i + j]);
  }
  for (int j = 0; i + j < n; ++j) acc[j] = fadd(acc[j], v[i + j]);
  return combine_lanes(acc);
}

// sum_i (v[i] - c)^2 in lane order.
BCT_HD BCT_INLINE float lane_sum_sq(const float* v, int64_t n, float c) {
  float acc[kLanes] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = fsub(v[i + j], c);
      acc[j] = fadd(acc[j], fmul(d, d));
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const float d = fsub(v[i + j], c);
    acc[j] = fadd(acc[j], fmul(d, d));
  }
  return combine_lanes(acc);
}

// ---------------------------------------------------------------------------------------------
// Row functions: y[0..n) holds the op's input row (float32) and receives its output row.

BCT_HD BCT_INLINE void gelu_row(float* y, int64_t n, GeluForm form) {
  if (form == GeluForm::kTanh) {
    for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh(y[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf(y[i]);
  }
}

BCT_HD BCT_INLINE void silu_row(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = silu(y[i]);
}

// Softmax: m = max(y) (NaNs ignored; all -inf or NaN gives m = -inf), e = exp_f32(y - m),
// y = e * (1 / lane_sum(e)).
// Max of y[0..n), NaNs ignored, -inf when there is nothing else. Computed on integer keys that order
// like the floats (sign-magnitude bits -> two's complement), which vectorises where a float max
// reduction does not; equal to the sequential float max except possibly in the sign of a zero
// maximum, which no caller can observe (x - (+0) and x - (-0) only differ for x = -0, and exp of
// either zero is 1).
BCT_HD BCT_INLINE float row_max(const float* y, int64_t n) {
  const int32_t minus_inf_key = static_cast<int32_t>(0xff800000u ^ 0x7fffffffu);
  int32_t best = minus_inf_key;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_bits(y[i]);
    const int32_t key = static_cast<int32_t>(u ^ ((0u - (u >> 31)) & 0x7fffffffu));
    const int32_t k = (u & 0x7fffffffu) > 0x7f800000u ? minus_inf_key : key;  // NaN -> -inf
    best = k > best ? k : best;
  }
  const uint32_t b = static_cast<uint32_t>(best);
  return float_from_bits(b ^ ((0u - (b >> 31)) & 0x7fffffffu));
}

BCT_HD BCT_INLINE void softmax_row(float* y, int64_t n) {
  const float m = row_max(y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = exp_f32(fsub(y[i], m));
  const float inv = fdiv(1.0f, lane_sum(y, n));  // multiply by 1/sum: a divide per element is ~10x slower
  for (int64_t i = 0; i < n; ++i) y[i] = fmul(y[i], inv);
}

// LayerNorm over the row: mean = sum / n; var = sum((y - mean)^2) / n (two passes);
// inv = 1 / sqrt(var + eps); y = ((y - mean) * inv) * scale + bias (bias may be nullptr: 0).
BCT_HD BCT_INLINE void layer_norm_row(float* y, int64_t n, const float* scale, const float* bias, float epsilon) {
  const float count = static_cast<float>(n);
  const float mean = fdiv(lane_sum(y, n), count);
  const float var = fdiv(lane_sum_sq(y, n, mean), count);
  const float inv = fdiv(1.0f, fsqrt(fadd(var, epsilon)));
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) y[i] = fadd(fmul(fmul(fsub(y[i], mean), inv), scale[i]), bias[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = fmul(fmul(fsub(y[i], mean), inv), scale[i]);
  }
}

// RMSNorm (Llama): ms = sum(y^2) / n; inv = 1 / sqrt(ms + eps); y = (y * inv) * scale.
BCT_HD BCT_INLINE void rms_norm_row(float* y, int64_t n, const float* scale, float epsilon) {
  const float ms = fdiv(lane_sum_sq(y, n, 0.0f), static_cast<float>(n));
  const float inv = fdiv(1.0f, fsqrt(fadd(ms, epsilon)));
  for (int64_t i = 0; i < n; ++i) y[i] = fmul(fmul(y[i], inv), scale[i]);
}

// ---------------------------------------------------------------------------------------------
// BlockActMatMul: symmetric run-time quantization of one row of K values along K, float32 scales,
// exactly block_format.quantize_codes(x, BlockFormat(bits, block_size, True, "float32")), stored as
// signed codes q = u - 2**(bits-1) in int8.

BCT_HD BCT_INLINE void quantize_act_row(const float* x, int64_t k, int bits, int64_t block_size, int8_t* q,
                                        float* scales) {
  const int zp = 1 << (bits - 1);
  for (int64_t b0 = 0, blk = 0; b0 < k; b0 += block_size, ++blk) {
    const int64_t len = (k - b0) < block_size ? (k - b0) : block_size;
    const StoredScale s = choose_symmetric_scale(x + b0, len, bits, ScaleKind::kFloat32);
    scales[blk] = act_scale(s.value);
    const float inv = inverse_scale(s.value);
    for (int64_t i = 0; i < len; ++i) {
      q[b0 + i] = static_cast<int8_t>(static_cast<int>(code_of(x[b0 + i], inv, bits, true, 0)) - zp);
    }
  }
}

// The int8 block dot: signed codes a [n] x codes b [n] (int8, or uint8 weight codes), exact in
// int32 while n * max|a| * max|b| < 2**31.
template <class Code>
BCT_HD BCT_INLINE int32_t dot_i8(const int8_t* a, const Code* b, int64_t n) {
  int32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return acc;
}

// One output element: acc = 0; for each block in order, acc += float(dot) * (sa * sb).
BCT_HD BCT_INLINE float act_dot(const int8_t* a, const float* a_scales, const int8_t* b, const float* b_scales,
                                int64_t k, int64_t block_size) {
  float acc = 0.0f;
  for (int64_t b0 = 0, blk = 0; b0 < k; b0 += block_size, ++blk) {
    const int64_t len = (k - b0) < block_size ? (k - b0) : block_size;
    const int32_t dot = dot_i8(a + b0, b + b0, len);
    acc = fadd(acc, fmul(static_cast<float>(dot), fmul(a_scales[blk], b_scales[blk])));
  }
  return acc;
}

}  // namespace nl
}  // namespace bct
