// The row loops of every path: baseline (SSE2), AVX2 and AVX-512 functions (target attributes,
// chosen at run time through Kernels(isa), cpu/kernel_table.h), and the AVX-512 activation quantizer.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernel_table.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the row loops assume a little-endian host");

#if defined(__SSE2__)
#include <emmintrin.h>
#define BCT_SSE2 1
#else
#define BCT_SSE2 0
#endif

#if BCT_X86_SIMD
#include <immintrin.h>
// GCC 12 warns about the undefined vector behind masked loads (_mm512_maskz_*); nothing reads it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace bct {
namespace cpu {
namespace {

// Generic: any bits, any block position. out[i] = (code_i - zp) * scale. Eight codes starting at a
// multiple of 8 fill exactly `bits` bytes, so the middle of the span is decoded 8 codes per 64-bit load.
inline void DequantizeSpanGeneric(const uint8_t* codes, int64_t row_nbytes, int bits, int64_t begin, int64_t end,
                                  float zero_point, float scale, float* out) {
  int64_t i = begin;
  for (; i < end && (i & 7) != 0; ++i) out[i] = value_of(get_code(codes, i, bits, row_nbytes), zero_point, scale);
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  for (; i + 8 <= end; i += 8) {
    const int64_t byte = (i >> 3) * bits;
    uint64_t word = 0;
    if (byte + 8 <= row_nbytes) {
      std::memcpy(&word, codes + byte, 8);  // little-endian hosts (x86-64, aarch64)
    } else {
      for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(codes[byte + k]) << (8 * k);
    }
    for (int k = 0; k < 8; ++k) {
      out[i + k] = value_of(static_cast<uint32_t>((word >> (k * bits)) & mask), zero_point, scale);
    }
  }
  for (; i < end; ++i) out[i] = value_of(get_code(codes, i, bits, row_nbytes), zero_point, scale);
}

#if BCT_SSE2
// 16 codes (as bytes c0..c15) -> 16 floats (c - zp) * scale, stored at out.
inline void Store16(__m128i bytes, __m128 zp, __m128 scale, float* out) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i lo16 = _mm_unpacklo_epi8(bytes, zero);
  const __m128i hi16 = _mm_unpackhi_epi8(bytes, zero);
  const __m128 f0 = _mm_cvtepi32_ps(_mm_unpacklo_epi16(lo16, zero));
  const __m128 f1 = _mm_cvtepi32_ps(_mm_unpackhi_epi16(lo16, zero));
  const __m128 f2 = _mm_cvtepi32_ps(_mm_unpacklo_epi16(hi16, zero));
  const __m128 f3 = _mm_cvtepi32_ps(_mm_unpackhi_epi16(hi16, zero));
  _mm_storeu_ps(out + 0, _mm_mul_ps(_mm_sub_ps(f0, zp), scale));
  _mm_storeu_ps(out + 4, _mm_mul_ps(_mm_sub_ps(f1, zp), scale));
  _mm_storeu_ps(out + 8, _mm_mul_ps(_mm_sub_ps(f2, zp), scale));
  _mm_storeu_ps(out + 12, _mm_mul_ps(_mm_sub_ps(f3, zp), scale));
}
#endif

// 8 bits: code i is byte i.
inline void DequantizeSpan8(const uint8_t* codes, int64_t begin, int64_t end, float zero_point, float scale,
                            float* out) {
  int64_t i = begin;
#if BCT_SSE2
  const __m128 zp = _mm_set1_ps(zero_point);
  const __m128 sc = _mm_set1_ps(scale);
  for (; i + 16 <= end; i += 16) {
    Store16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)), zp, sc, out + i);
  }
#endif
  for (; i < end; ++i) out[i] = value_of(codes[i], zero_point, scale);
}

// 4 bits, begin even: byte j holds code 2j (low nibble) and 2j+1 (high nibble).
inline void DequantizeSpan4(const uint8_t* codes, int64_t begin, int64_t end, float zero_point, float scale,
                            float* out) {
  int64_t i = begin;
#if BCT_SSE2
  const __m128 zp = _mm_set1_ps(zero_point);
  const __m128 sc = _mm_set1_ps(scale);
  const __m128i mask = _mm_set1_epi8(0x0f);
  for (; i + 16 <= end; i += 16) {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2));
    const __m128i lo = _mm_and_si128(packed, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    Store16(_mm_unpacklo_epi8(lo, hi), zp, sc, out + i);
  }
#endif
  for (; i + 2 <= end; i += 2) {
    const uint8_t byte = codes[i / 2];
    out[i] = value_of(byte & 0x0fu, zero_point, scale);
    out[i + 1] = value_of(byte >> 4, zero_point, scale);
  }
  if (i < end) out[i] = value_of(codes[i / 2] & 0x0fu, zero_point, scale);
}

#if BCT_X86_SIMD
// AVX2 (no FMA: a separate subtract and multiply, exactly as value_of) versions of the two fast
// paths; 32 codes per iteration.
__attribute__((target("avx2"), always_inline)) inline void Store8x4(__m128i bytes16, __m256 zp, __m256 scale, float* out) {
  const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes16));
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes16, 8)));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(f0, zp), scale));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_sub_ps(f1, zp), scale));
}

__attribute__((target("avx2"), always_inline)) inline void DequantizeSpan8Avx2(const uint8_t* codes, int64_t begin, int64_t end,
                                                         float zero_point, float scale, float* out) {
  int64_t i = begin;
  const __m256 zp = _mm256_set1_ps(zero_point);
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 16 <= end; i += 16) {
    Store8x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)), zp, sc, out + i);
  }
  for (; i < end; ++i) out[i] = value_of(codes[i], zero_point, scale);
}

__attribute__((target("avx2"), always_inline)) inline void DequantizeSpan4Avx2(const uint8_t* codes, int64_t begin, int64_t end,
                                                         float zero_point, float scale, float* out) {
  int64_t i = begin;
  const __m256 zp = _mm256_set1_ps(zero_point);
  const __m256 sc = _mm256_set1_ps(scale);
  const __m128i mask = _mm_set1_epi8(0x0f);
  for (; i + 32 <= end; i += 32) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2));
    const __m128i lo = _mm_and_si128(packed, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    Store8x4(_mm_unpacklo_epi8(lo, hi), zp, sc, out + i);
    Store8x4(_mm_unpackhi_epi8(lo, hi), zp, sc, out + i + 16);
  }
  DequantizeSpan4(codes, i, end, zero_point, scale, out);
}

