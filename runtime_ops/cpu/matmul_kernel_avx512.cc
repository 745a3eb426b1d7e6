// BlockMatMul AVX-512 VNNI kernels for many rows (prefill), compiled for the target here and chosen at
// run time; up to kDecodeRows rows (decode) are matmul_gemv_avx512.cc's.
// Integer mode: vpdpbusd(unsigned weight codes, signed activation codes) sums 4 products a lane
// without saturation, for every weight width 2..8 and activation width 2..8.
// Standard headers come before the target pragma, so that no standard-library code is compiled
// (and possibly shared with other files) for the target.
#include <algorithm>
#include <cstring>
#include <mutex>
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
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* codes = BlockCodes(p, tile, b);
    const uint8_t* params = BlockParams(p, tile, b);
    const __m512 ws = LoadWeightScales(p, params);
    const __m512 zw = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, params);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i raw = _mm512_loadu_si512(codes + g * 64);
      DequantizeGroup<kNibble, kZp>(raw, ws, zw, out + (b * p.block_padded + g * kGroupK) * 16,
                                     std::make_integer_sequence<int, kGroupK>{});
    }
  }
}

// body.template Run<rows>(row) for a run-time rows in 1..kMax.
template <int kMax, class Body>
void RunRowBlock(int64_t rows, int64_t row, const Body& body) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return RunRowBlock<kMax - 1>(rows, row, body);
  }
  body.template Run<kMax>(row);
}

// Cuts [row_begin, row_end) into the fewest register blocks of at most kMax rows, all of nearly the
// same size (30 rows in blocks of at most 4: 4, 4, 4, 4, 4, 4, 3, 3), rather than full blocks and a
// thin remainder that would read the weights again for 1 or 2 rows.
template <int kMax, class Body>
void BalancedRowBlocks(int64_t row_begin, int64_t row_end, const Body& body) {
  const int64_t n = row_end - row_begin;
  if (n <= 0) return;
  const int64_t blocks = (n + kMax - 1) / kMax, base = n / blocks, extra = n % blocks;
  for (int64_t i = 0, r = row_begin; i < blocks; ++i) {
    const int64_t rows = base + (i < extra ? 1 : 0);
    RunRowBlock<kMax>(rows, r, body);
    r += rows;
  }
}

// Integer mode: register blocks of up to kIntRows rows x T tiles read the packed codes straight from
// the weights repacked at creation (nibbles unpacked in registers: an AND and a shift per 64 bytes,
// no per-call copy); 4 x 4 keeps the 16 integer accumulators in registers and the float ones in L1.
template <int T, bool kNibble, int kZp>
struct IntPrefillBody {
  const PackedWeights& p;
  const TileCodes<T>& codes;
  const ActRows& act;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const { IntTilesAnyGroups<R, T, kNibble, kZp, false>(p, codes, act, r, tile0, bias, Y); }
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

constexpr int kFloatPrefillRows = 4;  // float mode: from this many rows on, tiles are dequantized once and reused
constexpr int kIntPrefillRows = kDecodeRows + 1;  // integer mode: from this many rows on (fewer: decode kernels)
constexpr int kIntRows = 4;           // register block of the integer prefill kernel (4 rows x 4 tiles)
constexpr int kFloatRows = 8;         // register block of the float prefill kernel (8 x 2 tiles)

// Nibble codes with high bit planes (5-bit weights, matmul_kernel.h) expanded into byte storage (the
// low and the high nibbles of each group of 8 k, their plane bits added as the decode kernels add
// them, are the two byte groups of those 8 k), so the prefill row blocks run the byte kernel on the
// same integer codes (the same bits) without adding plane bits for every row block. Expanded once per
// weight, on the first prefill call (p.prefill_bytes); returns the bytes of tile 0.
const uint8_t* PrefillBytes(const PackedWeights& p) {
  std::call_once(p.prefill_bytes_once, [&p] {
    const int64_t nb = p.num_blocks, groups = p.block_padded / 8, block_bytes = groups * 128;
    p.prefill_bytes.resize(static_cast<size_t>(p.num_tiles * nb * block_bytes));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t tile = 0; tile < p.num_tiles; ++tile) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = BlockCodes(p, tile, b);
        uint8_t* dst = p.prefill_bytes.data() + (tile * nb + b) * block_bytes;
        for (int64_t g = 0; g < groups; ++g) {
          const __m512i raw = _mm512_loadu_si512(wb + g * 64);
          __m512i lo = _mm512_and_si512(raw, low4);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          for (int q = 0; q < p.high_planes; ++q) {
            const uint8_t* masks = wb + groups * 64 + (q * groups + g) * 16;
            uint64_t low_bits, high_bits;
            std::memcpy(&low_bits, masks, sizeof(low_bits));
            std::memcpy(&high_bits, masks + 8, sizeof(high_bits));
            const __m512i bit = _mm512_set1_epi8(static_cast<char>(16 << q));
            lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(low_bits), lo, bit);
            hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(high_bits), hi, bit);
          }
          _mm512_storeu_si512(dst + g * 128, lo);
          _mm512_storeu_si512(dst + g * 128 + 64, hi);
        }
      }
    }
  });
  return p.prefill_bytes.data();
}

