// BlockMatMul 256-bit kernels, compiled twice: for AVX2 + FMA (matmul_kernel_avx2.cc: integer dot
// products with vpmaddubsw/vpmaddwd) and for AVX-VNNI (matmul_kernel_avxvnni.cc: vpdpbusd on ymm).
// The including file includes the standard headers below, then sets the target and
// BCT_MATMUL_AVX_VNNI (0 or 1). Everything here has internal linkage, so the two compilations never mix.
//
// A 16-column tile is two halves of 8 lanes (bytes 0..31 and 32..63 of each 64-byte group). Without
// VNNI, a pair of products can only saturate int16 when 8-bit weight codes (up to 255) meet 8-bit
// activations (-128): that case splits each code into 2 * (code >> 1) + (code & 1).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "matmul_kernel.h"

#if !defined(BCT_MATMUL_AVX_VNNI) || !defined(BCT_MATMUL_TILES)
#error "define BCT_MATMUL_AVX_VNNI (0 or 1) and BCT_MATMUL_TILES (the entry's name) before including matmul_kernel_avx2_impl.h"
#endif

namespace bct {
namespace matmul {
namespace detail {
namespace {


constexpr int kRows = 2;

inline int32_t Load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Stores 8 columns of one half tile, fewer at the right edge of Y.
inline void StoreHalf(float* y, const float* bias, int64_t cols, __m256 v) {
  if (cols >= 8) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(y, v);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int64_t c = 0; c < cols; ++c) y[c] = bias ? tmp[c] + bias[c] : tmp[c];
}

template <int R>
inline void StoreTile(const PackedWeights& p, __m256 (&facc)[R][2], int64_t row0, int64_t tile, const float* bias,
                      float* Y) {
  const int64_t N = p.shape.N;
  for (int h = 0; h < 2; ++h) {
    const int64_t col0 = tile * 16 + h * 8;
    const int64_t cols = N - col0;
    if (cols <= 0) continue;
    for (int r = 0; r < R; ++r) StoreHalf(Y + (row0 + r) * N + col0, bias ? bias + col0 : nullptr, cols, facc[r][h]);
  }
}

// Scales and zero points (or offsets) of block b of a tile, as two halves of 8 columns.
template <int kZp>
inline void LoadTileParams(const PackedWeights& p, int64_t tile, int64_t b, __m256 (&ws)[2], __m256 (&zw)[2]) {
  for (int h = 0; h < 2; ++h) {
    const int64_t at = (tile * p.num_blocks + b) * 16 + h * 8;
    ws[h] = _mm256_loadu_ps(p.scales.data() + at);
    zw[h] = kZp == kZpSymmetric ? _mm256_setzero_ps() : _mm256_loadu_ps(p.zero_points.data() + at);
  }
}

// acc + the sums of 4 products u8 x s8 per 32-bit lane.
template <bool kSplit>
inline __m256i Dot4Acc(__m256i acc, __m256i w, __m256i a) {
#if BCT_MATMUL_AVX_VNNI
  (void)kSplit;  // vpdpbusd does not saturate
  return _mm256_dpbusd_avx_epi32(acc, w, a);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if (!kSplit) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones));
  const __m256i half = _mm256_and_si256(_mm256_srli_epi16(w, 1), _mm256_set1_epi8(0x7f));
  const __m256i odd = _mm256_and_si256(w, _mm256_set1_epi8(0x01));
  const __m256i twos = _mm256_set1_epi16(2);
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(half, a), twos),
                                                _mm256_madd_epi16(_mm256_maddubs_epi16(odd, a), ones)));
#endif
}

