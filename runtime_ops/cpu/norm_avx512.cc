// AVX-512 rows of BlockLayerNorm / BlockRMSNorm and the Add + norm ops: nl::layer_norm_row and
// nl::rms_norm_row (bct/nonlinear_math.h) on four rows at a time. A row's lane sums are one chain of
// dependent adds per lane (lane j adds elements j, j + 8, ... in order, as the spec sums), so one row
// waits on add latency; four rows' chains interleaved keep the adder busy. Same float32 operations
// in the same order per row: the same bits (tests/runtime_ops/test_nonlinear.py, test_add_norm.py).
#include <cstdint>

#include <immintrin.h>

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

using avx512_math::TailMask;

// Loops over the rows of a group, unrolled so that their arrays of vectors stay in registers.
#define BCT_UNROLL _Pragma("GCC unroll 4")

constexpr int kRows = 4;

// acc (8 lanes) += the 16 values of v that mask selects, the low 8 first: lane j takes elements j
// and j + 8 of the vector, in that order.
inline __m256 AddLanes(__m256 acc, __mmask16 mask, __m512 v) {
  acc = _mm256_mask_add_ps(acc, static_cast<__mmask8>(mask & 0xff), acc, _mm512_castps512_ps256(v));
  return _mm256_mask_add_ps(acc, static_cast<__mmask8>(mask >> 8), acc, _mm512_extractf32x8_ps(v, 1));
}

inline float CombineLanes(__m256 acc) {
  alignas(32) float lanes[nl::kLanes];
  _mm256_store_ps(lanes, acc);
  return nl::combine_lanes(lanes);
}

// R rows' lane_sum_sq(y, n, c[r]) (with center, else of y itself: rms_norm_row's sum of y^2).
template <int R, bool kCenter>
inline void SumsOfSquares(const float* y, int64_t n, const float* c, float* out) {
  __m256 acc[R];
  __m512 center[R];
  BCT_UNROLL for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    center[r] = _mm512_set1_ps(kCenter ? c[r] : 0.0f);
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    BCT_UNROLL for (int r = 0; r < R; ++r) {
      __m512 d = _mm512_maskz_loadu_ps(mask, y + r * n + i);
      if (kCenter) d = _mm512_sub_ps(d, center[r]);
      acc[r] = AddLanes(acc[r], mask, _mm512_mul_ps(d, d));
    }
  }
  BCT_UNROLL for (int r = 0; r < R; ++r) out[r] = CombineLanes(acc[r]);
}

template <int R>
void LayerNormRowsT(float* y, int64_t n, const float* scale, const float* bias, float epsilon) {
  const float count = static_cast<float>(n);
  __m256 acc[R];
  BCT_UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    BCT_UNROLL for (int r = 0; r < R; ++r) acc[r] = AddLanes(acc[r], mask, _mm512_maskz_loadu_ps(mask, y + r * n + i));
  }
  float mean[R], var[R];
  BCT_UNROLL for (int r = 0; r < R; ++r) mean[r] = fdiv(CombineLanes(acc[r]), count);
  SumsOfSquares<R, true>(y, n, mean, var);
  __m512 vmean[R], vinv[R];
  BCT_UNROLL for (int r = 0; r < R; ++r) {
    vmean[r] = _mm512_set1_ps(mean[r]);
    vinv[r] = _mm512_set1_ps(fdiv(1.0f, nl::fsqrt(fadd(fdiv(var[r], count), epsilon))));
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scale + i);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + i) : _mm512_setzero_ps();
    BCT_UNROLL for (int r = 0; r < R; ++r) {
      float* row = y + r * n + i;
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row), vmean[r]), vinv[r]), s);
      if (bias != nullptr) v = _mm512_add_ps(v, b);
      _mm512_mask_storeu_ps(row, mask, v);
    }
  }
}

template <int R>
void RMSNormRowsT(float* y, int64_t n, const float* scale, float epsilon) {
  float ms[R];
  SumsOfSquares<R, false>(y, n, nullptr, ms);
  __m512 vinv[R];
  BCT_UNROLL for (int r = 0; r < R; ++r) {
    vinv[r] = _mm512_set1_ps(fdiv(1.0f, nl::fsqrt(fadd(fdiv(ms[r], static_cast<float>(n)), epsilon))));
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scale + i);
    BCT_UNROLL for (int r = 0; r < R; ++r) {
      float* row = y + r * n + i;
      _mm512_mask_storeu_ps(row, mask, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row), vinv[r]), s));
    }
  }
}

}  // namespace

void LayerNormRowsAvx512(float* y, int64_t rows, int64_t n, const float* scale, const float* bias, float epsilon) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) LayerNormRowsT<kRows>(y + r * n, n, scale, bias, epsilon);
  switch (rows - r) {
    case 3: LayerNormRowsT<3>(y + r * n, n, scale, bias, epsilon); break;
    case 2: LayerNormRowsT<2>(y + r * n, n, scale, bias, epsilon); break;
    case 1: LayerNormRowsT<1>(y + r * n, n, scale, bias, epsilon); break;
    default: break;
  }
}

void RMSNormRowsAvx512(float* y, int64_t rows, int64_t n, const float* scale, float epsilon) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) RMSNormRowsT<kRows>(y + r * n, n, scale, epsilon);
  switch (rows - r) {
    case 3: RMSNormRowsT<3>(y + r * n, n, scale, epsilon); break;
    case 2: RMSNormRowsT<2>(y + r * n, n, scale, epsilon); break;
    case 1: RMSNormRowsT<1>(y + r * n, n, scale, epsilon); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace bct

#endif  // BCT_X86_SIMD