// Odd widths: eight codes starting at a multiple of 8 fill `bits` bytes; one 64-bit word is split
// into eight 32-bit lanes by variable shifts.
__attribute__((target("avx2"))) void DequantizeSpanGenericAvx2(const uint8_t* codes, int64_t row_nbytes,
                                                               int bits, int64_t begin, int64_t end,
                                                               float zero_point, float scale, float* out) {
  int64_t i = begin;
  for (; i < end && (i & 7) != 0; ++i) out[i] = value_of(get_code(codes, i, bits, row_nbytes), zero_point, scale);
  const __m256i shifts_lo = _mm256_setr_epi64x(0, bits, 2 * bits, 3 * bits);
  const __m256i shifts_hi = _mm256_setr_epi64x(4 * bits, 5 * bits, 6 * bits, 7 * bits);
  const __m256i mask = _mm256_set1_epi64x((int64_t{1} << bits) - 1);
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256 zp = _mm256_set1_ps(zero_point);
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 8 <= end; i += 8) {
    const int64_t byte = (i >> 3) * bits;
    uint64_t word = 0;
    if (byte + 8 <= row_nbytes) {
      std::memcpy(&word, codes + byte, 8);
    } else {
      for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(codes[byte + k]) << (8 * k);
    }
    const __m256i w = _mm256_set1_epi64x(static_cast<int64_t>(word));
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi64(w, shifts_lo), mask);  // codes 0..3 in 64-bit lanes
    const __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(w, shifts_hi), mask);  // codes 4..7
    const __m256i pairs = _mm256_or_si256(lo, _mm256_slli_epi64(hi, 32));         // c0 c4 c1 c5 c2 c6 c3 c7
    const __m256 f = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(pairs, order));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(f, zp), sc));
  }
  for (; i < end; ++i) out[i] = value_of(get_code(codes, i, bits, row_nbytes), zero_point, scale);
}

#endif

// Float scales and zero points of blocks [b0, b0 + n) of a row.
inline void BlockParams(const RowFormat& fmt, const void* scales, const uint8_t* zero_points, int64_t b0, int64_t n,
                        float* scale_out, float* zp_out) {
  switch (fmt.scale_kind) {
    case ScaleKind::kFloat16: {
      const auto* p = static_cast<const uint16_t*>(scales) + b0;
      for (int64_t k = 0; k < n; ++k) scale_out[k] = float_from_half(p[k]);
      break;
    }
    case ScaleKind::kFloat32:
      std::memcpy(scale_out, static_cast<const float*>(scales) + b0, static_cast<size_t>(n) * sizeof(float));
      break;
    case ScaleKind::kFloat8E5M2: {
      const auto* p = static_cast<const uint8_t*>(scales) + b0;
      for (int64_t k = 0; k < n; ++k) scale_out[k] = float_from_e5m2(p[k]);
      break;
    }
    default: {
      const auto* p = static_cast<const uint8_t*>(scales) + b0;
      for (int64_t k = 0; k < n; ++k) scale_out[k] = pow2_scale(p[k]);
      break;
    }
  }
  if (fmt.symmetric) {
    const float implicit = implicit_zero_point(fmt.bits);
    for (int64_t k = 0; k < n; ++k) zp_out[k] = implicit;
  } else {
    for (int64_t k = 0; k < n; ++k) zp_out[k] = static_cast<float>(zero_points[b0 + k]);
  }
}

// The elements [begin, end) of a chunk of blocks starting at `begin`, block by block.
#define BCT_FOR_BLOCKS_OF_CHUNK(SPAN)                                              \
  int64_t k = 0;                                                                   \
  for (int64_t block_begin = begin; block_begin < end; block_begin += block_size, ++k) { \
    const int64_t block_end = std::min(end, block_begin + block_size);             \
    SPAN(codes, block_begin, block_end, zps[k], scales[k], out);                   \
  }

inline void Chunk8(const uint8_t* codes, int64_t begin, int64_t end, int64_t block_size, const float* scales,
                   const float* zps, float* out) {
  BCT_FOR_BLOCKS_OF_CHUNK(DequantizeSpan8)
}

inline void Chunk4(const uint8_t* codes, int64_t begin, int64_t end, int64_t block_size, const float* scales,
                   const float* zps, float* out) {
  BCT_FOR_BLOCKS_OF_CHUNK(DequantizeSpan4)
}

#if BCT_X86_SIMD
__attribute__((target("avx2"))) void Chunk8Avx2(const uint8_t* codes, int64_t begin, int64_t end,
                                                int64_t block_size, const float* scales, const float* zps,
                                                float* out) {
  BCT_FOR_BLOCKS_OF_CHUNK(DequantizeSpan8Avx2)
}

__attribute__((target("avx2"))) void Chunk4Avx2(const uint8_t* codes, int64_t begin, int64_t end,
                                                int64_t block_size, const float* scales, const float* zps,
                                                float* out) {
  if (block_size % 32 == 0) {  // the common case: whole blocks are whole 32-code steps, no tails
    const __m128i mask = _mm_set1_epi8(0x0f);
    int64_t k = 0;
    int64_t block_begin = begin;
    for (; block_begin + block_size <= end; block_begin += block_size, ++k) {
      const __m256 zp = _mm256_set1_ps(zps[k]);
      const __m256 sc = _mm256_set1_ps(scales[k]);
      for (int64_t i = block_begin; i < block_begin + block_size; i += 32) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2));
        const __m128i lo = _mm_and_si128(packed, mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        Store8x4(_mm_unpacklo_epi8(lo, hi), zp, sc, out + i);
        Store8x4(_mm_unpackhi_epi8(lo, hi), zp, sc, out + i + 16);
      }
    }
    if (block_begin < end) DequantizeSpan4Avx2(codes, block_begin, end, zps[k], scales[k], out);
    return;
  }
  BCT_FOR_BLOCKS_OF_CHUNK(DequantizeSpan4Avx2)
}
#endif
#undef BCT_FOR_BLOCKS_OF_CHUNK

}  // namespace

