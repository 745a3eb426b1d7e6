// AVX-512 VNNI block dot products of BlockActMatMul (see act_matmul_vnni.h). Compiled for the
// baseline ISA; the AVX-512 functions have target attributes and run only on the paths whose
// kernel table sets act_dot_vnni.
#include "cpu/act_matmul_vnni.h"

#include "cpu/isa.h"

#if BCT_X86_SIMD
#include <immintrin.h>
#endif

// GCC 12 warns about the undefined vector behind masked intrinsics; nothing reads it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

namespace bct {
namespace nonlinear {
namespace vnni {

void InitPackedB(PackedB& p, int64_t batches, int64_t n, int64_t k, int64_t block_size, bool only_padding) {
  p.n = n;
  p.n_pad = (n + 15) / 16 * 16;
  p.k = k;
  p.block_size = block_size;
  p.nb = (k + block_size - 1) / block_size;
  p.groups = (block_size + 3) / 4;
  const int64_t rows = batches * p.nb;  // rows of n_pad sums or scales; groups rows of codes each
  if (!only_padding) {
    p.codes.assign(static_cast<size_t>(rows * p.groups * p.n_pad * 4), 0);
    p.sums.assign(static_cast<size_t>(rows * p.n_pad), 0);
    p.scales.assign(static_cast<size_t>(rows * p.n_pad), 0.0f);
    return;
  }
  p.codes.resize(static_cast<size_t>(rows * p.groups * p.n_pad * 4));
  p.sums.resize(static_cast<size_t>(rows * p.n_pad));
  p.scales.resize(static_cast<size_t>(rows * p.n_pad));
  const int64_t pad = p.n_pad - n;
  if (pad == 0) return;
  for (int64_t r = 0; r < rows * p.groups; ++r) {
    std::memset(p.codes.data() + (r * p.n_pad + n) * 4, 0, static_cast<size_t>(pad * 4));
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::fill_n(p.sums.data() + r * p.n_pad + n, pad, 0);
    std::fill_n(p.scales.data() + r * p.n_pad + n, pad, 0.0f);
  }
}

void PackColumn(PackedB& p, int64_t batch, int64_t col, const int8_t* q, const float* scales) {
  for (int64_t blk = 0; blk < p.nb; ++blk) {
    const int64_t b0 = blk * p.block_size;
    const int64_t len = std::min(p.block_size, p.k - b0);
    int8_t* base = p.codes.data() + ((batch * p.nb + blk) * p.groups * p.n_pad) * 4;
    int32_t sum = 0;
    for (int64_t i = 0; i < len; ++i) sum += q[b0 + i];
    int64_t i = 0;
    for (; i + 4 <= len; i += 4) std::memcpy(base + ((i / 4) * p.n_pad + col) * 4, q + b0 + i, 4);
    for (; i < len; ++i) base[((i / 4) * p.n_pad + col) * 4 + (i % 4)] = q[b0 + i];
    p.sums[static_cast<size_t>((batch * p.nb + blk) * p.n_pad + col)] = sum;
    p.scales[static_cast<size_t>((batch * p.nb + blk) * p.n_pad + col)] = scales[blk];
  }
}

#if BCT_X86_SIMD
// PackRows with AVX-512: per block and group of 4 k values, the 4 bytes of 16 rows gathered into 64
// bytes; the block sums by vpdpbusd with ones.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void PackRowsAvx512(
    PackedB& p, int64_t batch, int64_t col0, int64_t count, const int8_t* q, const float* scales, int64_t row_step) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int64_t left = count - j0;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512i rows = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.k * row_step)));
    const __m512i row_scales = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.nb * row_step)));
    const int8_t* q0 = q + j0 * row_step * p.k;
    for (int64_t blk = 0; blk < p.nb; ++blk) {
      const int64_t b0 = blk * p.block_size;
      int8_t* base = p.codes.data() + ((batch * p.nb + blk) * p.groups * p.n_pad + col0 + j0) * 4;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t g = 0; g < p.groups; ++g) {
        const __m512i words =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, q0 + b0 + 4 * g, 1);
        sum = _mm512_dpbusd_epi32(sum, ones, words);
        _mm512_mask_storeu_epi32(base + g * p.n_pad * 4, mask, words);
      }
      const int64_t at = (batch * p.nb + blk) * p.n_pad + col0 + j0;
      _mm512_mask_storeu_epi32(p.sums.data() + at, mask, sum);
      _mm512_mask_storeu_ps(p.scales.data() + at, mask,
                            _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, row_scales,
                                                     scales + j0 * row_step * p.nb + blk, 4));
    }
  }
}
#endif

