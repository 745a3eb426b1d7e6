// Helpers of the AVX-512 row functions (cpu/nonlinear_avx512.cc, cpu/norm_avx512.cc) and BlockAttention's
// AVX-512 rows (cpu/attention_avx512.cc): tail masks and nl::exp_f32 in registers. Include it after the
// file's `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")`: every function here is AVX-512 code.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "bct/nonlinear_math.h"

namespace bct {
namespace cpu {
namespace avx512_math {

// The lanes of a vector of 16 that hold elements when `left` elements remain (all from 16 on).
inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp_f32's arithmetic on R vectors of arguments xk already clamped to [kExpLo, kExpHi]: y and k, an
// integer in [-126, 127] as float, whose product y * 2**k (vscalefps: the same correctly rounded
// product as a multiply by 2**k) is exp_f32 before its final selects. Each step is applied to all R
// vectors before the next, so R independent dependency chains are in flight (the polynomial is one
// long chain).
template <int R>
inline void ExpOfClampedR(const __m512* xk, __m512* y, __m512* k) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  __m512 r[R], z[R], p[R];
  for (int i = 0; i < R; ++i) {
    k[i] = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xk[i], _mm512_set1_ps(nl::kLog2e)), magic), magic);
  }
  for (int i = 0; i < R; ++i) {
    r[i] = _mm512_sub_ps(_mm512_sub_ps(xk[i], _mm512_mul_ps(k[i], _mm512_set1_ps(nl::kLn2Hi))),
                         _mm512_mul_ps(k[i], _mm512_set1_ps(nl::kLn2Lo)));
    z[i] = _mm512_mul_ps(r[i], r[i]);
    p[i] = _mm512_set1_ps(nl::kExpP0);
  }
  const float coefficients[5] = {nl::kExpP1, nl::kExpP2, nl::kExpP3, nl::kExpP4, nl::kExpP5};
  for (int c = 0; c < 5; ++c) {
    const __m512 coefficient = _mm512_set1_ps(coefficients[c]);
    for (int i = 0; i < R; ++i) p[i] = _mm512_add_ps(_mm512_mul_ps(p[i], r[i]), coefficient);
  }
  for (int i = 0; i < R; ++i) {
    y[i] = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p[i], z[i]), r[i]), _mm512_set1_ps(1.0f));
  }
}

// nl::exp_f32 on R vectors of 16 lanes, in place. The clamps are min / max (a NaN lane's intermediate
// values do not matter: it returns x).
template <int R>
inline void ExpR(__m512* x) {
  const __m512 hi = _mm512_set1_ps(nl::kExpHi);
  const __m512 lo = _mm512_set1_ps(nl::kExpLo);
  __m512 xk[R], y[R], k[R];
  for (int i = 0; i < R; ++i) xk[i] = _mm512_max_ps(_mm512_min_ps(x[i], hi), lo);  // x > hi ? hi : x, then >= lo
  ExpOfClampedR<R>(xk, y, k);
  for (int i = 0; i < R; ++i) {
    const __m512 out = _mm512_scalef_ps(y[i], k[i]);
    const __m512 clamped = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x[i], lo, _CMP_NLT_UQ), out);  // x < lo: 0
    x[i] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x[i], x[i], _CMP_UNORD_Q), clamped, x[i]);
  }
}

}  // namespace avx512_math
}  // namespace cpu
}  // namespace bct
