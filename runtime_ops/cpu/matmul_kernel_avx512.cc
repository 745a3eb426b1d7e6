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
// GCC 12 warns about _mm512_undefined_* inside its own intrinsics (the reduces; _mm512_cvtepi32_ps once
// ScaleBlockInto is inlined here).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
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
constexpr int kFloatRows = 8;         // register block of the float prefill kernel (8 x 2 tiles)

// Integer prefill on nibble codes (bits <= 4). The register block is kIntRows rows x 2 tiles: vpdpbusd
// issues twice a cycle here, on the two ports that also run every other vector op, so each op that is
// not a dot product costs one; 8 rows share each tile's nibble unpack (an and and a shift-and, or one
// GFNI op, per 64 bytes: at most 0.75 ops an output vector and block of 32, against 3 at 4 rows x 4
// tiles), and the block epilogue (cvt, mul, fma per row and tile, the spec's order) stays. The kernel
// reads the weights through one pointer (a panel's tiles sit a fixed stride apart, their block
// parameters after them) and the activations of its rows from a copy interleaved per group of 4 k
// (PackedActs): the whole block is addressed from three registers. The codes are read as packed:
// 4-bit codes expanded to bytes (no unpack) ran 10-15% faster on one product whose weights stay in
// cache, but no faster in a model, where each product reads its weights from memory (twice as many
// bytes). Byte codes (6..8 bits, and 5-bit codes with a high bit plane, expanded once per weight by
// PrefillBytes) have no unpack to share: they keep the 4-row x 4-tile IntTiles kernel (BytePrefill),
// which ran 3-5% faster on them than this one (BERT-base's and MiniLM's 5-bit products).
constexpr int kIntRows = 8;

// The expanded copy of nibbles with high bit planes: panels of the packed layout's tiles, per block the
// tiles' byte codes (block_padded * 16 bytes each) then the block parameters copied from the stream.
inline int64_t ExpandedPanelBlockBytes(const PackedWeights& p, int64_t tile) {
  const int64_t tiles = TilesInPanel(p, tile);
  return tiles * p.block_padded * 16 + (tiles * p.param_bytes + 63) / 64 * 64;
}
inline int64_t ExpandedOffset(const PackedWeights& p, int64_t tile, int64_t block) {
  const int64_t panel = tile >> p.panel_shift, in_panel = tile & (p.panel_tiles - 1);
  const int64_t full = p.panel_tiles * p.block_padded * 16 + (p.panel_tiles * p.param_bytes + 63) / 64 * 64;
  return panel * p.num_blocks * full + block * ExpandedPanelBlockBytes(p, tile) + in_panel * p.block_padded * 16;
}

// Nibble codes with high bit planes (5-bit weights, matmul_kernel.h) expanded into byte storage once
// per weight, on the first prefill call (p.prefill_bytes): the low and the high
// nibbles of each group of 8 k, plane bits added as the decode kernels add them, are the two byte
// groups of those 8 k, so the byte kernel sees the same integer codes.
const uint8_t* PrefillBytes(const PackedWeights& p) {
  std::call_once(p.prefill_bytes_once, [&p] {
    const int64_t nb = p.num_blocks, groups = p.block_padded / 8;
    const int64_t last_panel = (p.num_tiles - 1) >> p.panel_shift << p.panel_shift;
    p.prefill_bytes.assign(static_cast<size_t>(ExpandedOffset(p, last_panel, 0) + nb * ExpandedPanelBlockBytes(p, last_panel)), 0);
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t tile = 0; tile < p.num_tiles; ++tile) {
      const int64_t in_panel = tile & (p.panel_tiles - 1), tiles = TilesInPanel(p, tile);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = BlockCodes(p, tile, b);
        uint8_t* dst = p.prefill_bytes.data() + ExpandedOffset(p, tile, b);
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
        if (in_panel == 0) {  // the panel's block parameters, after its tiles' codes
          std::memcpy(dst + tiles * p.block_padded * 16, BlockParams(p, tile, b),
                      static_cast<size_t>(tiles * p.param_bytes));
        }
      }
    }
  });
  return p.prefill_bytes.data();
}