namespace {

// Float-offset blocks: u * scale + offset per element (block_math.h's value_with_offset; the build
// forbids FMA contraction, so the compiler's vectorised loops round the same way).
void DequantizeRowWithOffsets(const RowFormat& fmt, const uint8_t* codes, const void* scales, const void* offsets,
                              float* out) {
  uint8_t unpacked[256];
  for (int64_t b = 0; b < fmt.num_blocks; ++b) {
    const float scale = scale_value(fmt.scale_kind, scales, b);
    const float offset = offset_value(fmt.zero_point_kind, offsets, b);
    for (int64_t begin = b * fmt.block_size, block_end = std::min(fmt.axis_size, begin + fmt.block_size);
         begin < block_end; begin += 256) {
      const int64_t end = std::min(block_end, begin + 256);
      const int64_t n = end - begin;
      if (fmt.bits == 8) {
        std::memcpy(unpacked, codes + begin, static_cast<size_t>(n));
      } else if (fmt.bits == 4 && (begin & 1) == 0) {
        for (int64_t i = 0; i < n; ++i) unpacked[i] = (codes[(begin + i) >> 1] >> (((begin + i) & 1) * 4)) & 0x0f;
      } else {
        for (int64_t i = 0; i < n; ++i) {
          unpacked[i] = static_cast<uint8_t>(get_code(codes, begin + i, fmt.bits, fmt.row_bytes));
        }
      }
      float* dst = out + begin;
      for (int64_t i = 0; i < n; ++i) dst[i] = value_with_offset(unpacked[i], scale, offset);
    }
  }
}

// One row; avx2: the AVX2 spans (the caller checked the CPU).
void DequantizeRowOn(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                     float* out, bool avx2) {
  if (!fmt.symmetric && fmt.zero_point_kind != ZeroPointKind::kInteger) {
    DequantizeRowWithOffsets(fmt, codes, scales, zero_points, out);
    return;
  }
  // Blocks are decoded in chunks: first their scales and zero points as floats (the per-block
  // work, hoisted out of the element loops), then the elements of the whole chunk in one loop nest.
  constexpr int64_t kChunk = 256;
  float scale_buf[kChunk];
  float zp_buf[kChunk];
  const bool fast4 = fmt.bits == 4 && fmt.block_size % 2 == 0;
#if !BCT_X86_SIMD
  (void)avx2;
#endif
  for (int64_t b0 = 0; b0 < fmt.num_blocks; b0 += kChunk) {
    const int64_t n = std::min(kChunk, fmt.num_blocks - b0);
    BlockParams(fmt, scales, zero_points, b0, n, scale_buf, zp_buf);
    const int64_t begin = b0 * fmt.block_size;
    const int64_t end = std::min(fmt.axis_size, (b0 + n) * fmt.block_size);
    if (fmt.bits == 8) {
#if BCT_X86_SIMD
      if (avx2) {
        Chunk8Avx2(codes, begin, end, fmt.block_size, scale_buf, zp_buf, out);
        continue;
      }
#endif
      Chunk8(codes, begin, end, fmt.block_size, scale_buf, zp_buf, out);
    } else if (fast4) {
#if BCT_X86_SIMD
      if (avx2) {
        Chunk4Avx2(codes, begin, end, fmt.block_size, scale_buf, zp_buf, out);
        continue;
      }
#endif
      Chunk4(codes, begin, end, fmt.block_size, scale_buf, zp_buf, out);
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const int64_t block_begin = begin + k * fmt.block_size;
        const int64_t block_end = std::min(end, block_begin + fmt.block_size);
#if BCT_X86_SIMD
        if (avx2) {
          DequantizeSpanGenericAvx2(codes, fmt.row_bytes, fmt.bits, block_begin, block_end, zp_buf[k], scale_buf[k],
                                    out);
          continue;
        }
#endif
        DequantizeSpanGeneric(codes, fmt.row_bytes, fmt.bits, block_begin, block_end, zp_buf[k], scale_buf[k], out);
      }
    }
  }
}

// Block scale search, vectorised where the data has no NaN (NaN blocks take the exact scalar rule).
inline StoredScale SymmetricScale(const float* x, int64_t n, int bits, ScaleKind kind) {
#if BCT_SSE2
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m128 vmax = _mm_setzero_ps();
  __m128 vnan = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 a = _mm_and_ps(_mm_loadu_ps(x + i), abs_mask);
    vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(a, a));
    vmax = _mm_max_ps(vmax, a);
  }
  float lanes[4];
  _mm_storeu_ps(lanes, vmax);
  float amax = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  bool has_nan = _mm_movemask_ps(vnan) != 0;
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    has_nan |= is_nan(a);
    amax = a > amax ? a : amax;
  }
  if (has_nan) return choose_symmetric_scale(x, n, bits, kind);
  int64_t first = 0;
  while (std::fabs(x[first]) != amax) ++first;  // the first element of largest magnitude
  return symmetric_scale_of_extreme(x[first], bits, kind);
#else
  return choose_symmetric_scale(x, n, bits, kind);
#endif
}

inline StoredScale AsymmetricScale(const float* x, int64_t n, int bits, ScaleKind kind, uint8_t* zero_point) {
#if BCT_SSE2
  __m128 vmin = _mm_setzero_ps();
  __m128 vmax = _mm_setzero_ps();
  __m128 vnan = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(v, v));
    vmin = _mm_min_ps(vmin, v);
    vmax = _mm_max_ps(vmax, v);
  }
  float lo_lanes[4], hi_lanes[4];
  _mm_storeu_ps(lo_lanes, vmin);
  _mm_storeu_ps(hi_lanes, vmax);
  float lo = std::min(std::min(lo_lanes[0], lo_lanes[1]), std::min(lo_lanes[2], lo_lanes[3]));
  float hi = std::max(std::max(hi_lanes[0], hi_lanes[1]), std::max(hi_lanes[2], hi_lanes[3]));
  bool has_nan = _mm_movemask_ps(vnan) != 0;
  for (; i < n; ++i) {
    has_nan |= is_nan(x[i]);
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  // A -0.0 bound (only possible as lo or hi == 0) changes nothing: step and zero point are the same.
  if (has_nan) return choose_asymmetric_scale(x, n, bits, kind, zero_point);
  return asymmetric_scale_of_range(lo, hi, bits, kind, zero_point);
#else
  return choose_asymmetric_scale(x, n, bits, kind, zero_point);
#endif
}

// Codes of x[0..n) into out[0..n): code_of for every element, 8 at a time with SSE2 (same float
// operations: multiply, clamp, round by the 1.5 * 2**23 trick, add the zero point; NaN gives 0).
inline void BlockCodes(const float* x, int64_t n, float inv, int bits, bool symmetric, uint8_t zero_point,
                       uint8_t* out) {
  int64_t i = 0;
#if BCT_SSE2
  const float half = static_cast<float>(1 << (bits - 1));
  const float zp = symmetric ? half : static_cast<float>(zero_point);
  const float lo = symmetric ? -half : -zp;
  const float hi = symmetric ? half - 1.0f : static_cast<float>((1 << bits) - 1) - zp;
  const __m128 vinv = _mm_set1_ps(inv), vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi), vzp = _mm_set1_ps(zp);
  const __m128 magic = _mm_set1_ps(12582912.0f);
  auto codes4 = [&](const float* p) {
    __m128 q = _mm_mul_ps(_mm_loadu_ps(p), vinv);
    q = _mm_min_ps(vhi, _mm_max_ps(vlo, q));  // NaN is the second operand: it passes through
    q = _mm_sub_ps(_mm_add_ps(q, magic), magic);
    return _mm_cvttps_epi32(_mm_add_ps(q, vzp));  // NaN -> 0x80000000, which packs to 0
  };
  for (; i + 8 <= n; i += 8) {
    const __m128i words = _mm_packs_epi32(codes4(x + i), codes4(x + i + 4));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(words, words));
  }
#endif
  for (; i < n; ++i) out[i] = code_of(x[i], inv, bits, symmetric, zero_point);
}

// Packs codes[0..D) densely into row (row_bytes bytes).
inline void PackRow(const uint8_t* codes, int64_t axis_size, int bits, int64_t row_nbytes, uint8_t* row) {
  if (bits == 8) {
    std::memcpy(row, codes, static_cast<size_t>(axis_size));
    return;
  }
  int64_t i = 0;
  if (bits == 4) {
    for (; i + 2 <= axis_size; i += 2) row[i / 2] = static_cast<uint8_t>(codes[i] | (codes[i + 1] << 4));
    if (i < axis_size) row[i / 2] = codes[i];
    return;
  }
  // Eight codes fill exactly `bits` bytes.
  for (; i + 8 <= axis_size; i += 8) {
    uint64_t word = 0;
    for (int k = 0; k < 8; ++k) word |= static_cast<uint64_t>(codes[i + k]) << (k * bits);
    const int64_t byte = (i >> 3) * bits;
    for (int k = 0; k < bits; ++k) row[byte + k] = static_cast<uint8_t>(word >> (8 * k));
  }
  const int64_t tail_byte = (i >> 3) * bits;
  for (int64_t b = tail_byte; b < row_nbytes; ++b) row[b] = 0;
  for (; i < axis_size; ++i) put_code(row, i, bits, codes[i]);
}