template <int T, int kZp>
void IntPrefillPlanes(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile0,
                      const float* bias, float* Y) {
  const int64_t tile_bytes = p.num_blocks * (p.block_padded / 8) * 128;
  const uint8_t* bytes = PrefillBytes(p);
  TileCodes<T> codes = PackedTileCodes<T>(p, tile0);
  for (int t = 0; t < T; ++t) {
    codes.codes[t] = bytes + (tile0 + t) * tile_bytes;
    codes.code_stride[t] = tile_bytes / p.num_blocks;  // the block parameters stay where the packed stream has them
  }
  BalancedRowBlocks<kIntRows>(row_begin, row_end, IntPrefillBody<T, false, kZp>{p, codes, act, tile0, bias, Y});
}

template <int T, bool kNibble, int kZp>
void IntPrefill(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile0,
                const float* bias, float* Y) {
  if constexpr (kNibble) {
    if (p.high_planes > 0) return IntPrefillPlanes<T, kZp>(p, act, row_begin, row_end, tile0, bias, Y);
  }
  const TileCodes<T> codes = PackedTileCodes<T>(p, tile0);
  BalancedRowBlocks<kIntRows>(row_begin, row_end, IntPrefillBody<T, kNibble, kZp>{p, codes, act, tile0, bias, Y});
}

template <int T, bool kNibble, int kZp>
void FloatPrefill(const PackedWeights& p, const float* a_padded, int64_t row_begin, int64_t row_end, int64_t tile0,
                  const float* bias, float* Y) {
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(T * p.k_padded * 16));
  for (int t = 0; t < T; ++t) DequantizeTile<kNibble, kZp>(p, tile0 + t, scratch.data() + t * p.k_padded * 16);
  BalancedRowBlocks<kFloatRows>(row_begin, row_end, FloatPrefillBody<T>{p, scratch.data(), a_padded, tile0, bias, Y});
}

template <bool kNibble, int kZp>
void RunTiles(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  int64_t t = tile_begin;
  if (act) {
    for (; t + 4 <= tile_end; t += 4) IntPrefill<4, kNibble, kZp>(p, *act, row_begin, row_end, t, bias, Y);
    for (; t + 2 <= tile_end; t += 2) IntPrefill<2, kNibble, kZp>(p, *act, row_begin, row_end, t, bias, Y);
    if (t < tile_end) IntPrefill<1, kNibble, kZp>(p, *act, row_begin, row_end, t, bias, Y);
    return;
  }
  for (; t + 2 <= tile_end; t += 2) FloatPrefill<2, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
  if (t < tile_end) FloatPrefill<1, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
}

}  // namespace

void TilesAvx512(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
                 int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  if (row_end - row_begin < (act ? kIntPrefillRows : kFloatPrefillRows)) {
    return DecodeTilesAvx512(p, act, a_padded, row_begin, row_end, tile_begin, tile_end, bias, Y);
  }
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