// The activations of up to kIntRows rows interleaved for the kernel: the codes of group g (4 k) of
// block b of row r at codes[(b * groups + g) * kIntRows + r], per block and row the a_scale, the
// symmetric-weight correction and the code sum (ActRows' values).
struct PackedActs {
  std::vector<int32_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> corr;
  std::vector<float> sums;
};

// Groups [i0, i0 + 16) of 8 rows (row r at rows[r]) interleaved into out[(i0 + i) * 8 + r]: an 8 x 16
// transpose of 4-byte groups in registers (unpacks of 32 and 64 bits, then 128-bit lanes), 40 ops
// where the scalar copy takes 128 loads and stores.
inline void InterleaveGroups8x16(const int8_t* const (&rows)[kIntRows], int64_t i0, int32_t* out) {
  __m512i v[kIntRows], a[kIntRows], b[kIntRows];
  for (int r = 0; r < kIntRows; ++r) v[r] = _mm512_loadu_si512(rows[r] + i0 * 4);
  for (int r = 0; r < kIntRows; r += 2) {  // lane l: [v_r[4l], v_r+1[4l], v_r[4l+1], v_r+1[4l+1]], then 4l+2, 4l+3
    a[r] = _mm512_unpacklo_epi32(v[r], v[r + 1]);
    a[r + 1] = _mm512_unpackhi_epi32(v[r], v[r + 1]);
  }
  for (int h = 0; h < kIntRows; h += 4) {  // b[h + c], lane l: group 4l + c of rows h..h+3
    b[h + 0] = _mm512_unpacklo_epi64(a[h], a[h + 2]);
    b[h + 1] = _mm512_unpackhi_epi64(a[h], a[h + 2]);
    b[h + 2] = _mm512_unpacklo_epi64(a[h + 1], a[h + 3]);
    b[h + 3] = _mm512_unpackhi_epi64(a[h + 1], a[h + 3]);
  }
  // output vector j: groups 2j and 2j + 1 = 4l + c, 4l + c + 1 (l = j / 2, c = 2 (j % 2)), rows 0..7 each
  const __mmask8 odd_lanes = 0xcc;
#define BCT_INTERLEAVE_OUT(j, l, c)                                                                          \
  _mm512_storeu_si512(out + (i0 + 2 * (j)) * kIntRows,                                                     \
                      _mm512_mask_blend_epi64(                                                             \
                          odd_lanes, _mm512_shuffle_i32x4(b[c], b[(c) + 1], _MM_SHUFFLE(l, l, l, l)),      \
                          _mm512_shuffle_i32x4(b[4 + (c)], b[5 + (c)], _MM_SHUFFLE(l, l, l, l))))
  BCT_INTERLEAVE_OUT(0, 0, 0);
  BCT_INTERLEAVE_OUT(1, 0, 2);
  BCT_INTERLEAVE_OUT(2, 1, 0);
  BCT_INTERLEAVE_OUT(3, 1, 2);
  BCT_INTERLEAVE_OUT(4, 2, 0);
  BCT_INTERLEAVE_OUT(5, 2, 2);
  BCT_INTERLEAVE_OUT(6, 3, 0);
  BCT_INTERLEAVE_OUT(7, 3, 2);
#undef BCT_INTERLEAVE_OUT
}

