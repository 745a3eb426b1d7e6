// BlockMatMul AVX2 + FMA kernels (compiled for the target here, chosen at run time): the 256-bit
// kernels of matmul_kernel_avx2_impl.h without VNNI, and the activation quantizer that the AVX2 and
// AVX-VNNI paths share.
// Standard headers come before the target pragma, so that no standard-library code is compiled
// (and possibly shared with other files) for the target.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "matmul_kernel.h"
#if BCT_MATMUL_X86

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

#define BCT_MATMUL_AVX_VNNI 0
#include "matmul_kernel_avx2_impl.h"

namespace bct {
namespace matmul {
namespace detail {
namespace {

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// First element of largest magnitude, as np.argmax(np.abs(x)) picks it.
inline float FirstMaxAbs(const float* x, int64_t len) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float amax = HorizontalMax(vmax);
  for (; k < len; ++k) amax = std::max(amax, std::fabs(x[k]));
  for (k = 0; k < len; ++k) {
    if (std::fabs(x[k]) == amax) return x[k];
  }
  return 0.f;
}

}  // namespace

void QuantizeRowsAvx2(const PackedWeights& p, const float* A, int64_t row_begin, int64_t row_end, ActRows* out) {
  const Shape& s = p.shape;
  const int64_t K = s.K, nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  const int qmax = (1 << (s.act_bits - 1)) - 1, qmin = -(1 << (s.act_bits - 1));
  const float divisor = static_cast<float>(qmin);
  const int32_t zw = static_cast<int32_t>(p.implicit_zero_point);
  const __m256i vmin = _mm256_set1_epi32(qmin), vmax = _mm256_set1_epi32(qmax);
  for (int64_t m = row_begin; m < row_end; ++m) {
    const float* a = A + m * K;
    int8_t* codes = out->codes.data() + m * kp;
    std::memset(codes, 0, static_cast<size_t>(kp));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * s.block_size, len = std::min<int64_t>(s.block_size, K - k0);
      const float scale = FirstMaxAbs(a + k0, len) / divisor;
      const float inv = scale == 0.f ? 0.f : 1.0f / scale;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i vsum = _mm256_setzero_si256();
      int8_t* dst = codes + b * bkp;
      int64_t k = 0;
      for (; k + 8 <= len; k += 8) {
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + k0 + k), vinv);
        __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        q = _mm256_max_epi32(_mm256_min_epi32(q, vmax), vmin);
        vsum = _mm256_add_epi32(vsum, q);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        const __m128i q8 = _mm_packs_epi16(q16, q16);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + k), q8);
      }
      int32_t sum = HorizontalSum(vsum);
      for (; k < len; ++k) {
        float q = std::nearbyint(a[k0 + k] * inv);
        q = std::min(std::max(q, static_cast<float>(qmin)), static_cast<float>(qmax));
        dst[k] = static_cast<int8_t>(q);
        sum += static_cast<int32_t>(q);
      }
      out->scales[m * nb + b] = scale;
      out->corr[m * nb + b] = -zw * sum;
      out->sums[m * nb + b] = static_cast<float>(sum);
    }
  }
}

void TilesAvx2(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
               int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  Tiles256(p, act, a_padded, row_begin, row_end, tile_begin, tile_end, bias, Y);
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_MATMUL_X86
