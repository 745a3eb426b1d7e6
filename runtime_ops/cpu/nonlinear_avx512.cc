// AVX-512 row functions of BlockSoftmax and BlockGelu (exact form): the float32 operations of
// bct/nonlinear_math.h (exp_f32, erf_f32, gelu_erf, row_max, lane_sum), 16 lanes at a time, each
// operation rounded on its own (no FMA: the library builds with -ffp-contract=off and the code below
// uses separate multiply and add intrinsics), the selects as masked blends with the scalar code's
// NaN behaviour. Same bits as the scalar row functions; tests/runtime_ops/test_nonlinear.py checks
// every path against the numpy spec (BCT_ONNX_ISA forces them).
#include <cstdint>
#include <cstring>

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

using avx512_math::ExpR;
using avx512_math::TailMask;

// nl::gelu_erf on R vectors of 16 lanes, in place: (0.5 x) * (1 + erf_f32(x * (1/sqrt 2))), erf_f32 as
// nl::erf_f32 computes it: a = min(|u|, 4), a * P(a^2) / Q(a^2), at most 1, negated where u < 0.
// min(c, v) returns v when v is NaN, so a NaN lane stays NaN through every step, as in the scalar code.
template <int R>
inline void GeluErfR(__m512* x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const float num_terms[6] = {nl::kErfN5, nl::kErfN4, nl::kErfN3, nl::kErfN2, nl::kErfN1, nl::kErfN0};
  const float den_terms[4] = {nl::kErfD3, nl::kErfD2, nl::kErfD1, 1.0f};
  __mmask16 negative[R];
  __m512 a[R], z[R], num[R], den[R];
  for (int i = 0; i < R; ++i) {
    const __m512 u = _mm512_mul_ps(x[i], _mm512_set1_ps(nl::kInvSqrt2));
    negative[i] = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
    a[i] = _mm512_min_ps(_mm512_set1_ps(nl::kErfClamp), _mm512_andnot_ps(sign_mask, u));
    z[i] = _mm512_mul_ps(a[i], a[i]);
    num[i] = _mm512_set1_ps(nl::kErfN6);
    den[i] = _mm512_set1_ps(nl::kErfD4);
  }
  for (int c = 0; c < 6; ++c) {
    const __m512 coefficient = _mm512_set1_ps(num_terms[c]);
    for (int i = 0; i < R; ++i) num[i] = _mm512_add_ps(_mm512_mul_ps(num[i], z[i]), coefficient);
    if (c < 4) {
      const __m512 d = _mm512_set1_ps(den_terms[c]);
      for (int i = 0; i < R; ++i) den[i] = _mm512_add_ps(_mm512_mul_ps(den[i], z[i]), d);
    }
  }
  for (int i = 0; i < R; ++i) {
    const __m512 v = _mm512_min_ps(one, _mm512_div_ps(_mm512_mul_ps(a[i], num[i]), den[i]));
    const __m512 erf = _mm512_mask_blend_ps(negative[i], v, _mm512_xor_ps(v, sign_mask));  // u < 0 ? -v : v
    x[i] = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x[i]), _mm512_add_ps(one, erf));
  }
}

void GeluErfRowAvx512(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_ps(y + i + 16 * j);
    GeluErfR<4>(v);
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + i + 16 * j, v[j]);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(mask, y + i);
    GeluErfR<1>(&v);
    _mm512_mask_storeu_ps(y + i, mask, v);
  }
}

// nl::softmax_row on R rows of n at once (y rows n apart): m = row_max (integer keys, NaN ignored),
// e = exp_f32(y - m), y = e * (1 / lane_sum(e)). The rows are independent; interleaving them hides
// the latency of each row's chain of reductions (max, exp, sum, divide).
template <int R>
void SoftmaxRowsT(float* y, int64_t n) {
  const __m512i minus_inf_key = _mm512_set1_epi32(static_cast<int32_t>(0xff800000u ^ 0x7fffffffu));
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512 vm[R];
  for (int r = 0; r < R; ++r) {
    __m512i best = minus_inf_key;
    const float* row = y + r * n;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mask = TailMask(n - i);
      const __m512i u = _mm512_maskz_loadu_epi32(mask, row + i);
      // key = u ^ (sign ? 0x7fffffff : 0); NaN (magnitude > inf) is left out (-inf)
      const __m512i key = _mm512_xor_si512(u, _mm512_and_si512(_mm512_srai_epi32(u, 31), magnitude));
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, magnitude), _mm512_set1_epi32(0x7f800000));
      best = _mm512_mask_max_epi32(best, static_cast<__mmask16>(mask & ~nan), best, key);
    }
    const uint32_t b = static_cast<uint32_t>(_mm512_reduce_max_epi32(best));
    vm[r] = _mm512_set1_ps(float_from_bits(b ^ ((0u - (b >> 31)) & 0x7fffffffu)));
  }
  // exp and the lane sums: lane j of an 8-wide accumulator adds elements j, j + 8, ... in order.
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    __m512 e[R];
    for (int r = 0; r < R; ++r) e[r] = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, y + r * n + i), vm[r]);
    ExpR<R>(e);
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(y + r * n + i, mask, e[r]);
      acc[r] = _mm256_mask_add_ps(acc[r], static_cast<__mmask8>(mask & 0xff), acc[r], _mm512_castps512_ps256(e[r]));
      acc[r] = _mm256_mask_add_ps(acc[r], static_cast<__mmask8>(mask >> 8), acc[r], _mm512_extractf32x8_ps(e[r], 1));
    }
  }
  __m512 inv[R];
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[nl::kLanes];
    _mm256_store_ps(lanes, acc[r]);
    inv[r] = _mm512_set1_ps(fdiv(1.0f, nl::combine_lanes(lanes)));
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    for (int r = 0; r < R; ++r) {
      float* row = y + r * n;
      _mm512_mask_storeu_ps(row + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + i), inv[r]));
    }
  }
}

}  // namespace

void SoftmaxRowsAvx512(float* y, int64_t rows, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) SoftmaxRowsT<4>(y + r * n, n);
  for (; r < rows; ++r) SoftmaxRowsT<1>(y + r * n, n);
}

// The exact form explicitly; the tanh form as the portable code compiled for AVX-512.
void GeluRowAvx512(float* y, int64_t n, nl::GeluForm form) {
  if (form == nl::GeluForm::kErf) {
    GeluErfRowAvx512(y, n);
  } else {
    avx512::GeluRow(y, n, form);
  }
}

}  // namespace cpu
}  // namespace bct

#endif  // BCT_X86_SIMD