template <int R, bool kNibble, int kZp, bool kSplit>
void IntTile(const PackedWeights& p, const ActRows& act, int64_t row0, int64_t tile, const float* bias, float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  const int64_t groups = kNibble ? bkp / 8 : bkp / 4;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[R][2];
    const int8_t* ab[R];
    for (int r = 0; r < R; ++r) {
      const __m256i init = kZp == kZpSymmetric ? _mm256_set1_epi32(act.corr[(row0 + r) * nb + b]) : _mm256_setzero_si256();
      acc[r][0] = acc[r][1] = init;
      ab[r] = act.codes.data() + (row0 + r) * kp + b * bkp;
    }
    const uint8_t* wb = p.codes.data() + tile * p.tile_bytes + b * groups * 64;
    // One row (the decode GEMV) streams the tile's codes once: fetched 4 blocks ahead, which cut its CPU
    // time by 17-20% on an Intel Xeon whose other core streamed memory too (forced avx2 path, session 16).
    if (R == 1 && b + 4 < nb) {
      for (int64_t c = 0; c < groups * 64; c += 64) _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * groups * 64 + c), _MM_HINT_T0);
    }
    for (int64_t g = 0; g < groups; ++g) {
      for (int h = 0; h < 2; ++h) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64 + h * 32));
        if (kNibble) {
          const __m256i lo = _mm256_and_si256(raw, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          for (int r = 0; r < R; ++r) {
            const __m256i a0 = _mm256_set1_epi32(Load32(ab[r] + g * 8));
            const __m256i a1 = _mm256_set1_epi32(Load32(ab[r] + g * 8 + 4));
            acc[r][h] = Dot4Acc<false>(Dot4Acc<false>(acc[r][h], lo, a0), hi, a1);
          }
        } else {
          for (int r = 0; r < R; ++r) {
            const __m256i a = _mm256_set1_epi32(Load32(ab[r] + g * 4));
            acc[r][h] = Dot4Acc<kSplit>(acc[r][h], raw, a);
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (tile * nb + b) * 16 + h * 8;
      const __m256 ws = _mm256_loadu_ps(p.scales.data() + at);
      const __m256 zw = kZp == kZpSymmetric ? _mm256_setzero_ps() : _mm256_loadu_ps(p.zero_points.data() + at);
      for (int r = 0; r < R; ++r) {
        __m256 f = _mm256_cvtepi32_ps(acc[r][h]);
        if (kZp == kZpOffset) {  // a_scale * (w_scale * dot + offset * sum(sa))
          f = _mm256_fmadd_ps(zw, _mm256_set1_ps(act.sums[(row0 + r) * nb + b]), _mm256_mul_ps(f, ws));
          facc[r][h] = _mm256_fmadd_ps(f, _mm256_set1_ps(act.scales[(row0 + r) * nb + b]), facc[r][h]);
          continue;
        }
        if (kZp != kZpSymmetric) f = _mm256_fnmadd_ps(zw, _mm256_set1_ps(act.sums[(row0 + r) * nb + b]), f);
        f = _mm256_mul_ps(f, _mm256_set1_ps(act.scales[(row0 + r) * nb + b]));
        facc[r][h] = _mm256_fmadd_ps(f, ws, facc[r][h]);
      }
    }
  }
  StoreTile<R>(p, facc, row0, tile, bias, Y);
}

template <int J, bool kNibble, bool kSigned>
inline __m256i Extract(__m256i raw) {
  constexpr int kWidth = kNibble ? 4 : 8;
  constexpr int kPos = kNibble ? (J < 4 ? 8 * J : 8 * (J - 4) + 4) : 8 * J;
  if (kSigned) {
    const __m256i up = (32 - kPos - kWidth) ? _mm256_slli_epi32(raw, 32 - kPos - kWidth) : raw;
    return _mm256_srai_epi32(up, 32 - kWidth);
  }
  const __m256i down = kPos ? _mm256_srli_epi32(raw, kPos) : raw;
  return (kPos + kWidth == 32) ? down : _mm256_and_si256(down, _mm256_set1_epi32((1 << kWidth) - 1));
}

template <int R, bool kNibble, int kZp, int J>
inline void FloatStep(const __m256i (&raw)[2], const __m256 (&ws)[2], const __m256 (&zw)[2],
                      const float* const (&ar)[R], int64_t k, __m256 (&facc)[R][2]) {
  __m256 w[2];
  for (int h = 0; h < 2; ++h) {
    __m256 v = _mm256_cvtepi32_ps(Extract<J, kNibble, kZp == kZpSymmetric>(raw[h]));
    if (kZp == kZpInteger) v = _mm256_sub_ps(v, zw[h]);
    w[h] = _mm256_mul_ps(v, ws[h]);
    if (kZp == kZpOffset) w[h] = _mm256_add_ps(w[h], zw[h]);  // u * scale + offset, two roundings
  }
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_broadcast_ss(ar[r] + k + J);
    for (int h = 0; h < 2; ++h) facc[r][h] = _mm256_fmadd_ps(w[h], a, facc[r][h]);
  }
}

template <int R, bool kNibble, int kZp, int... J>
inline void FloatGroup(const __m256i (&raw)[2], const __m256 (&ws)[2], const __m256 (&zw)[2],
                       const float* const (&ar)[R], int64_t k, __m256 (&facc)[R][2], std::integer_sequence<int, J...>) {
  (FloatStep<R, kNibble, kZp, J>(raw, ws, zw, ar, k, facc), ...);
}

template <int R, bool kNibble, int kZp>
void FloatTile(const PackedWeights& p, const float* a_padded, int64_t row0, int64_t tile, const float* bias, float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  constexpr int kGroupK = kNibble ? 8 : 4;
  const int64_t groups = bkp / kGroupK;
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a_padded + (row0 + r) * kp;
  for (int64_t b = 0; b < nb; ++b) {
    __m256 ws[2], zw[2];
    LoadTileParams<kZp>(p, tile, b, ws, zw);
    const uint8_t* wb = p.codes.data() + tile * p.tile_bytes + b * groups * 64;
    // One row: fetched 4 blocks ahead, as IntTile does (here 5% less CPU time: float mode is bound by
    // its per-code arithmetic more than by the read).
    if (R == 1 && b + 4 < nb) {
      for (int64_t c = 0; c < groups * 64; c += 64) _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * groups * 64 + c), _MM_HINT_T0);
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256i raw[2];
      for (int h = 0; h < 2; ++h) raw[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64 + h * 32));
      FloatGroup<R, kNibble, kZp>(raw, ws, zw, ar, b * bkp + g * kGroupK, facc,
                                   std::make_integer_sequence<int, kGroupK>{});
    }
  }
  StoreTile<R>(p, facc, row0, tile, bias, Y);
}