void PackRows(PackedB& p, int64_t batch, int64_t col0, int64_t count, const int8_t* q, const float* scales,
              int64_t row_step) {
#if BCT_X86_SIMD
  // whole groups of 4 in every block; gather offsets (16 rows row_step apart) within int32
  if (p.k % p.block_size == 0 && p.block_size % 4 == 0 && 16 * row_step * p.k < (1 << 30)) {
    PackRowsAvx512(p, batch, col0, count, q, scales, row_step);
    return;
  }
#endif
  for (int64_t j = 0; j < count; ++j) {
    PackColumn(p, batch, col0 + j, q + j * row_step * p.k, scales + j * row_step * p.nb);
  }
}

#if BCT_X86_SIMD
// 16 x 16 32-bit transpose in registers: afterwards r[i] lane j holds what r[j] lane i held.
__attribute__((target("avx512f"), always_inline)) static inline void Transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// PackCodeRows with AVX-512: 16 rows at a time, 16 groups of 4 codes of each loaded at once (and
// stored as they are to copy when kCopy), made signed (u ^ 0x80 is the byte of u - 128) and transposed,
// so that register d holds group d of the 16 rows: the bytes PackRowsAvx512 gathers, with the same block
// sums (vpdpbusd with ones).
template <bool kCopy>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void PackCodeRowsAvx512(
    PackedB& p, int64_t batch, int64_t col0, int64_t count, const uint8_t* codes, const float* scales,
    uint8_t* copy) {
  // PackedB's fields in locals (the stores of int8_t codes could alias them); group `word` of a row is
  // group word % groups of block word / groups, stored word * n_pad columns of 4 bytes from the first.
  const int64_t k = p.k, nb = p.nb, groups = p.groups, n_pad = p.n_pad;
  const int64_t words = k / 4;  // groups of 4 codes in a row; groups of them in each block
  int8_t* const packed_codes = p.codes.data() + (batch * nb * groups * n_pad + col0) * 4;
  int32_t* const packed_sums = p.sums.data() + batch * nb * n_pad + col0;
  float* const packed_scales = p.scales.data() + batch * nb * n_pad + col0;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i row_scales = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(nb)));
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int64_t keys = std::min<int64_t>(16, count - j0);
    const __mmask16 key_mask = keys == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << keys) - 1u);
    __m512i sum = _mm512_setzero_si512();
    int64_t blk = 0, g = 0;  // of group w0 + i below
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t n = std::min<int64_t>(16, words - w0);
      const __mmask16 word_mask = n == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
      __m512i r[16];
      const uint8_t* src = codes + j0 * k + w0 * 4;  // row j0 + j, one pointer stepped (not 16 kept)
      uint8_t* dst = kCopy ? copy + j0 * k + w0 * 4 : nullptr;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < keys) {
          const __m512i u = _mm512_maskz_loadu_epi32(word_mask, src);
          if (kCopy) {  // whole cache lines stored non-temporally: nothing reads the copy in this call
            if (word_mask == 0xffff && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
              _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), u);
            } else {
              _mm512_mask_storeu_epi32(dst, word_mask, u);
            }
          }
          r[j] = _mm512_xor_si512(u, flip);
        } else {
          r[j] = _mm512_setzero_si512();
        }
        src += k;
        if (kCopy) dst += k;
        // opaque to the compiler, which would otherwise keep 16 precomputed row offsets on the stack
        asm("" : "+r"(src), "+r"(dst));
      }
      Transpose16x16(r);
      int8_t* out = packed_codes + (w0 * n_pad + j0) * 4;  // group w0 + i, one pointer stepped
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {  // unrolled: r[i] stays in a register
        if (i == n) break;
        sum = _mm512_dpbusd_epi32(sum, ones, r[i]);
        _mm512_mask_storeu_epi32(out, key_mask, r[i]);
        out += n_pad * 4;
        asm("" : "+r"(out));
        if (++g == groups) {  // the block's last group: its sums and scales
          _mm512_mask_storeu_epi32(packed_sums + blk * n_pad + j0, key_mask, sum);
          _mm512_mask_storeu_ps(packed_scales + blk * n_pad + j0, key_mask,
                                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), key_mask, row_scales,
                                                         scales + j0 * nb + blk, 4));
          sum = _mm512_setzero_si512();
          g = 0;
          ++blk;
        }
      }
    }
  }
  if (kCopy) _mm_sfence();  // the streamed lines ordered before what follows (the chunk's counter)
}
#endif