#if BCT_X86_SIMD
// AVX-512 versions of SymmetricScale / AsymmetricScale / BlockCodes (16 lanes, masked tails): the
// same comparisons and float32 operations, so the same bits. NaN blocks take the scalar rules.
#define BCT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline

BCT_AVX512_TARGET __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// code_of for 16 lanes: multiply, clamp (NaN passes), round by the 1.5 * 2**23 trick, add the zero
// point, convert; a NaN lane converts to INT_MIN, which the max with 0 turns into code 0 (to_u8).
struct CodeParams {
  __m512 inv, lo, hi;
  __m512i zpi;
};

BCT_AVX512_TARGET CodeParams MakeCodeParams(float inv, int bits, bool symmetric, uint8_t zero_point) {
  const float half = static_cast<float>(1 << (bits - 1));
  const float zp = symmetric ? half : static_cast<float>(zero_point);
  const float lo = symmetric ? -half : -zp;
  const float hi = symmetric ? half - 1.0f : static_cast<float>((1 << bits) - 1) - zp;
  return CodeParams{_mm512_set1_ps(inv), _mm512_set1_ps(lo), _mm512_set1_ps(hi),
                    _mm512_set1_epi32(static_cast<int>(zp))};
}

BCT_AVX512_TARGET __m512i Codes16(__m512 v, const CodeParams& p) {
  __m512 q = _mm512_mul_ps(v, p.inv);
  q = _mm512_min_ps(p.hi, _mm512_max_ps(p.lo, q));  // NaN is the second operand: it passes through
  // rne(q) + zp: vcvtps2dq with round-to-nearest-even (explicit, not MXCSR) gives rne(q) of the
  // clamped q exactly, as the 1.5 * 2**23 trick does; the integer zero point added after it equals
  // the float addition of the spec (both exact). NaN converts to INT_MIN: the max with 0 makes it 0.
  const __m512i r = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_max_epi32(_mm512_add_epi32(r, p.zpi), _mm512_setzero_si512());
}

// Codes16 minus the zero point of symmetric codes: the signed code u - 2**(bits-1). The clamp keeps
// rne(q) >= -2**(bits-1), so max(rne(q) + zp, 0) - zp is max(rne(q), -zp) (a NaN lane's INT_MIN too).
BCT_AVX512_TARGET __m512i SignedCodes16(__m512 v, const CodeParams& p) {
  __m512 q = _mm512_mul_ps(v, p.inv);
  q = _mm512_min_ps(p.hi, _mm512_max_ps(p.lo, q));
  const __m512i r = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_max_epi32(r, _mm512_sub_epi32(_mm512_setzero_si512(), p.zpi));
}

// Stores the 32 codes c0 (values 0..15) and c1 (16..31) as 32 bytes, each in [-128, 127] (signed) or
// [0, 255] (kUnsigned): two saturating packs (exact in that range) interleave 128-bit lanes, one dword
// permute restores the order.
template <bool kUnsigned>
BCT_AVX512_TARGET void StoreCodes32(__m512i c0, __m512i c1, void* q) {
  const __m512i words = _mm512_packs_epi32(c0, c1);  // lane l: c0[4l..4l+3], c1[4l..4l+3] as int16
  // lane l dword 0: c0[4l..4l+3], dword 1: c1[4l..4l+3] as bytes
  const __m512i bytes = kUnsigned ? _mm512_packus_epi16(words, words) : _mm512_packs_epi16(words, words);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_storeu_si256(static_cast<__m256i*>(q), _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, bytes)));
}

// Packs 4-bit codes[0..D) (one per byte; bytes past D read as 0) into row: code 2j in the low
// nibble of byte j, code 2j+1 in the high nibble.
BCT_AVX512_TARGET void PackRow4Avx512(const uint8_t* codes, int64_t axis_size, int64_t row_nbytes, uint8_t* row) {
  const __m512i weights = _mm512_set1_epi16(0x1001);  // bytes (1, 16): c_even * 1 + c_odd * 16
  for (int64_t i = 0; i < axis_size; i += 64) {
    const int64_t left = axis_size - i;
    const __mmask64 load = left >= 64 ? ~__mmask64{0} : ((__mmask64{1} << left) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(load, codes + i);
    const __m256i packed = _mm512_cvtepi16_epi8(_mm512_maddubs_epi16(v, weights));
    const int64_t bytes_left = row_nbytes - i / 2;
    const __mmask32 store = bytes_left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << bytes_left) - 1u);
    _mm256_mask_storeu_epi8(row + i / 2, store, packed);
  }
}

// Blocks of a run of consecutive rows, numbered flat (block f is block f % nb of row f / nb, as scales
// and zero points are laid out): walks them in order, giving each block's offset in the rows' floats
// and its length.
struct BlockWalk {
  BlockWalk(const RowFormat& fmt, int64_t f0) : fmt(fmt), row(f0 / fmt.num_blocks), blk(f0 - row * fmt.num_blocks) {}
  int64_t offset() const { return row * fmt.axis_size + blk * fmt.block_size; }
  int64_t length() const { return std::min(fmt.axis_size - blk * fmt.block_size, fmt.block_size); }
  void next() {
    if (++blk == fmt.num_blocks) {
      blk = 0;
      ++row;
    }
  }
  const RowFormat& fmt;
  int64_t row, blk;
};