void PackActs(const PackedWeights& p, const ActRows& act, int64_t row0, int64_t rows, PackedActs* out) {
  const int64_t nb = p.num_blocks, groups = p.block_padded / 4, kp = p.k_padded;
  out->codes.resize(static_cast<size_t>(nb * groups * kIntRows));
  out->scales.resize(static_cast<size_t>(nb * kIntRows));
  out->corr.resize(static_cast<size_t>(nb * kIntRows));
  out->sums.resize(static_cast<size_t>(nb * kIntRows));
  int64_t first_scalar = 0;  // groups from here on are copied one by one
  if (rows == kIntRows) {
    const int8_t* row_codes[kIntRows];
    for (int r = 0; r < kIntRows; ++r) row_codes[r] = act.codes.data() + (row0 + r) * kp;
    for (; first_scalar + 16 <= nb * groups; first_scalar += 16) {
      InterleaveGroups8x16(row_codes, first_scalar, out->codes.data());
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = act.codes.data() + (row0 + r) * kp;
    for (int64_t i = first_scalar; i < nb * groups; ++i) out->codes[i * kIntRows + r] = Load32(row + i * 4);
    for (int64_t b = 0; b < nb; ++b) {
      out->scales[b * kIntRows + r] = act.scales[(row0 + r) * nb + b];
      out->corr[b * kIntRows + r] = act.corr[(row0 + r) * nb + b];
      out->sums[b * kIntRows + r] = act.sums[(row0 + r) * nb + b];
    }
  }
}

// The high nibble of each byte, as a byte: one vgf2p8affineqb (GFNI; only when p.gfni) with the matrix
// whose output bit i (i < 4) is input bit i + 4, for the shift and the and. Inline assembly, so the
// file needs no GFNI target (nothing else here may use it).
inline __m512i HighNibbles(__m512i raw) {
  const __m512i matrix = _mm512_set1_epi64(0x1020408000000000LL);
  __m512i out;
  __asm__("vgf2p8affineqb $0, %2, %1, %0" : "=v"(out) : "v"(raw), "v"(matrix));
  return out;
}

// R rows (R <= kIntRows) x T tiles of Y from nibble codes; kGroups: groups of 4 k per block when known
// at compile time, else 0; kGfni: high nibbles by HighNibbles. Per block the integer dot products,
// then the epilogue of IntTiles (the same operations in the same order, so the same bits).
template <int R, int T, int kZp, int kGroups, bool kGfni>
void PrefillKernel(const PackedWeights& p, const PrefillView& w, const PackedActs& a, int64_t row0, int64_t tile0,
                   const float* bias, float* Y) {
  const int64_t nb = p.num_blocks, groups = kGroups ? kGroups : p.block_padded / 4;
  const int64_t ts = w.tile_stride, stride = w.block_stride, param_bytes = p.param_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  constexpr bool kFaccInMemory = R * T > 12;
  alignas(64) float fmem[kFaccInMemory ? R * T * 16 : 16];
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      facc[r][t] = _mm512_setzero_ps();
      if (kFaccInMemory) _mm512_store_ps(fmem + (r * T + t) * 16, facc[r][t]);
    }
  const int32_t* ac = a.codes.data();
  const uint8_t* wb = w.codes;
  const uint8_t* pb = w.params;
  for (int64_t b = 0; b < nb; ++b, ac += groups * kIntRows, wb += stride, pb += stride) {
    __m512i acc[R][T];
    for (int r = 0; r < R; ++r) {
      const __m512i init = kZp == kZpSymmetric ? _mm512_set1_epi32(a.corr[b * kIntRows + r]) : _mm512_setzero_si512();
      for (int t = 0; t < T; ++t) acc[r][t] = init;
    }
    // 8 k a group: the low nibbles hold 4 k, the high ones the next 4
#pragma GCC unroll 8
    for (int64_t g = 0; g < groups / 2; ++g) {
      __m512i lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const __m512i raw = _mm512_loadu_si512(wb + t * ts + g * 64);
        lo[t] = _mm512_and_si512(raw, low4);
        hi[t] = kGfni ? HighNibbles(raw) : _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i a0 = _mm512_set1_epi32(ac[2 * g * kIntRows + r]);
        const __m512i a1 = _mm512_set1_epi32(ac[(2 * g + 1) * kIntRows + r]);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], a0);
          acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi[t], a1);
        }
      }
    }
    __m512 ws[T], zw[T];
    for (int t = 0; t < T; ++t) {
      ws[t] = LoadWeightScales(p, pb + t * param_bytes);
      if (kZp != kZpSymmetric) zw[t] = LoadZw<kZp>(p, pb + t * param_bytes);
    }
    ScaleBlockInto<R, T, kZp, kFaccInMemory>(acc, ws, zw, a.scales.data() + b * kIntRows,
                                             a.sums.data() + b * kIntRows, 1, facc, fmem);
  }
  if (kFaccInMemory) {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) facc[r][t] = _mm512_load_ps(fmem + (r * T + t) * 16);
  }
  StoreTiles<R, T>(p, facc, row0, tile0, bias, Y);
}

