// BlockMatMul AVX-512 VNNI kernels (compiled for the target here, chosen at run time).
// Integer mode: vpdpbusd(unsigned weight codes, signed activation codes) sums 4 products a lane
// without saturation, for every weight width 2..8 and activation width 2..8.
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

namespace bct {
namespace matmul {
namespace detail {
namespace {

inline int32_t Load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __mmask16 ColumnMask(const PackedWeights& p, int64_t tile) {
  const int64_t cols = std::min<int64_t>(16, p.shape.N - tile * 16);
  return static_cast<__mmask16>((1u << cols) - 1u);
}

// 16 weight scales (one tile's columns, one block) as float32; float16 storage converts exactly.
inline __m512 LoadWeightScales(const PackedWeights& p, int64_t at) {
  if (p.half_scales) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales_half.data() + at)));
  }
  return _mm512_loadu_ps(p.scales.data() + at);
}

// 16 zero points (asymmetric weights) as float32.
inline __m512 LoadZeroPoints(const PackedWeights& p, int64_t at) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zero_points_u8.data() + at));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}

// 16 zero points (integer mode, from bytes) or float offsets (kZpOffset, float32) as float32.
template <int kZp>
inline __m512 LoadZw(const PackedWeights& p, int64_t at) {
  if (kZp == kZpOffset) return _mm512_loadu_ps(p.zero_points.data() + at);
  return LoadZeroPoints(p, at);
}

template <int R, int T>
inline void StoreTiles(const PackedWeights& p, __m512 (&facc)[R][T], int64_t row0, int64_t tile0, const float* bias,
                       float* Y) {
  const int64_t N = p.shape.N;
  for (int t = 0; t < T; ++t) {
    const __mmask16 mask = ColumnMask(p, tile0 + t);
    const int64_t col0 = (tile0 + t) * 16;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(Y + (row0 + r) * N + col0, mask, _mm512_add_ps(facc[r][t], b));
  }
}

// Integer mode: R rows x T tiles of 16 columns.
// codes: the first tile's codes; tile t's codes start tile_stride bytes further per tile.
// kGroups: groups per block when known at compile time (the loop is then unrolled), else 0.
template <int R, int T, bool kNibble, int kZp, int kGroups>
void IntTiles(const PackedWeights& p, const uint8_t* codes, int64_t tile_stride, const ActRows& act, int64_t row0,
              int64_t tile0, const float* bias, float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  const int64_t groups = kGroups ? kGroups : (kNibble ? bkp / 8 : bkp / 4);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[R][T];
    const int8_t* ab[R];
    for (int r = 0; r < R; ++r) {
      const __m512i init = kZp == kZpSymmetric ? _mm512_set1_epi32(act.corr[(row0 + r) * nb + b]) : _mm512_setzero_si512();
      for (int t = 0; t < T; ++t) acc[r][t] = init;
      ab[r] = act.codes.data() + (row0 + r) * kp + b * bkp;
    }
    const uint8_t* wb[T];
    for (int t = 0; t < T; ++t) wb[t] = codes + t * tile_stride + b * groups * 64;
#pragma GCC unroll 16
    for (int64_t g = 0; g < groups; ++g) {
      if (kNibble) {
        __m512i lo[T], hi[T];
        for (int t = 0; t < T; ++t) {
          const __m512i raw = _mm512_loadu_si512(wb[t] + g * 64);
          lo[t] = _mm512_and_si512(raw, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i a0 = _mm512_set1_epi32(Load32(ab[r] + g * 8));
          const __m512i a1 = _mm512_set1_epi32(Load32(ab[r] + g * 8 + 4));
          for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], a0);
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi[t], a1);
          }
        }
      } else {
        __m512i w[T];
        for (int t = 0; t < T; ++t) w[t] = _mm512_loadu_si512(wb[t] + g * 64);
        for (int r = 0; r < R; ++r) {
          const __m512i a = _mm512_set1_epi32(Load32(ab[r] + g * 4));
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[t], a);
        }
      }
    }
    __m512 ws[T], zw[T];
    for (int t = 0; t < T; ++t) {
      const int64_t at = ((tile0 + t) * nb + b) * 16;
      ws[t] = LoadWeightScales(p, at);
      if (kZp != kZpSymmetric) zw[t] = LoadZw<kZp>(p, at);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 as = _mm512_set1_ps(act.scales[(row0 + r) * nb + b]);
      const __m512 sum = kZp == kZpSymmetric ? _mm512_setzero_ps() : _mm512_set1_ps(act.sums[(row0 + r) * nb + b]);
      for (int t = 0; t < T; ++t) {
        __m512 f = _mm512_cvtepi32_ps(acc[r][t]);
        if (kZp == kZpOffset) {  // a_scale * (w_scale * dot + offset * sum(sa))
          f = _mm512_fmadd_ps(zw[t], sum, _mm512_mul_ps(f, ws[t]));
          facc[r][t] = _mm512_fmadd_ps(f, as, facc[r][t]);
          continue;
        }
        if (kZp != kZpSymmetric) f = _mm512_fnmadd_ps(zw[t], sum, f);
        f = _mm512_mul_ps(f, as);
        facc[r][t] = _mm512_fmadd_ps(f, ws[t], facc[r][t]);
      }
    }
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

// IntTiles with the group count of this weight's blocks as a compile-time constant when common.
template <int R, int T, bool kNibble, int kZp>
void IntTilesAnyGroups(const PackedWeights& p, const uint8_t* codes, int64_t tile_stride, const ActRows& act,
                       int64_t row0, int64_t tile0, const float* bias, float* Y) {
  switch (kNibble ? p.block_padded / 8 : p.block_padded / 4) {
    case 4:
      return IntTiles<R, T, kNibble, kZp, 4>(p, codes, tile_stride, act, row0, tile0, bias, Y);
    case 8:
      return IntTiles<R, T, kNibble, kZp, 8>(p, codes, tile_stride, act, row0, tile0, bias, Y);
    case 16:
      return IntTiles<R, T, kNibble, kZp, 16>(p, codes, tile_stride, act, row0, tile0, bias, Y);
    default:
      return IntTiles<R, T, kNibble, kZp, 0>(p, codes, tile_stride, act, row0, tile0, bias, Y);
  }
}

// Extracts code j of each lane of a group as int32 (signed codes sign-extended).
template <int J, bool kNibble, bool kSigned>
inline __m512i Extract(__m512i raw) {
  constexpr int kWidth = kNibble ? 4 : 8;
  constexpr int kPos = kNibble ? (J < 4 ? 8 * J : 8 * (J - 4) + 4) : 8 * J;
  if (kSigned) {
    const __m512i up = (32 - kPos - kWidth) ? _mm512_slli_epi32(raw, 32 - kPos - kWidth) : raw;
    return _mm512_srai_epi32(up, 32 - kWidth);
  }
  const __m512i down = kPos ? _mm512_srli_epi32(raw, kPos) : raw;
  return (kPos + kWidth == 32) ? down : _mm512_and_si512(down, _mm512_set1_epi32((1 << kWidth) - 1));
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
      const int64_t at = ((tile0 + t) * nb + b) * 16;
      ws[t] = LoadWeightScales(p, at);
      zw[t] = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, at);
      wb[t] = p.codes.data() + (tile0 + t) * p.tile_bytes + b * groups * 64;
    }
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
    for (int t = 0; t < T; ++t) wb[t] = p.codes.data() + (tile0 + t) * p.tile_bytes + b * groups * 64;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i raw[T];
      for (int t = 0; t < T; ++t) raw[t] = _mm512_loadu_si512(wb[t] + g * 64);
      LutGroup<R, T>(raw, table, ar, b * bkp + g * 8, bacc, std::make_integer_sequence<int, 8>{});
    }
    for (int t = 0; t < T; ++t) {
      const int64_t at = ((tile0 + t) * nb + b) * 16;
      const __m512 ws = LoadWeightScales(p, at);
      const __m512 zw = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, at);
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

// Float mode, many rows: the T tiles' weights were dequantized into w ([T][k_padded][16] floats,
// exactly block_format.dequantize's values), so the inner loop is a plain fp32 GEMM micro-kernel.
template <int R, int T>
void FloatGemmTiles(const PackedWeights& p, const float* w, const float* a_padded, int64_t row0, int64_t tile0,
                    const float* bias, float* Y) {
  const int64_t kp = p.k_padded;
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  const float* ar[R];
  for (int r = 0; r < R; ++r) ar[r] = a_padded + (row0 + r) * kp;
  for (int64_t k = 0; k < kp; ++k) {
    __m512 wv[T];
    for (int t = 0; t < T; ++t) wv[t] = _mm512_loadu_ps(w + (t * kp + k) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(ar[r][k]);
      for (int t = 0; t < T; ++t) facc[r][t] = _mm512_fmadd_ps(wv[t], a, facc[r][t]);
    }
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

template <int J, bool kNibble, int kZp>
inline void DequantizeStep(__m512i raw, __m512 ws, __m512 zw, float* out) {
  __m512 v = _mm512_cvtepi32_ps(Extract<J, kNibble, kZp == kZpSymmetric>(raw));
  if (kZp == kZpInteger) v = _mm512_sub_ps(v, zw);
  v = _mm512_mul_ps(v, ws);
  if (kZp == kZpOffset) v = _mm512_add_ps(v, zw);  // u * scale + offset, two roundings
  _mm512_storeu_ps(out + J * 16, v);
}

template <bool kNibble, int kZp, int... J>
inline void DequantizeGroup(__m512i raw, __m512 ws, __m512 zw, float* out, std::integer_sequence<int, J...>) {
  (DequantizeStep<J, kNibble, kZp>(raw, ws, zw, out), ...);
}

// Dequantizes one tile into out[k_padded][16].
template <bool kNibble, int kZp>
void DequantizeTile(const PackedWeights& p, int64_t tile, float* out) {
  constexpr int kGroupK = kNibble ? 8 : 4;
  const int64_t nb = p.num_blocks, groups = p.block_padded / kGroupK;
  const uint8_t* codes = p.codes.data() + tile * p.tile_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t at = (tile * nb + b) * 16;
    const __m512 ws = LoadWeightScales(p, at);
    const __m512 zw = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, at);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i raw = _mm512_loadu_si512(codes + (b * groups + g) * 64);
      DequantizeGroup<kNibble, kZp>(raw, ws, zw, out + (b * p.block_padded + g * kGroupK) * 16,
                                     std::make_integer_sequence<int, kGroupK>{});
    }
  }
}

// Expands one tile of nibble codes into the byte layout (groups of 4 k, one byte a code).
void UnpackNibbleTile(const PackedWeights& p, int64_t tile, uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const uint8_t* codes = p.codes.data() + tile * p.tile_bytes;
  const int64_t groups = p.k_padded / 8;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i raw = _mm512_loadu_si512(codes + g * 64);
    _mm512_storeu_si512(out + g * 128, _mm512_and_si512(raw, low4));
    _mm512_storeu_si512(out + g * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
  }
}

// Calls body.template Run<R>(row) over [row_begin, row_end) in register blocks of kMax rows, then
// smaller blocks for the remainder.
template <int kMax, class Body>
void ForRowBlocks(int64_t row_begin, int64_t row_end, const Body& body) {
  int64_t r = row_begin;
  for (; r + kMax <= row_end; r += kMax) body.template Run<kMax>(r);
  const int64_t left = row_end - r;
  if constexpr (kMax > 1) {
    if (left > 0) {
      if (left >= kMax / 2 + (kMax & 1)) {
        ForRowBlocks<kMax / 2 + (kMax & 1)>(r, row_end, body);
      } else {
        ForRowBlocks<kMax / 2>(r, row_end, body);
      }
    }
  }
}

template <int T, int kZp>
struct IntPrefillBody {
  const PackedWeights& p;
  const uint8_t* codes;
  int64_t stride;
  const ActRows& act;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const { IntTilesAnyGroups<R, T, false, kZp>(p, codes, stride, act, r, tile0, bias, Y); }
};

template <int T>
struct FloatPrefillBody {
  const PackedWeights& p;
  const float* w;
  const float* a_padded;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const { FloatGemmTiles<R, T>(p, w, a_padded, r, tile0, bias, Y); }
};

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
      IntTilesAnyGroups<R, T, kNibble, kZp>(p, p.codes.data() + tile0 * p.tile_bytes, p.tile_bytes, *act, r, tile0,
                                             bias, Y);
    } else {
      if constexpr (kNibble && kZp != kZpOffset) {  // float offsets: per-element u * scale + offset
        FloatLutTiles<R, T, kZp>(p, a_padded, r, tile0, bias, Y);
      } else {
        FloatTiles<R, T, kNibble, kZp>(p, a_padded, r, tile0, bias, Y);
      }
    }
  }
};