// Lane j of the result: the unsigned max of v[j]'s 16 lanes. Four rounds of shuffles and maxes, each
// halving the vectors and the lanes per vector left to combine (46 ops for 16 horizontal maxima that
// take about 9 each on their own); the last round leaves lane 4 i + q holding v[q + 4 i], which the
// final permute puts in order.
BCT_AVX512_TARGET __m512i TransposedMaxU32(const __m512i (&v)[16]) {
  __m512i w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {  // quarters of w[i]: v[2i]'s two partial quarters, then v[2i+1]'s
    w[i] = _mm512_max_epu32(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {  // quarter q of x[i]: 4 partial maxima of v[4i + q]
    x[i] = _mm512_max_epu32(_mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {  // quarter q of y[i]: 2 partial maxima of v[8i + q], then 2 of v[8i + 4 + q]
    y[i] = _mm512_max_epu32(_mm512_unpacklo_epi64(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_epi64(x[2 * i], x[2 * i + 1]));
  }
  const __m512 y0 = _mm512_castsi512_ps(y[0]), y1 = _mm512_castsi512_ps(y[1]);
  const __m512i z = _mm512_max_epu32(_mm512_castps_si512(_mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0))),
                                     _mm512_castps_si512(_mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1))));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// BlockExtremes of 16 whole blocks of 16 * V values (32 or 64) laid out back to back from xb: the 16
// magnitude maxima at once (TransposedMaxU32), then per block the first element of that magnitude, as
// the loop below.
template <int V>
BCT_AVX512_TARGET void Extremes16Blocks(const float* xb, float* extreme, uint8_t* has_nan) {
  static_assert(V == 2 || V == 4, "blocks of 32 or 64 values");
  constexpr int kLen = 16 * V;
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m[16];
  for (int j = 0; j < 16; ++j) {
    m[j] = _mm512_and_si512(_mm512_loadu_si512(xb + kLen * j), abs_mask);
    for (int v = 1; v < V; ++v) {
      m[j] = _mm512_max_epu32(m[j], _mm512_and_si512(_mm512_loadu_si512(xb + kLen * j + 16 * v), abs_mask));
    }
  }
  alignas(64) uint32_t tops[16];
  _mm512_store_si512(tops, TransposedMaxU32(m));
  for (int j = 0; j < 16; ++j) {
    const float* block = xb + kLen * j;
    has_nan[j] = tops[j] > 0x7f800000u ? 1 : 0;
    const __m512i vtop = _mm512_set1_epi32(static_cast<int>(tops[j]));
    uint64_t hits = 0;
    for (int v = 0; v < V; ++v) {
      hits |= static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(block + 16 * v), abs_mask),
                                                            vtop))
              << (16 * v);
    }
    extreme[j] = block[hits != 0 ? __builtin_ctzll(hits) : 0];  // a NaN block finds nothing: scalar rule later
  }
}

// Phase 1 of symmetric scales: per block, the element of largest magnitude (first on ties) into
// extreme[k], or a NaN flag. Integer max over the magnitude bits (the float order for non-NaN).
BCT_AVX512_TARGET void BlockExtremes(const RowFormat& fmt, const float* x, int64_t f0, int64_t count, float* extreme,
                                     uint8_t* has_nan) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t k0 = 0;
  // Whole blocks of 32 or 64 back to back (block f at x + block_size * f): 16 at a time.
  if (fmt.block_size == 32 && fmt.axis_size % 32 == 0) {
    for (; k0 + 16 <= count; k0 += 16) Extremes16Blocks<2>(x + (f0 + k0) * 32, extreme + k0, has_nan + k0);
  } else if (fmt.block_size == 64 && fmt.axis_size % 64 == 0) {
    for (; k0 + 16 <= count; k0 += 16) Extremes16Blocks<4>(x + (f0 + k0) * 64, extreme + k0, has_nan + k0);
  }
  BlockWalk walk(fmt, f0 + k0);
  if (fmt.block_size <= 32) {
    // Blocks of at most 32 values: both halves stay in registers for the max and the search.
    for (int64_t k = k0; k < count; ++k, walk.next()) {
      const int64_t n = walk.length();
      const float* xb = x + walk.offset();
      const __mmask16 m0 = TailMask(n);
      const __mmask16 m1 = n > 16 ? TailMask(n - 16) : static_cast<__mmask16>(0);
      const __m512i a0 = _mm512_and_si512(_mm512_maskz_loadu_epi32(m0, xb), abs_mask);
      const __m512i a1 = _mm512_and_si512(_mm512_maskz_loadu_epi32(m1, xb + 16), abs_mask);
      const uint32_t top = _mm512_reduce_max_epu32(_mm512_max_epu32(a0, a1));
      has_nan[k] = top > 0x7f800000u ? 1 : 0;
      const __m512i vtop = _mm512_set1_epi32(static_cast<int>(top));
      const uint32_t hits = static_cast<uint32_t>(_mm512_mask_cmpeq_epi32_mask(m0, a0, vtop)) |
                            (static_cast<uint32_t>(_mm512_mask_cmpeq_epi32_mask(m1, a1, vtop)) << 16);
      extreme[k] = xb[hits != 0 ? __builtin_ctz(hits) : 0];  // a NaN block finds nothing: scalar rule later
    }
    return;
  }
  for (int64_t k = k0; k < count; ++k, walk.next()) {
    const int64_t n = walk.length();
    const float* xb = x + walk.offset();
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 16) {
      const __m512i v = _mm512_maskz_loadu_epi32(TailMask(n - i), xb + i);
      vmax = _mm512_max_epu32(vmax, _mm512_and_si512(v, abs_mask));
    }
    const uint32_t top = _mm512_reduce_max_epu32(vmax);
    has_nan[k] = top > 0x7f800000u ? 1 : 0;
    const __m512i vtop = _mm512_set1_epi32(static_cast<int>(top));
    int64_t first = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mask = TailMask(n - i);
      const __m512i v = _mm512_maskz_loadu_epi32(mask, xb + i);
      const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(mask, _mm512_and_si512(v, abs_mask), vtop);
      if (hit != 0) {
        first = i + __builtin_ctz(static_cast<unsigned>(hit));
        break;
      }
    }
    extreme[k] = xb[first];  // a NaN block finds nothing; its scale comes from the scalar rule
  }
}

// Phase 1 of asymmetric scales: per block lo = min(block, 0), hi = max(block, 0), NaN flag.
BCT_AVX512_TARGET void BlockRanges(const RowFormat& fmt, const float* x, int64_t f0, int64_t count, float* lo,
                                   float* hi, uint8_t* has_nan) {
  BlockWalk walk(fmt, f0);
  for (int64_t k = 0; k < count; ++k, walk.next()) {
    const int64_t n = walk.length();
    const float* xb = x + walk.offset();
    __m512 vmin = _mm512_setzero_ps();
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(TailMask(n - i), xb + i);  // masked lanes: 0, inside [lo, hi]
      nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
      vmin = _mm512_min_ps(vmin, v);
      vmax = _mm512_max_ps(vmax, v);
    }
    has_nan[k] = nan != 0 ? 1 : 0;
    // A -0.0 bound (only possible as lo or hi == 0) changes nothing: step and zero point are the same.
    lo[k] = _mm512_reduce_min_ps(vmin);
    hi[k] = _mm512_reduce_max_ps(vmax);
  }
}

// A float scale vector in its stored kind: float16 rounds to nearest even exactly as half_from_float
// (vcvtps2ph: overflow to inf, subnormals, ties to even); returns the float32 value the arithmetic uses.
BCT_AVX512_TARGET __m512 StoreFloatScales(__m512 scale, ScaleKind kind, void* scales, int64_t b, __mmask16 mask) {
  if (kind == ScaleKind::kFloat16) {
    const __m256i h = _mm512_cvtps_ph(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(scales) + b, mask, h);
    return _mm512_cvtph_ps(h);
  }
  _mm512_mask_storeu_ps(static_cast<float*>(scales) + b, mask, scale);
  return scale;
}

// inverse_scale for 16 lanes: 1 / scale, 0 where the scale is 0.
BCT_AVX512_TARGET __m512 InverseScales(__m512 scale) {
  const __mmask16 zero = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(zero, _mm512_div_ps(_mm512_set1_ps(1.0f), scale), _mm512_setzero_ps());
}