template <int R, int T, int kZp, bool kGfni>
void PrefillKernelGroups(const PackedWeights& p, const PrefillView& w, const PackedActs& a, int64_t row0,
                         int64_t tile0, const float* bias, float* Y) {
  switch (p.block_padded / 4) {
    case 8:
      return PrefillKernel<R, T, kZp, 8, kGfni>(p, w, a, row0, tile0, bias, Y);
    case 16:
      return PrefillKernel<R, T, kZp, 16, kGfni>(p, w, a, row0, tile0, bias, Y);
    default:
      return PrefillKernel<R, T, kZp, 0, kGfni>(p, w, a, row0, tile0, bias, Y);
  }
}

template <int T, int kZp>
struct IntPrefillBody {
  const PackedWeights& p;
  const PrefillView& w;
  const PackedActs& a;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const {
    if (p.gfni) return PrefillKernelGroups<R, T, kZp, true>(p, w, a, r, tile0, bias, Y);
    PrefillKernelGroups<R, T, kZp, false>(p, w, a, r, tile0, bias, Y);
  }
};

// Rows [row_begin, row_end) x tiles [tile_begin, tile_end) (whole panels, or the tiles of one): the
// rows in nearly equal register blocks of at most kIntRows, each block's activations interleaved once,
// then tile pair after tile pair, every row block against the pair's codes (from L1 or L2).
template <int kZp>
void IntPrefill(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile_begin,
                int64_t tile_end, const float* bias, float* Y) {
  constexpr int64_t kMaxRows = 64;  // rows whose activations are interleaved at once
  if (row_end - row_begin > kMaxRows) {
    for (int64_t r = row_begin; r < row_end; r += kMaxRows) {
      IntPrefill<kZp>(p, act, r, std::min(row_end, r + kMaxRows), tile_begin, tile_end, bias, Y);
    }
    return;
  }
  const int64_t n = row_end - row_begin, blocks = (n + kIntRows - 1) / kIntRows;
  const int64_t base = n / blocks, extra = n % blocks;
  thread_local std::vector<PackedActs> packs;
  if (static_cast<int64_t>(packs.size()) < blocks) packs.resize(static_cast<size_t>(blocks));
  int64_t first[kMaxRows / kIntRows], count[kMaxRows / kIntRows];
  for (int64_t i = 0, r = row_begin; i < blocks; ++i) {
    count[i] = base + (i < extra ? 1 : 0);
    first[i] = r;
    PackActs(p, act, r, count[i], &packs[static_cast<size_t>(i)]);
    r += count[i];
  }
  for (int64_t t = tile_begin; t < tile_end;) {
    const int64_t in_panel = t & (p.panel_tiles - 1);
    const bool pair = t + 1 < tile_end && in_panel + 1 < TilesInPanel(p, t);
    const PrefillView w = PrefillTiles(p, t);
    for (int64_t i = 0; i < blocks; ++i) {
      const PackedActs& a = packs[static_cast<size_t>(i)];
      if (pair) {
        RunRowBlock<kIntRows>(count[i], first[i], IntPrefillBody<2, kZp>{p, w, a, t, bias, Y});
      } else {
        RunRowBlock<kIntRows>(count[i], first[i], IntPrefillBody<1, kZp>{p, w, a, t, bias, Y});
      }
    }
    t += pair ? 2 : 1;
  }
}