template <int R, bool kNibble, int kZp>
void RunBlock(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row0, int64_t tile,
              const float* bias, float* Y) {
  if (!act) {
    FloatTile<R, kNibble, kZp>(p, a_padded, row0, tile, bias, Y);
  } else if (!kNibble && p.shape.bits == 8 && p.shape.act_bits == 8) {
    IntTile<R, kNibble, kZp, true>(p, *act, row0, tile, bias, Y);
  } else {
    IntTile<R, kNibble, kZp, false>(p, *act, row0, tile, bias, Y);
  }
}

// Float mode, many rows: one tile dequantized into w ([k_padded][16] floats, exactly
// block_format.dequantize's values), then a 4-row x 16-column fp32 micro-kernel.
template <int R>
void FloatGemmTile(const PackedWeights& p, const float* w, const float* a_padded, int64_t row0, int64_t tile,
                   const float* bias, float* Y) {
  const int64_t kp = p.k_padded;
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a_padded + (row0 + r) * kp;
  for (int64_t k = 0; k < kp; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * 16), w1 = _mm256_loadu_ps(w + k * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(ar[r] + k);
      facc[r][0] = _mm256_fmadd_ps(w0, a, facc[r][0]);
      facc[r][1] = _mm256_fmadd_ps(w1, a, facc[r][1]);
    }
  }
  StoreTile<R>(p, facc, row0, tile, bias, Y);
}

template <int J, bool kNibble, int kZp>
inline void DequantizeStep(const __m256i (&raw)[2], const __m256 (&ws)[2], const __m256 (&zw)[2], float* out) {
  for (int h = 0; h < 2; ++h) {
    __m256 v = _mm256_cvtepi32_ps(Extract<J, kNibble, kZp == kZpSymmetric>(raw[h]));
    if (kZp == kZpInteger) v = _mm256_sub_ps(v, zw[h]);
    v = _mm256_mul_ps(v, ws[h]);
    if (kZp == kZpOffset) v = _mm256_add_ps(v, zw[h]);  // u * scale + offset, two roundings
    _mm256_storeu_ps(out + J * 16 + h * 8, v);
  }
}

template <bool kNibble, int kZp, int... J>
inline void DequantizeGroup(const __m256i (&raw)[2], const __m256 (&ws)[2], const __m256 (&zw)[2], float* out,
                            std::integer_sequence<int, J...>) {
  (DequantizeStep<J, kNibble, kZp>(raw, ws, zw, out), ...);
}

template <bool kNibble, int kZp>
void DequantizeTile(const PackedWeights& p, int64_t tile, float* out) {
  constexpr int kGroupK = kNibble ? 8 : 4;
  const int64_t nb = p.num_blocks, groups = p.block_padded / kGroupK;
  const uint8_t* codes = p.codes.data() + tile * p.tile_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    __m256 ws[2], zw[2];
    LoadTileParams<kZp>(p, tile, b, ws, zw);
    for (int64_t g = 0; g < groups; ++g) {
      __m256i raw[2];
      for (int h = 0; h < 2; ++h) {
        raw[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (b * groups + g) * 64 + h * 32));
      }
      DequantizeGroup<kNibble, kZp>(raw, ws, zw, out + (b * p.block_padded + g * kGroupK) * 16,
                                     std::make_integer_sequence<int, kGroupK>{});
    }
  }
}

constexpr int kFloatRows = 4;

template <bool kNibble, int kZp>
void RunTiles(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  if (!act && row_end - row_begin >= kFloatRows) {
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(p.k_padded * 16));
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      DequantizeTile<kNibble, kZp>(p, t, scratch.data());
      int64_t r = row_begin;
      for (; r + kFloatRows <= row_end; r += kFloatRows) FloatGemmTile<kFloatRows>(p, scratch.data(), a_padded, r, t, bias, Y);
      for (; r + 2 <= row_end; r += 2) FloatGemmTile<2>(p, scratch.data(), a_padded, r, t, bias, Y);
      if (r < row_end) FloatGemmTile<1>(p, scratch.data(), a_padded, r, t, bias, Y);
    }
    return;
  }
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    int64_t r = row_begin;
    for (; r + kRows <= row_end; r += kRows) RunBlock<kRows, kNibble, kZp>(p, act, a_padded, r, t, bias, Y);
    if (r < row_end) RunBlock<1, kNibble, kZp>(p, act, a_padded, r, t, bias, Y);
  }
}

}  // namespace

// The path's entry of Kernels(isa).matmul_tiles (named by the including file).
void BCT_MATMUL_TILES(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                      int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  ForWeightMode(p.nibble, p.shape, [&](auto nibble, auto zp) {
    RunTiles<decltype(nibble)::value, decltype(zp)::value>(p, act, a_padded, row_begin, row_end, tile_begin, tile_end,
                                                           bias, Y);
  });
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct
