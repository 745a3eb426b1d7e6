// Helpers of the BlockMatMul AVX-512 VNNI kernels shared by the decode file (matmul_gemv_avx512.cc)
// and the prefill file (matmul_kernel_avx512.cc): scale and zero-point loads, the tile store, the
// integer register-block kernel and the row blocking. The including file includes the standard
// headers and <immintrin.h> after setting the AVX-512 target; everything here has internal linkage.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "matmul_kernel.h"

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

// 16 weight scales (one tile's columns, one block) as float32, from block parameters in the code
// stream (BlockParams); float16 storage converts exactly.
inline __m512 LoadWeightScales(const PackedWeights& p, const uint8_t* params) {
  if (p.half_scales) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
  return _mm512_loadu_ps(params);
}

// 16 zero points (integer mode, from bytes) or float offsets (kZpOffset, float32) as float32; they
// follow the scales in the block parameters.
template <int kZp>
inline __m512 LoadZw(const PackedWeights& p, const uint8_t* params) {
  const uint8_t* zero_points = params + (p.half_scales ? 32 : 64);
  if (kZp == kZpOffset) return _mm512_loadu_ps(zero_points);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero_points))));
}

// Where the integer kernel reads T tiles: tile t's codes for block b at codes[t] + b * code_stride[t]
// (the packed weights or an expanded copy), its block parameters at params[t] + b * param_stride[t].
template <int T>
struct TileCodes {
  const uint8_t* codes[T];
  int64_t code_stride[T];
  const uint8_t* params[T];
  int64_t param_stride[T];
};

// The packed weights' own codes of tiles [tile0, tile0 + T).
template <int T>
TileCodes<T> PackedTileCodes(const PackedWeights& p, int64_t tile0) {
  TileCodes<T> tiles;
  for (int t = 0; t < T; ++t) {
    tiles.codes[t] = BlockCodes(p, tile0 + t, 0);
    tiles.params[t] = BlockParams(p, tile0 + t, 0);
    tiles.code_stride[t] = tiles.param_stride[t] = PanelBlockBytes(p, tile0 + t);
  }
  return tiles;
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

// The format's scaling of one block's R x T integer dot products into the float sums (facc, or fmem
// when they live in L1), in the spec's order and roundings; every integer kernel calls this one formula.
// Row r's activation scale is scales[r * stride], its code sum sums[r * stride] (asymmetric weights only).
template <int R, int T, int kZp, bool kFaccInMemory>
inline void ScaleBlockInto(const __m512i (&acc)[R][T], const __m512 (&ws)[T], const __m512 (&zw)[T],
                           const float* scales, const float* sums, int64_t stride, __m512 (&facc)[R][T],
                           float* fmem) {
  for (int r = 0; r < R; ++r) {
    const __m512 as = _mm512_set1_ps(scales[r * stride]);
    const __m512 sum = kZp == kZpSymmetric ? _mm512_setzero_ps() : _mm512_set1_ps(sums[r * stride]);
    for (int t = 0; t < T; ++t) {
      float* const mem = fmem + (r * T + t) * 16;
      const __m512 y = kFaccInMemory ? _mm512_load_ps(mem) : facc[r][t];
      __m512 f = _mm512_cvtepi32_ps(acc[r][t]), out;
      if (kZp == kZpOffset) {  // a_scale * (w_scale * dot + offset * sum(sa))
        f = _mm512_fmadd_ps(zw[t], sum, _mm512_mul_ps(f, ws[t]));
        out = _mm512_fmadd_ps(f, as, y);
      } else {
        if (kZp != kZpSymmetric) f = _mm512_fnmadd_ps(zw[t], sum, f);
        f = _mm512_mul_ps(f, as);
        out = _mm512_fmadd_ps(f, ws[t], y);
      }
      if (kFaccInMemory) {
        _mm512_store_ps(mem, out);
      } else {
        facc[r][t] = out;
      }
    }
  }
}

// A group's high bit plane (the 16 mask bytes at masks: 64 bits for the low nibbles, then 64 for
// the high ones) added to its nibbles as the code's bit 4.
inline void AddHighPlane(const uint8_t* masks, __m512i& lo, __m512i& hi) {
  const __m512i bit = _mm512_set1_epi8(16);
  uint64_t low_bits, high_bits;  // memcpy: the mask bytes need not be 8-byte aligned
  std::memcpy(&low_bits, masks, sizeof(low_bits));
  std::memcpy(&high_bits, masks + 8, sizeof(high_bits));
  lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(low_bits), lo, bit);
  hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(high_bits), hi, bit);
}

constexpr int64_t kPrefetchBlocks = 2;
constexpr int64_t kBytePrefetchBlocks = 4;

// Integer mode: R rows x T tiles of 16 columns, the codes read where `codes` says.
// kGroups: groups per block when known at compile time (the loop is then unrolled), else 0.
// kStreamed: the codes are read once (decode), so the panel's next blocks are prefetched; prefill
// re-reads a task's tiles for every register block of rows, from cache.
// kPlanes: nibble codes with one high bit plane (5-bit codes, matmul_kernel.h: the only plane count
// PackWeights makes), added to its nibbles in registers by a masked byte add, so the dot products see
// the whole code; a compile-time count, so the plane's masks are read straight into mask registers.
template <int R, int T, bool kNibble, int kZp, int kGroups, bool kStreamed, bool kPlanes = false>
void IntTiles(const PackedWeights& p, const TileCodes<T>& codes, const ActRows& act, int64_t row0, int64_t tile0,
              const float* bias, float* Y) {
  const int64_t nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  const int64_t groups = kGroups ? kGroups : (kNibble ? bkp / 8 : bkp / 4);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  // Register blocks of more than 12 tiles (4 rows x 4 tiles, decode) keep the integer accumulators in
  // registers and the float ones in L1: a load and a store per block, off the vector pipes.
  constexpr bool kFaccInMemory = R * T > 12;
  alignas(64) float fmem[kFaccInMemory ? R * T * 16 : 16];
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      facc[r][t] = _mm512_setzero_ps();
      if (kFaccInMemory) _mm512_store_ps(fmem + (r * T + t) * 16, facc[r][t]);
    }
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[R][T];
    const int8_t* ab[R];
    for (int r = 0; r < R; ++r) {
      const __m512i init = kZp == kZpSymmetric ? _mm512_set1_epi32(act.corr[(row0 + r) * nb + b]) : _mm512_setzero_si512();
      for (int t = 0; t < T; ++t) acc[r][t] = init;
      ab[r] = act.codes.data() + (row0 + r) * kp + b * bkp;
    }
    const uint8_t* wb[T];
    for (int t = 0; t < T; ++t) wb[t] = codes.codes[t] + b * codes.code_stride[t];
    // Streamed codes are fetched explicitly ahead of the hardware prefetcher: decode with several rows
    // (bound by the dot products) kPrefetchBlocks ahead; one row (the decode GEMV) kBytePrefetchBlocks
    // ahead, which cut its CPU time by 15-18% for 4-bit codes and by 40% for 5-bit ones (nibbles plus a
    // plane, a decoder's tied output table) on an Intel Xeon whose other core streamed memory too
    // (session 16; 2, 4, 8 and 16 blocks ahead within noise of each other).
    if constexpr (kStreamed) {
      constexpr int64_t kAhead = kNibble && !kPlanes && R > 1 ? kPrefetchBlocks : kBytePrefetchBlocks;
      if (b + kAhead < nb) {
        const char* ahead = reinterpret_cast<const char*>(codes.codes[0] + (b + kAhead) * codes.code_stride[0]);
        for (int64_t c = 0; c < codes.code_stride[0]; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
      }
    }
    // One row of streamed nibble codes (the decode GEMV) reads a panel's block in address order, tile
    // by tile, instead of group by group across the tiles (addresses 256 bytes apart): one core then
    // streams from memory 12-24% faster, while the tiles' accumulator chains still overlap.
    constexpr bool kInOrder = kStreamed && kNibble && R == 1;
    if constexpr (kInOrder) {
      for (int t = 0; t < T; ++t) {
#pragma GCC unroll 16
        for (int64_t g = 0; g < groups; ++g) {
          const __m512i raw = _mm512_loadu_si512(wb[t] + g * 64);
          __m512i lo = _mm512_and_si512(raw, low4);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          if constexpr (kPlanes) AddHighPlane(wb[t] + groups * 64 + g * 16, lo, hi);
          acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], lo, _mm512_set1_epi32(Load32(ab[0] + g * 8)));
          acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], hi, _mm512_set1_epi32(Load32(ab[0] + g * 8 + 4)));
        }
      }
    }