template <int T, bool kNibble, int kZp>
void FloatPrefill(const PackedWeights& p, const float* a_padded, int64_t row_begin, int64_t row_end, int64_t tile0,
                  const float* bias, float* Y) {
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(T * p.k_padded * 16));
  for (int t = 0; t < T; ++t) DequantizeTile<kNibble, kZp>(p, tile0 + t, scratch.data() + t * p.k_padded * 16);
  BalancedRowBlocks<kFloatRows>(row_begin, row_end, FloatPrefillBody<T>{p, scratch.data(), a_padded, tile0, bias, Y});
}

// Byte codes (packed 6..8-bit ones, or the expanded copy of 5-bit nibbles with a high bit plane):
// register blocks of up to 4 rows x T tiles of one panel on IntTiles (main's kernel, read from cache
// for every block of rows), rows split into nearly equal blocks.
template <int T, int kZp>
struct BytePrefillBody {
  const PackedWeights& p;
  const TileCodes<T>& codes;
  const ActRows& act;
  int64_t tile0;
  const float* bias;
  float* Y;
  template <int R>
  void Run(int64_t r) const { IntTilesAnyGroups<R, T, false, kZp, false>(p, codes, act, r, tile0, bias, Y); }
};

template <int T, int kZp>
void BytePrefill(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile0,
                 const float* bias, float* Y) {
  const PrefillView w = PrefillTiles(p, tile0);
  TileCodes<T> codes;
  for (int t = 0; t < T; ++t) {
    codes.codes[t] = w.codes + t * w.tile_stride;
    codes.params[t] = w.params + t * p.param_bytes;
    codes.code_stride[t] = codes.param_stride[t] = w.block_stride;
  }
  BalancedRowBlocks<4>(row_begin, row_end, BytePrefillBody<T, kZp>{p, codes, act, tile0, bias, Y});
}

template <bool kNibble, int kZp>
void RunTiles(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  int64_t t = tile_begin;
  if (act) {
    if (kNibble && p.high_planes == 0) return IntPrefill<kZp>(p, *act, row_begin, row_end, tile_begin, tile_end, bias, Y);
    while (t < tile_end) {  // byte codes: up to 4 tiles of one panel at a time
      const int64_t left = std::min(tile_end - t, TilesInPanel(p, t) - (t & (p.panel_tiles - 1)));
      if (left >= 4) {
        BytePrefill<4, kZp>(p, *act, row_begin, row_end, t, bias, Y);
        t += 4;
      } else if (left >= 2) {
        BytePrefill<2, kZp>(p, *act, row_begin, row_end, t, bias, Y);
        t += 2;
      } else {
        BytePrefill<1, kZp>(p, *act, row_begin, row_end, t, bias, Y);
        t += 1;
      }
    }
    return;
  }
  for (; t + 2 <= tile_end; t += 2) FloatPrefill<2, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
  if (t < tile_end) FloatPrefill<1, kNibble, kZp>(p, a_padded, row_begin, row_end, t, bias, Y);
}

}  // namespace

PrefillView PrefillTiles(const PackedWeights& p, int64_t tile0) {
  if (p.high_planes == 0) {
    return {BlockCodes(p, tile0, 0), BlockParams(p, tile0, 0), PanelBlockBytes(p, tile0), p.block_code_bytes};
  }
  const uint8_t* bytes = PrefillBytes(p);
  const int64_t tiles = TilesInPanel(p, tile0), in_panel = tile0 & (p.panel_tiles - 1);
  const uint8_t* codes = bytes + ExpandedOffset(p, tile0, 0);
  const uint8_t* params = codes + (tiles - in_panel) * p.block_padded * 16 + in_panel * p.param_bytes;
  return {codes, params, ExpandedPanelBlockBytes(p, tile0), p.block_padded * 16};
}

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