void PackCodeRows(PackedB& p, int64_t batch, int64_t col0, int64_t count, const uint8_t* codes, const float* scales,
                  uint8_t* copy) {
#if BCT_X86_SIMD
  if (p.k % p.block_size == 0 && p.block_size % 4 == 0 && p.k < (1 << 24)) {  // whole groups of 4 in every block
    if (copy != nullptr) {
      PackCodeRowsAvx512<true>(p, batch, col0, count, codes, scales, copy);
    } else {
      PackCodeRowsAvx512<false>(p, batch, col0, count, codes, scales, nullptr);
    }
    return;
  }
#endif
  if (copy != nullptr && count > 0) std::memcpy(copy, codes, static_cast<size_t>(count * p.k));
  std::vector<int8_t> q(static_cast<size_t>(p.k));
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t i = 0; i < p.k; ++i) q[static_cast<size_t>(i)] = static_cast<int8_t>(codes[j * p.k + i] ^ 0x80u);
    PackColumn(p, batch, col0 + j, q.data(), scales + j * p.nb);
  }
}

#if BCT_X86_SIMD
// PackBlock with AVX-512: four k rows of 16 columns interleaved into 64 bytes per step.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void PackBlockAvx512(
    PackedB& p, int64_t batch, int64_t blk, const int8_t* q, const float* scales) {
  const int64_t len = std::min(p.block_size, p.k - blk * p.block_size);
  int8_t* base = p.codes.data() + ((batch * p.nb + blk) * p.groups * p.n_pad) * 4;
  int32_t* sums = p.sums.data() + (batch * p.nb + blk) * p.n_pad;
  float* sc = p.scales.data() + (batch * p.nb + blk) * p.n_pad;
  for (int64_t j0 = 0; j0 < p.n; j0 += 16) {
    const int64_t left = p.n - j0;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i0 = 0; i0 < len; i0 += 4) {
      __m128i r[4];
      for (int t = 0; t < 4; ++t) {
        r[t] = i0 + t < len ? _mm_maskz_loadu_epi8(mask, q + (i0 + t) * p.n + j0) : _mm_setzero_si128();
        sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(r[t]));
      }
      const __m128i ab_lo = _mm_unpacklo_epi8(r[0], r[1]), ab_hi = _mm_unpackhi_epi8(r[0], r[1]);
      const __m128i cd_lo = _mm_unpacklo_epi8(r[2], r[3]), cd_hi = _mm_unpackhi_epi8(r[2], r[3]);
      const __m512i out = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(_mm_unpackhi_epi16(ab_lo, cd_lo), _mm_unpacklo_epi16(ab_lo, cd_lo))),
          _mm256_set_m128i(_mm_unpackhi_epi16(ab_hi, cd_hi), _mm_unpacklo_epi16(ab_hi, cd_hi)), 1);
      _mm512_mask_storeu_epi32(base + ((i0 / 4) * p.n_pad + j0) * 4, mask, out);  // one 32-bit lane a column
    }
    _mm512_mask_storeu_epi32(sums + j0, mask, sum);
    _mm512_mask_storeu_ps(sc + j0, mask, _mm512_maskz_loadu_ps(mask, scales + j0));
  }
}
#endif

void PackBlock(PackedB& p, int64_t batch, int64_t blk, const int8_t* q, const float* scales) {
#if BCT_X86_SIMD
  PackBlockAvx512(p, batch, blk, q, scales);  // PackedB is only used on paths with AVX-512 VNNI
#else
  const int64_t len = std::min(p.block_size, p.k - blk * p.block_size);
  int8_t* base = p.codes.data() + ((batch * p.nb + blk) * p.groups * p.n_pad) * 4;
  int32_t* sums = p.sums.data() + (batch * p.nb + blk) * p.n_pad;
  float* sc = p.scales.data() + (batch * p.nb + blk) * p.n_pad;
  for (int64_t j = 0; j < p.n; ++j) {
    sums[j] = 0;
    sc[j] = scales[j];
  }
  for (int64_t i = 0; i < len; ++i) {
    const int8_t* row = q + i * p.n;
    int8_t* dst = base + (i / 4) * p.n_pad * 4 + (i % 4);
    for (int64_t j = 0; j < p.n; ++j) {
      dst[j * 4] = row[j];
      sums[j] += row[j];
    }
  }
#endif
}