#pragma GCC unroll 16
    for (int64_t g = 0; g < (kInOrder ? 0 : groups); ++g) {
      if (kNibble) {
        __m512i lo[T], hi[T];
        for (int t = 0; t < T; ++t) {
          const __m512i raw = _mm512_loadu_si512(wb[t] + g * 64);
          lo[t] = _mm512_and_si512(raw, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          if constexpr (kPlanes) AddHighPlane(wb[t] + groups * 64 + g * 16, lo[t], hi[t]);
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
      const uint8_t* params = codes.params[t] + b * codes.param_stride[t];
      ws[t] = LoadWeightScales(p, params);
      if (kZp != kZpSymmetric) zw[t] = LoadZw<kZp>(p, params);
    }
    ScaleBlockInto<R, T, kZp, kFaccInMemory>(acc, ws, zw, act.scales.data() + row0 * nb + b,
                                             act.sums.data() + row0 * nb + b, nb, facc, fmem);
  }
  if (kFaccInMemory) {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) facc[r][t] = _mm512_load_ps(fmem + (r * T + t) * 16);
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

// IntTiles with the group count of this weight's blocks as a compile-time constant when common.
template <int R, int T, bool kNibble, int kZp, bool kStreamed, bool kPlanes>
void IntTilesGroups(const PackedWeights& p, const TileCodes<T>& codes, const ActRows& act, int64_t row0,
                    int64_t tile0, const float* bias, float* Y) {
  switch (kNibble ? p.block_padded / 8 : p.block_padded / 4) {
    case 4:
      return IntTiles<R, T, kNibble, kZp, 4, kStreamed, kPlanes>(p, codes, act, row0, tile0, bias, Y);
    case 8:
      return IntTiles<R, T, kNibble, kZp, 8, kStreamed, kPlanes>(p, codes, act, row0, tile0, bias, Y);
    case 16:
      return IntTiles<R, T, kNibble, kZp, 16, kStreamed, kPlanes>(p, codes, act, row0, tile0, bias, Y);
    default:
      return IntTiles<R, T, kNibble, kZp, 0, kStreamed, kPlanes>(p, codes, act, row0, tile0, bias, Y);
  }
}

// Also chooses the high-bit-plane kernel for nibble codes that have a plane (5 bits).
template <int R, int T, bool kNibble, int kZp, bool kStreamed = true>
void IntTilesAnyGroups(const PackedWeights& p, const TileCodes<T>& codes, const ActRows& act, int64_t row0,
                       int64_t tile0, const float* bias, float* Y) {
  if constexpr (kNibble) {
    if (p.high_planes > 0) return IntTilesGroups<R, T, true, kZp, kStreamed, true>(p, codes, act, row0, tile0, bias, Y);
  }
  IntTilesGroups<R, T, kNibble, kZp, kStreamed, false>(p, codes, act, row0, tile0, bias, Y);
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

}  // namespace
}  // namespace detail
}  // namespace matmul
}  // namespace bct