// Scales (stored and as inverses) and zero points of flat blocks [f0, f0 + count) (see BlockWalk),
// count <= kScaleChunk: the per-block scalar work of quantization, 16 blocks per vector where the kind
// is float16 / float32 (other kinds and NaN blocks: the scalar rules of block_math.h).
constexpr int64_t kScaleChunk = 64;

BCT_AVX512_TARGET void ScalesAvx512(const RowFormat& fmt, const float* x, int64_t f0, int64_t count, void* scales,
                                    uint8_t* zero_points, float* inv, uint8_t* zps) {
  alignas(64) float a[kScaleChunk];
  alignas(64) float c[kScaleChunk];
  uint8_t has_nan[kScaleChunk];
  const int bits = fmt.bits;
  if (fmt.symmetric) {
    BlockExtremes(fmt, x, f0, count, a, has_nan);
  } else {
    BlockRanges(fmt, x, f0, count, a, c, has_nan);
  }
  // float16 / float32 scales 16 blocks per vector; other kinds (pow2) block by block below.
  const bool vector_scales = fmt.scale_kind == ScaleKind::kFloat16 || fmt.scale_kind == ScaleKind::kFloat32;
  if (vector_scales) {
    // symmetric: scale = m / -2**(bits-1), computed as m * -2**-(bits-1) (a power of two: the same
    // correctly rounded value); asymmetric: (hi - lo) / (2**bits - 1), zp = clamp(rne(-lo * inv)).
    const float qmax = static_cast<float>((1 << bits) - 1);
    const __m512 neg_inv_half = _mm512_set1_ps(-1.0f / static_cast<float>(1 << (bits - 1)));
    for (int64_t k = 0; k < count; k += 16) {
      const __mmask16 mask = TailMask(count - k);
      __m512 scale;
      if (fmt.symmetric) {
        scale = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a + k), neg_inv_half);
      } else {
        scale = _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, c + k), _mm512_maskz_loadu_ps(mask, a + k)),
                              _mm512_set1_ps(qmax));
      }
      const __m512 vinv = InverseScales(StoreFloatScales(scale, fmt.scale_kind, scales, f0 + k, mask));
      _mm512_mask_storeu_ps(inv + k, mask, vinv);
      if (!fmt.symmetric) {
        __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(mask, a + k)), vinv);
        z = _mm512_min_ps(_mm512_set1_ps(qmax), _mm512_max_ps(_mm512_setzero_ps(), z));  // NaN passes
        const __m512 magic = _mm512_set1_ps(12582912.0f);
        z = _mm512_sub_ps(_mm512_add_ps(z, magic), magic);
        const __m512i zi = _mm512_max_epi32(_mm512_cvttps_epi32(z), _mm512_setzero_si512());  // NaN -> 0
        _mm_mask_storeu_epi8(zps + k, mask, _mm512_cvtepi32_epi8(zi));
        _mm_mask_storeu_epi8(zero_points + f0 + k, mask, _mm512_cvtepi32_epi8(zi));
      }
    }
  }
  BlockWalk walk(fmt, f0);
  for (int64_t k = 0; k < count; ++k, walk.next()) {
    if (vector_scales && !has_nan[k]) continue;
    const float* xb = x + walk.offset();
    const int64_t n = walk.length();
    uint8_t zp = 0;
    StoredScale st;
    if (has_nan[k]) {
      st = fmt.symmetric ? choose_symmetric_scale(xb, n, bits, fmt.scale_kind)
                         : choose_asymmetric_scale(xb, n, bits, fmt.scale_kind, &zp);
    } else {
      st = fmt.symmetric ? symmetric_scale_of_extreme(a[k], bits, fmt.scale_kind)
                         : asymmetric_scale_of_range(a[k], c[k], bits, fmt.scale_kind, &zp);
    }
    store_scale(fmt.scale_kind, scales, f0 + k, st);
    inv[k] = inverse_scale(st.value);
    if (!fmt.symmetric) zero_points[f0 + k] = zps[k] = zp;
  }
}

// The signed 8-bit codes s (u = s + 128) of a whole block of 32 values for a finite inv, in order:
// rounding first and letting the two saturating packs clamp to [-128, 127] gives Codes16's codes,
// because no finite |x * inv| reaches 2**31 there (|x| is at most the block's extreme, whose scale
// is stored within a factor of 2 of extreme / 128, or as 0 with inv 0) and rounding is monotone; a
// NaN lane converts to INT_MIN and saturates to -128, code 0, as in Codes16. 7 ops instead of 13.
BCT_AVX512_TARGET __m256i SaturatedCodes8Block32(const float* x, float inv) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i r0 =
      _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i r1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16), vinv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i words = _mm512_packs_epi32(r0, r1);
  const __m512i bytes = _mm512_packs_epi16(words, words);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, bytes));
}

// Codes16 and StoreCodes32<true> of a whole block of 32 values, 8-bit symmetric, finite inv.
BCT_AVX512_TARGET void SymmetricCodes8Block32(const float* x, float inv, uint8_t* q) {
  const __m256i u = _mm256_xor_si256(SaturatedCodes8Block32(x, inv), _mm256_set1_epi8(static_cast<char>(0x80)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), u);
}

// SignedCodes16 and StoreCodes32<false> of a whole block of 32 values at 8 bits, finite inv; returns
// the sum of the 32 signed codes, from the bytes: sum(s) = sum(s xor 0x80) - 32 * 128 (vpsadbw).
BCT_AVX512_TARGET int32_t SignedCodes8Block32(const float* x, float inv, int8_t* q) {
  const __m256i s = SaturatedCodes8Block32(x, inv);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), s);
  const __m256i u = _mm256_xor_si256(s, _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m256i quads = _mm256_sad_epu8(u, _mm256_setzero_si256());
  const __m128i pair = _mm_add_epi64(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
  return static_cast<int32_t>(_mm_cvtsi128_si64(_mm_add_epi64(pair, _mm_unpackhi_epi64(pair, pair)))) - 32 * 128;
}

// Quantizes `rows` consecutive rows x [rows, D]: codes [rows, row_bytes], scales / zero points
// [rows, nb]. row_codes: scratch of rows * D bytes (unused at 8 bits).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void QuantizeRowsAvx512Impl(
    const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales, uint8_t* zero_points,
    uint8_t* row_codes) {
  uint8_t* out = fmt.bits == 8 ? codes : row_codes;  // 8 bits: row_bytes == D, codes as they are
  const bool fast8 = fmt.bits == 8 && fmt.symmetric;
  alignas(64) float inv[kScaleChunk];
  uint8_t zps[kScaleChunk];
  const int64_t total = rows * fmt.num_blocks;
  for (int64_t f0 = 0; f0 < total; f0 += kScaleChunk) {
    const int64_t count = std::min(kScaleChunk, total - f0);
    ScalesAvx512(fmt, x, f0, count, scales, zero_points, inv, zps);
    BlockWalk walk(fmt, f0);
    for (int64_t k = 0; k < count; ++k, walk.next()) {
      const int64_t offset = walk.offset();
      const int64_t n = walk.length();
      if (fast8 && n % 32 == 0 && std::isfinite(inv[k])) {  // blocks of 32, 64, ...: 32 values at a time
        for (int64_t i = 0; i < n; i += 32) SymmetricCodes8Block32(x + offset + i, inv[k], out + offset + i);
        continue;
      }
      const CodeParams p = MakeCodeParams(inv[k], fmt.bits, fmt.symmetric, fmt.symmetric ? 0 : zps[k]);
      if (n == 32) {  // a whole block of 32: two vectors packed to bytes at once
        StoreCodes32<true>(Codes16(_mm512_loadu_ps(x + offset), p), Codes16(_mm512_loadu_ps(x + offset + 16), p),
                           out + offset);
        continue;
      }
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = TailMask(n - i);
        const __m128i bytes = _mm512_cvtepi32_epi8(Codes16(_mm512_maskz_loadu_ps(mask, x + offset + i), p));
        _mm_mask_storeu_epi8(out + offset + i, mask, bytes);
      }
    }
  }
  if (fmt.bits == 8) return;
  for (int64_t r = 0; r < rows; ++r) {
    if (fmt.bits == 4) {
      PackRow4Avx512(row_codes + r * fmt.axis_size, fmt.axis_size, fmt.row_bytes, codes + r * fmt.row_bytes);
    } else {
      PackRow(row_codes + r * fmt.axis_size, fmt.axis_size, fmt.bits, fmt.row_bytes, codes + r * fmt.row_bytes);
    }
  }
}