#if BCT_X86_SIMD
namespace {

// C strips of 16 columns from j0 on, R output rows (R <= 4): each B load feeds R independent
// vpdpbusd chains and each broadcast of A's four codes feeds C.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void DotStrips(
    const PackedB& p, int64_t batch, int64_t j0, const float* sa, int64_t sa_stride, const uint8_t* scratch,
    int64_t row_scratch, int64_t group_bytes, float* y, int64_t y_stride) {
  const __m512i bias128 = _mm512_set1_epi32(128);
  __m512 acc_y[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc_y[r][c] = _mm512_setzero_ps();
  }
  for (int64_t blk = 0; blk < p.nb; ++blk) {
    const int64_t len = std::min(p.block_size, p.k - blk * p.block_size);
    const int64_t groups = (len + 3) / 4;
    const int8_t* b = p.codes.data() + ((batch * p.nb + blk) * p.groups * p.n_pad + j0) * 4;
    const uint8_t* a = scratch + blk * group_bytes;
    __m512i acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512i bv[C];
      for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_si512(b + g * p.n_pad * 4 + c * 64);
      for (int r = 0; r < R; ++r) {
        int32_t a4;
        std::memcpy(&a4, a + r * row_scratch + g * 4, 4);
        const __m512i av = _mm512_set1_epi32(a4);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], av, bv[c]);
      }
    }
    for (int c = 0; c < C; ++c) {
      const size_t at = static_cast<size_t>((batch * p.nb + blk) * p.n_pad + j0 + 16 * c);
      const __m512i correction = _mm512_mullo_epi32(_mm512_loadu_si512(p.sums.data() + at), bias128);
      const __m512 sb = _mm512_loadu_ps(p.scales.data() + at);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_sub_epi32(acc[r][c], correction);
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sa[r * sa_stride + blk]), sb);
        acc_y[r][c] = _mm512_add_ps(acc_y[r][c], _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xffff, dot), scale));
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t left = p.n - (j0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      if (left >= 16) {
        _mm512_storeu_ps(y + r * y_stride + j0 + 16 * c, acc_y[r][c]);
      } else {
        _mm512_mask_storeu_ps(y + r * y_stride + j0 + 16 * c, static_cast<__mmask16>((1u << left) - 1u), acc_y[r][c]);
      }
    }
  }
}

// R output rows at once (R <= 4), two strips of 16 columns at a time (then one).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void DotRowsT(const PackedB& p, int64_t batch,
                                                                      const int8_t* qa, int64_t qa_stride,
                                                                      const float* sa, int64_t sa_stride,
                                                                      uint8_t* scratch, float* y, int64_t y_stride) {
  // A's codes as unsigned bytes (q + 128), each block zero-padded to whole groups of 4.
  const int64_t group_bytes = p.groups * 4;
  const int64_t row_scratch = p.nb * group_bytes;
  for (int r = 0; r < R; ++r) {
    for (int64_t blk = 0; blk < p.nb; ++blk) {
      const int64_t b0 = blk * p.block_size;
      const int64_t len = std::min(p.block_size, p.k - b0);
      uint8_t* dst = scratch + r * row_scratch + blk * group_bytes;
      const int8_t* src = qa + r * qa_stride + b0;
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<uint8_t>(src[i] + 128);
      for (int64_t i = len; i < group_bytes; ++i) dst[i] = 0;
    }
  }
  int64_t j0 = 0;
  for (; j0 + 32 <= p.n_pad; j0 += 32) {
    DotStrips<R, 2>(p, batch, j0, sa, sa_stride, scratch, row_scratch, group_bytes, y, y_stride);
  }
  if (j0 < p.n_pad) DotStrips<R, 1>(p, batch, j0, sa, sa_stride, scratch, row_scratch, group_bytes, y, y_stride);
}

}  // namespace

void DotRows(const PackedB& p, int64_t batch, const int8_t* qa, const float* sa, int64_t rows, uint8_t* scratch,
             float* y, int64_t y_stride, int64_t row_step) {
  const int64_t qs = row_step * p.k, ss = row_step * p.nb;  // strides of A's codes and scales
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) DotRowsT<4>(p, batch, qa + r * qs, qs, sa + r * ss, ss, scratch, y + r * y_stride, y_stride);
  switch (rows - r) {
    case 3: DotRowsT<3>(p, batch, qa + r * qs, qs, sa + r * ss, ss, scratch, y + r * y_stride, y_stride); break;
    case 2: DotRowsT<2>(p, batch, qa + r * qs, qs, sa + r * ss, ss, scratch, y + r * y_stride, y_stride); break;
    case 1: DotRowsT<1>(p, batch, qa + r * qs, qs, sa + r * ss, ss, scratch, y + r * y_stride, y_stride); break;
    default: break;
  }
}

void DotRow(const PackedB& p, int64_t batch, const int8_t* qa, const float* sa, uint8_t* scratch, float* y) {
  DotRowsT<1>(p, batch, qa, p.k, sa, p.nb, scratch, y, p.n);
}
#else
void DotRows(const PackedB&, int64_t, const int8_t*, const float*, int64_t, uint8_t*, float*, int64_t, int64_t) {}
void DotRow(const PackedB&, int64_t, const int8_t*, const float*, uint8_t*, float*) {}
#endif

}  // namespace vnni
}  // namespace nonlinear
}  // namespace bct