constexpr int kSmallRows = 4;        // register blocks of the kernels reading packed codes: 4 x 2 or 2 x 4 tiles
constexpr int kFloatPrefillRows = 4;  // float mode: from this many rows on, tiles are dequantized once and reused
constexpr int kIntPrefillRows = kDecodeRows + 1;  // integer mode: ... nibble tiles expanded to bytes once
constexpr int kIntRows = 6;           // register block of the integer prefill kernel (6 x 2 tiles)
constexpr int kFloatRows = 8;    // register block of the float prefill kernel (8 x 2 tiles)

template <int T, bool kNibble, int kZp>
void IntPrefill(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile0,
                const float* bias, float* Y) {
  const uint8_t* codes = p.codes.data() + tile0 * p.tile_bytes;
  int64_t stride = p.tile_bytes;
  thread_local std::vector<uint8_t> scratch;
  if (kNibble) {
    stride = p.k_padded * 16;
    scratch.resize(static_cast<size_t>(T * stride));
    for (int t = 0; t < T; ++t) UnpackNibbleTile(p, tile0 + t, scratch.data() + t * stride);
    codes = scratch.data();
  }
  ForRowBlocks<kIntRows>(row_begin, row_end, IntPrefillBody<T, kZp>{p, codes, stride, act, tile0, bias, Y});
}

template <int T, bool kNibble, int kZp>
void FloatPrefill(const PackedWeights& p, const float* a_padded, int64_t row_begin, int64_t row_end, int64_t tile0,
                  const float* bias, float* Y) {
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(T * p.k_padded * 16));
  for (int t = 0; t < T; ++t) DequantizeTile<kNibble, kZp>(p, tile0 + t, scratch.data() + t * p.k_padded * 16);
  ForRowBlocks<kFloatRows>(row_begin, row_end, FloatPrefillBody<T>{p, scratch.data(), a_padded, tile0, bias, Y});
}

// Few rows (decode): codes are read packed, straight from the repacked weights, nibbles unpacked in
// registers.
template <int T, bool kNibble, int kZp>
void SmallRows(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
               int64_t tile0, const float* bias, float* Y) {
  ForRowBlocks<(T >= 4 ? 2 : kSmallRows)>(row_begin, row_end, SmallRowsBody<T, kNibble, kZp>{p, act, a_padded, tile0, bias, Y});
}

template <bool kNibble, int kZp>
void RunTiles(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  int64_t t = tile_begin;
  if (row_end - row_begin >= (act ? kIntPrefillRows : kFloatPrefillRows)) {
    for (; t < tile_end; t += 2) {
      if (t + 2 <= tile_end) {
        if (act) {
          IntPrefill<2, kNibble, kZp>(p, *act, row_begin, row_end, t, bias, Y);
        } else {
          FloatPrefill<2, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
        }
      } else if (act) {
        IntPrefill<1, kNibble, kZp>(p, *act, row_begin, row_end, t, bias, Y);
      } else {
        FloatPrefill<1, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
      }
    }
    return;
  }
  // One to three rows: four tiles at once (register blocks of up to 2 x 4 tiles), for enough
  // independent accumulator chains.
  const int64_t rows = row_end - row_begin;
  if (rows < 2 || (act && rows < kSmallRows)) {
    for (; t + 4 <= tile_end; t += 4) SmallRows<4, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
  }
  for (; t + 2 <= tile_end; t += 2) SmallRows<2, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
  for (; t < tile_end; ++t) SmallRows<1, kNibble, kZp>(p, act, a_padded, row_begin, row_end, t, bias, Y);
}

}  // namespace

void TilesAvx512(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
                 int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  // Float mode symmetric weights are stored as signed codes (no zero point left to subtract).
  ForWeightMode(p.nibble, p.shape, [&](auto nibble, auto zp) {
    RunTiles<decltype(nibble)::value, decltype(zp)::value>(p, act, a_padded, row_begin, row_end, tile_begin, tile_end,
                                                           bias, Y);
  });
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