// The activation quantizer (cpu/act_quantize.h) for `rows` consecutive rows of k: the scale work of
// ScalesAvx512 (symmetric, float32 scales), then signed codes u - 2**(bits-1) and their block sums.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void QuantizeActRowsAvx512Impl(
    const float* x, int64_t rows, int64_t k, int bits, int64_t block_size, const ActCodes& out) {
  RowFormat fmt;
  fmt.bits = bits;
  fmt.block_size = block_size;
  fmt.symmetric = true;
  fmt.scale_kind = ScaleKind::kFloat32;
  fmt.axis_size = k;
  fmt.num_blocks = num_blocks(k, block_size);
  const __m512i zp = _mm512_set1_epi32(1 << (bits - 1));
  alignas(64) float inv[kScaleChunk];
  uint8_t unused[kScaleChunk];
  const int64_t total = rows * fmt.num_blocks;
  for (int64_t f0 = 0; f0 < total; f0 += kScaleChunk) {
    const int64_t count = std::min(kScaleChunk, total - f0);
    ScalesAvx512(fmt, x, f0, count, out.scales, nullptr, inv, unused);
    for (int64_t j = 0; j < count; ++j) out.scales[f0 + j] = act_scale(out.scales[f0 + j]);
    BlockWalk walk(fmt, f0);
    for (int64_t j = 0; j < count; ++j, walk.next()) {
      const int64_t offset = walk.offset();
      const int64_t n = walk.length();
      int8_t* q = out.codes + walk.row * out.row_stride + walk.blk * out.block_stride;
      if (bits == 8 && n % 32 == 0 && std::isfinite(inv[j])) {  // blocks of 32, 64, ...: 32 values at a time
        int32_t sum = 0;
        for (int64_t i = 0; i < n; i += 32) sum += SignedCodes8Block32(x + offset + i, inv[j], q + i);
        if (out.sums != nullptr) out.sums[f0 + j] = sum;
        continue;
      }
      const CodeParams p = MakeCodeParams(inv[j], bits, true, 0);
      if (n == 32) {  // a whole block of 32 (the common case): two vectors packed to bytes at once
        const __m512i c0 = SignedCodes16(_mm512_loadu_ps(x + offset), p);
        const __m512i c1 = SignedCodes16(_mm512_loadu_ps(x + offset + 16), p);
        StoreCodes32<false>(c0, c1, q);
        if (out.sums != nullptr) out.sums[f0 + j] = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
        continue;
      }
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = TailMask(n - i);
        const __m512i c = _mm512_maskz_sub_epi32(mask, Codes16(_mm512_maskz_loadu_ps(mask, x + offset + i), p), zp);
        sum = _mm512_add_epi32(sum, c);
        _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtepi32_epi8(c));
      }
      if (out.sums != nullptr) out.sums[f0 + j] = _mm512_reduce_add_epi32(sum);
    }
  }
}

// Dequantizes `rows` consecutive rows of 8-bit codes (row_bytes == D): out [rows, D]. Blocks walked
// flat (BlockWalk); value = (code - zero_point) * scale, as value_of. The scales and zero points of 16
// blocks are widened at once (float16 by vcvtph2ps: the same floats as float_from_half, NaNs aside,
// whose products are the same NaNs).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void DequantizeRows8Avx512(
    const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points, int64_t rows,
    float* out) {
  const int64_t total = rows * fmt.num_blocks;
  const float implicit = implicit_zero_point(fmt.bits);
  alignas(64) float scale_of[16];
  alignas(64) float zp_of[16];
  BlockWalk walk(fmt, 0);
  for (int64_t f0 = 0; f0 < total; f0 += 16) {
    const int64_t count = std::min<int64_t>(16, total - f0);
    const __mmask16 mask = TailMask(count);
    if (fmt.scale_kind == ScaleKind::kFloat16) {
      _mm512_store_ps(scale_of, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(scales) + f0)));
    } else if (fmt.scale_kind == ScaleKind::kFloat32) {
      _mm512_store_ps(scale_of, _mm512_maskz_loadu_ps(mask, static_cast<const float*>(scales) + f0));
    } else {
      for (int64_t k = 0; k < count; ++k) scale_of[k] = scale_value(fmt.scale_kind, scales, f0 + k);
    }
    if (zero_points != nullptr) {
      _mm512_store_ps(zp_of, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zero_points + f0))));
    } else {
      _mm512_store_ps(zp_of, _mm512_set1_ps(implicit));
    }
    for (int64_t k = 0; k < count; ++k, walk.next()) {
      const int64_t offset = walk.offset();
      const int64_t n = walk.length();
      const __m512 scale = _mm512_set1_ps(scale_of[k]);
      const __m512 zp = _mm512_set1_ps(zp_of[k]);
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {  // whole vectors: plain loads and stores (masked stores are slower)
        const __m512 c = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + offset + i))));
        _mm512_storeu_ps(out + offset + i, _mm512_mul_ps(_mm512_sub_ps(c, zp), scale));
      }
      if (i < n) {
        const __mmask16 m = TailMask(n - i);
        const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + offset + i)));
        _mm512_mask_storeu_ps(out + offset + i, m, _mm512_mul_ps(_mm512_sub_ps(c, zp), scale));
      }
    }
  }
}

