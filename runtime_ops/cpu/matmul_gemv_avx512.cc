// BlockMatMul AVX-512 VNNI kernels for few rows (decode, up to kDecodeRows rows, or 3 in float mode),
// compiled for the target here and chosen at run time: the packed codes are streamed once for all
// rows, nibbles unpacked in registers.
// Standard headers come before the target pragma, so that no standard-library code is compiled
// (and possibly shared with other files) for the target.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "matmul_kernel.h"
#if BCT_X86_SIMD

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
// GCC 12 warns about _mm512_undefined_* inside its own reduce intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#include "matmul_tiles_avx512.h"

namespace bct {
namespace matmul {
namespace detail {
namespace {

// Float mode, one row (the weight-only decode GEMV): the codes are read once, so the panel's block
// kFloatPrefetchBlocks ahead is fetched explicitly: 0.61-0.68x CPU time for 4-, 5- and 8-bit weights
// on an Intel Xeon whose other core streamed memory too (session 16). always_inline: without it, this
// compiler's object code had no prefetch from these calls at all.
constexpr int64_t kFloatPrefetchBlocks = 4;
__attribute__((always_inline)) inline void PrefetchPanelBlock(const PackedWeights& p, int64_t tile0, int64_t b) {
  if (b + kFloatPrefetchBlocks >= p.num_blocks) return;
  const char* ahead = reinterpret_cast<const char*>(BlockCodes(p, tile0, b + kFloatPrefetchBlocks));
  for (int64_t c = 0; c < PanelBlockBytes(p, tile0); c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
}

template <int R, int T, bool kNibble, int kZp, int J>
inline void FloatStep(const __m512i (&raw)[T], const __m512 (&ws)[T], const __m512 (&zw)[T], const float* const (&ar)[R],
                      int64_t k, __m512 (&facc)[R][T]) {
  __m512 w[T];
  for (int t = 0; t < T; ++t) {
    __m512 v = _mm512_cvtepi32_ps(Extract<J, kNibble, kZp == kZpSymmetric>(raw[t]));
    if (kZp == kZpInteger) v = _mm512_sub_ps(v, zw[t]);
    w[t] = _mm512_mul_ps(v, ws[t]);  // exactly block_format.dequantize's value
    if (kZp == kZpOffset) w[t] = _mm512_add_ps(w[t], zw[t]);  // u * scale + offset, two roundings
  }
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(ar[r][k + J]);
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_fmadd_ps(w[t], a, facc[r][t]);
  }
}

template <int R, int T, bool kNibble, int kZp, int... J>
inline void FloatGroup(const __m512i (&raw)[T], const __m512 (&ws)[T], const __m512 (&zw)[T], const float* const (&ar)[R],
                       int64_t k, __m512 (&facc)[R][T], std::integer_sequence<int, J...>) {
  (FloatStep<R, T, kNibble, kZp, J>(raw, ws, zw, ar, k, facc), ...);
}

// Float mode: R rows x T tiles; the weight is dequantized in registers and used for R rows.
template <int R, int T, bool kNibble, int kZp>
void FloatTiles(const PackedWeights& p, const float* a_padded, int64_t row0, int64_t tile0, const float* bias,
                float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  constexpr int kGroupK = kNibble ? 8 : 4;
  const int64_t groups = bkp / kGroupK;
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a_padded + (row0 + r) * kp;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 ws[T], zw[T];
    const uint8_t* wb[T];
    for (int t = 0; t < T; ++t) {
      const uint8_t* params = BlockParams(p, tile0 + t, b);
      ws[t] = LoadWeightScales(p, params);
      zw[t] = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, params);
      wb[t] = BlockCodes(p, tile0 + t, b);
    }
    if (R == 1) PrefetchPanelBlock(p, tile0, b);
    for (int64_t g = 0; g < groups; ++g) {
      __m512i raw[T];
      for (int t = 0; t < T; ++t) raw[t] = _mm512_loadu_si512(wb[t] + g * 64);
      FloatGroup<R, T, kNibble, kZp>(raw, ws, zw, ar, b * bkp + g * kGroupK, facc,
                                      std::make_integer_sequence<int, kGroupK>{});
    }
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

// Float mode, few rows, nibble codes: vpermps turns a lane's low 4 bits straight into the code's
// float value (a 16-entry table), so a code costs a shift, a permute and an FMA. Per block the sum
// over k of a * (code - zero_point) is accumulated, then scaled by the block's weight scale.
// Symmetric codes are stored as two's complement nibbles of code - 2**(bits-1) (table -8..7);
// asymmetric codes are unsigned (table 0..15) and zero_point * sum(a) is subtracted per block.
template <int J>
inline __m512i NibbleIndex(__m512i raw) {
  constexpr int kPos = J < 4 ? 8 * J : 8 * (J - 4) + 4;
  return kPos ? _mm512_srli_epi32(raw, kPos) : raw;  // vpermps reads only the low 4 bits
}

template <int R, int T, int J>
inline void LutStep(const __m512i (&raw)[T], __m512 table, const float* const (&ar)[R], int64_t k,
                    __m512 (&bacc)[R][T]) {
  __m512 w[T];
  for (int t = 0; t < T; ++t) w[t] = _mm512_permutexvar_ps(NibbleIndex<J>(raw[t]), table);
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(ar[r][k + J]);
    for (int t = 0; t < T; ++t) bacc[r][t] = _mm512_fmadd_ps(w[t], a, bacc[r][t]);
  }
}

template <int R, int T, int... J>
inline void LutGroup(const __m512i (&raw)[T], __m512 table, const float* const (&ar)[R], int64_t k,
                     __m512 (&bacc)[R][T], std::integer_sequence<int, J...>) {
  (LutStep<R, T, J>(raw, table, ar, k, bacc), ...);
}

template <int R, int T, int kZp>
void FloatLutTiles(const PackedWeights& p, const float* a_padded, int64_t row0, int64_t tile0, const float* bias,
                   float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded, groups = bkp / 8;
  const __m512 table = kZp == kZpSymmetric ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
                            : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a_padded + (row0 + r) * kp;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 bacc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) bacc[r][t] = _mm512_setzero_ps();
    const uint8_t* wb[T];
    for (int t = 0; t < T; ++t) wb[t] = BlockCodes(p, tile0 + t, b);
    if (R == 1) PrefetchPanelBlock(p, tile0, b);
    for (int64_t g = 0; g < groups; ++g) {
      __m512i raw[T];
      for (int t = 0; t < T; ++t) raw[t] = _mm512_loadu_si512(wb[t] + g * 64);
      LutGroup<R, T>(raw, table, ar, b * bkp + g * 8, bacc, std::make_integer_sequence<int, 8>{});
    }
    for (int t = 0; t < T; ++t) {
      const uint8_t* params = BlockParams(p, tile0 + t, b);
      const __m512 ws = LoadWeightScales(p, params);
      const __m512 zw = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, params);
      for (int r = 0; r < R; ++r) {
        __m512 block = bacc[r][t];
        if (kZp != kZpSymmetric) {
          __m512 sum = _mm512_setzero_ps();
          for (int64_t k = 0; k < bkp; k += 16) {
            const __mmask16 m = bkp - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>(0xff);
            sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(m, ar[r] + b * bkp + k));
          }
          block = _mm512_fnmadd_ps(zw, _mm512_set1_ps(_mm512_reduce_add_ps(sum)), block);
        }
        facc[r][t] = _mm512_fmadd_ps(block, ws, facc[r][t]);
      }
    }
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

template <int T, bool kNibble, int kZp>
struct SmallRowsBody {
  const PackedWeights& p;
  const ActRows* act;
  const float* a_padded;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const {
    if (act) {
      IntTilesAnyGroups<R, T, kNibble, kZp>(p, PackedTileCodes<T>(p, tile0), *act, r, tile0, bias, Y);
    } else {
      if constexpr (kNibble && kZp != kZpOffset) {  // float offsets: per-element u * scale + offset
        FloatLutTiles<R, T, kZp>(p, a_padded, r, tile0, bias, Y);
      } else {
        FloatTiles<R, T, kNibble, kZp>(p, a_padded, r, tile0, bias, Y);
      }
    }
  }
};

constexpr int kSmallRows = 4;  // register blocks of the kernels reading packed codes: up to 4 rows

// Few rows (decode): codes are read packed, straight from the repacked weights, nibbles unpacked in
// registers.
template <int T, bool kNibble, int kZp>
void SmallRows(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
               int64_t tile0, const float* bias, float* Y) {
  ForRowBlocks<kSmallRows>(row_begin, row_end, SmallRowsBody<T, kNibble, kZp>{p, act, a_padded, tile0, bias, Y});
}

template <bool kNibble, int kZp>
void RunDecodeTiles(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                    int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  int64_t t = tile_begin;
  // Float mode, one row, and integer mode: four tiles at once (integer register blocks up to 4 rows x
  // 4 tiles), for enough independent accumulator chains and each code byte loaded once per 4 rows.
  const int64_t rows = row_end - row_begin;
  if (rows < 2 || act) {
    for (; t + 4 <= tile_end; t += 4) SmallRows<4, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
  }
  for (; t + 2 <= tile_end; t += 2) SmallRows<2, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
  for (; t < tile_end; ++t) SmallRows<1, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
}

}  // namespace

void DecodeTilesAvx512(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                       int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  // Float mode symmetric weights are stored as signed codes (no zero point left to subtract).
  ForWeightMode(p.nibble, p.shape, [&](auto nibble, auto zp) {
    RunDecodeTiles<decltype(nibble)::value, decltype(zp)::value>(p, act, a_padded, row_begin, row_end, tile_begin,
                                                                 tile_end, bias, Y);
  });
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