// The K-major activation quantizer (cpu/act_quantize.h) of a row-major block b [len, n]: per column
// the first element of largest magnitude (strict integer compare of the magnitude bits, in row
// order) gives scale = m / -2**(bits-1) (as m * -2**-(bits-1), the same value); signed codes into
// q [len, n], scales [n]; a column holding a NaN is redone with the reference rule.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void QuantizeActColumnsAvx512Impl(
    const float* b, int64_t n, int64_t len, int bits, int8_t* q, float* scales) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf_bits = _mm512_set1_epi32(0x7f800000);
  const __m512 neg_inv_half = _mm512_set1_ps(-1.0f / static_cast<float>(1 << (bits - 1)));
  const __m512i zp = _mm512_set1_epi32(1 << (bits - 1));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = TailMask(n - j);
    __m512 best_v = _mm512_maskz_loadu_ps(mask, b + j);
    __m512i best_u = _mm512_and_si512(_mm512_castps_si512(best_v), abs_mask);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(best_u, inf_bits);
    for (int64_t i = 1; i < len; ++i) {
      const __m512 v = _mm512_maskz_loadu_ps(mask, b + i * n + j);
      const __m512i u = _mm512_and_si512(_mm512_castps_si512(v), abs_mask);
      const __mmask16 take = _mm512_cmpgt_epu32_mask(u, best_u);
      best_u = _mm512_mask_mov_epi32(best_u, take, u);
      best_v = _mm512_mask_mov_ps(best_v, take, v);
      nan = static_cast<__mmask16>(nan | _mm512_cmpgt_epu32_mask(u, inf_bits));
    }
    const __m512 scale = _mm512_mul_ps(best_v, neg_inv_half);
    // act_scale: NaN where the column held a NaN or an infinity (scale - scale is not 0 there).
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(scale, scale), _mm512_setzero_ps(), _CMP_EQ_OQ);
    _mm512_mask_storeu_ps(scales + j, mask, _mm512_mask_blend_ps(finite, _mm512_set1_ps(std::nanf("")), scale));
    const CodeParams p = MakeCodeParams(0.0f, bits, true, 0);
    CodeParams pj = p;
    pj.inv = InverseScales(scale);
    for (int64_t i = 0; i < len; ++i) {
      const __m512i c = _mm512_sub_epi32(Codes16(_mm512_maskz_loadu_ps(mask, b + i * n + j), pj), zp);
      _mm_mask_storeu_epi8(q + i * n + j, mask, _mm512_cvtepi32_epi8(c));
    }
    for (unsigned bits_left = nan; bits_left != 0; bits_left &= bits_left - 1) {
      QuantizeActColumnExactly(b, n, len, bits, j + __builtin_ctz(bits_left), q, scales);
    }
  }
}
#undef BCT_AVX512_TARGET
#endif

// QuantizeRows' baseline path, one row: SSE2 scale search and codes, then packing.
void QuantizeRowSse2(const RowFormat& fmt, const float* x, uint8_t* codes, void* scales, uint8_t* zero_points,
                     uint8_t* row_codes) {
  for (int64_t b = 0; b < fmt.num_blocks; ++b) {
    const int64_t begin = b * fmt.block_size;
    const int64_t n = std::min(fmt.axis_size, begin + fmt.block_size) - begin;
    const float* xb = x + begin;
    uint8_t zp = 0;
    const StoredScale s = fmt.symmetric ? SymmetricScale(xb, n, fmt.bits, fmt.scale_kind)
                                        : AsymmetricScale(xb, n, fmt.bits, fmt.scale_kind, &zp);
    store_scale(fmt.scale_kind, scales, b, s);
    if (!fmt.symmetric) zero_points[b] = zp;
    BlockCodes(xb, n, inverse_scale(s.value), fmt.bits, fmt.symmetric, zp, row_codes + begin);
  }
  PackRow(row_codes, fmt.axis_size, fmt.bits, fmt.row_bytes, codes);
}

// Scratch of n bytes for unpacked codes, per thread.
uint8_t* RowCodesScratch(size_t n) {
  thread_local std::vector<uint8_t> row_codes;
  if (row_codes.size() < n) row_codes.resize(n);
  return row_codes.data();
}

void DequantizeRowsOn(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                      int64_t rows, float* out, bool avx2) {
  const std::size_t scale_row_bytes = static_cast<std::size_t>(fmt.num_blocks) * ScaleItemSize(fmt.scale_kind);
  const std::size_t zero_point_row_bytes =
      static_cast<std::size_t>(fmt.num_blocks) * zero_point_item_size(fmt.zero_point_kind);
  for (int64_t r = 0; r < rows; ++r) {
    DequantizeRowOn(fmt, codes + r * fmt.row_bytes, static_cast<const uint8_t*>(scales) + r * scale_row_bytes,
                    zero_points ? zero_points + r * zero_point_row_bytes : nullptr, out + r * fmt.axis_size, avx2);
  }
}

}  // namespace

void QuantizeRowsBaseline(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                          uint8_t* zero_points) {
  uint8_t* row_codes = RowCodesScratch(static_cast<size_t>(fmt.axis_size));
  const std::size_t scale_row_bytes = static_cast<std::size_t>(fmt.num_blocks) * ScaleItemSize(fmt.scale_kind);
  for (int64_t r = 0; r < rows; ++r) {
    QuantizeRowSse2(fmt, x + r * fmt.axis_size, codes + r * fmt.row_bytes,
                    static_cast<uint8_t*>(scales) + r * scale_row_bytes,
                    zero_points ? zero_points + r * fmt.num_blocks : nullptr, row_codes);
  }
}

void DequantizeRowsBaseline(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                            int64_t rows, float* out) {
  DequantizeRowsOn(fmt, codes, scales, zero_points, rows, out, false);
}

#if BCT_X86_SIMD
void DequantizeRowsAvx2(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                        int64_t rows, float* out) {
  DequantizeRowsOn(fmt, codes, scales, zero_points, rows, out, true);
}

void QuantizeRowsAvx512(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                        uint8_t* zero_points) {
  if (rows <= 0) return;
  uint8_t* row_codes = RowCodesScratch(fmt.bits == 8 ? 0 : static_cast<size_t>(rows * fmt.axis_size));
  QuantizeRowsAvx512Impl(fmt, x, rows, codes, scales, zero_points, row_codes);
}

// 8-bit rows with integer zero points walk all the rows' blocks with AVX-512; others as AVX2.
void DequantizeRowsAvx512(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                          int64_t rows, float* out) {
  const bool integer_zero_points = fmt.symmetric || fmt.zero_point_kind == ZeroPointKind::kInteger;
  if (fmt.bits == 8 && rows > 0 && integer_zero_points) {
    DequantizeRows8Avx512(fmt, codes, scales, zero_points, rows, out);
    return;
  }
  DequantizeRowsOn(fmt, codes, scales, zero_points, rows, out, true);
}

void QuantizeActRowsAvx512(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size,
                           const ActCodes& out) {
  QuantizeActRowsAvx512Impl(x, rows, k, bits, block_size, out);
}

void QuantizeActColumnsAvx512(const float* b, int64_t n, int64_t len, int bits, int8_t* q, float* scales) {
  QuantizeActColumnsAvx512Impl(b, n, len, bits, q, scales);
}
#endif

void QuantizeRows(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                  uint8_t* zero_points) {
  Kernels(fmt.isa).quantize_rows(fmt, x, rows, codes, scales, zero_points);
}

void DequantizeRows(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                    int64_t rows, float* out) {
  Kernels(fmt.isa).dequantize_rows(fmt, codes, scales, zero_points, rows, out);
}

}  // namespace cpu
}  // namespace bct
