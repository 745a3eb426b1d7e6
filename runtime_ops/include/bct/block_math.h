// The arithmetic of the blockwise format, once, for host (C++17) and device (CUDA) code.
//
// bct_onnx/block_format.py is the specification; every function here reproduces its numpy
// counterpart bit for bit (float32 arithmetic, round half to even, no fused multiply-add, no
// fast-math). docs/block_format.md explains the format in prose. No ORT or CUDA headers needed.
//
//   round_half_even      np.rint on float32 (after clamping to a small range)
//   half_from_float      float32 -> float16 bits, round to nearest even (numpy astype(float16))
//   float_from_half      float16 bits -> float32 (exact)
//   pow2_exponent_at_least, pow2_scale
//   choose_symmetric_scale / choose_asymmetric_scale   block_format.choose_scales for one block
//   inverse_scale, code_of, value_of                   block_format.codes_for / dequantize_codes
//   ZeroPointKind, offset_value, value_with_offset     float-offset blocks (u * scale + offset)
//   get_code, put_code, row_bytes, num_blocks          dense little-endian packing
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define BCT_HD __host__ __device__
#define BCT_INLINE __forceinline__
#else
#define BCT_HD
#define BCT_INLINE inline
#endif

namespace bct {

// kFloat8E5M2: one byte, the upper half of a float16 (sign, 5 exponent bits, 2 mantissa bits), as
// ONNX's FLOAT8E5M2; weights and tables only (chosen offline, never by a kernel at run time).
enum class ScaleKind : int { kFloat16 = 0, kFloat32 = 1, kPow2 = 2, kFloat8E5M2 = 3 };

// What an asymmetric block stores besides its scale, told by the zero_points input's dtype:
// uint8 integer zero points ((u - zp) * scale), or float16 / float32 offsets (u * scale + offset).
enum class ZeroPointKind : int { kInteger = 0, kFloat16 = 1, kFloat32 = 2 };

constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;
constexpr int kPow2Bias = 127;  // stored byte e' means scale 2**(e' - 127)
constexpr int kPow2MinExponent = -126;
constexpr int kPow2MaxExponent = 127;

// ---------------------------------------------------------------------------------------------
// float32 primitives that must not be contracted into FMAs or reassociated.

BCT_HD BCT_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

BCT_HD BCT_INLINE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

BCT_HD BCT_INLINE float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

BCT_HD BCT_INLINE float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BCT_HD BCT_INLINE float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

BCT_HD BCT_INLINE float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

BCT_HD BCT_INLINE bool is_nan(float x) { return x != x; }

// min/max that propagate NaN like np.minimum / np.maximum.
BCT_HD BCT_INLINE float nan_min(float a, float b) { return (is_nan(a) || a < b) ? a : b; }
BCT_HD BCT_INLINE float nan_max(float a, float b) { return (is_nan(a) || a > b) ? a : b; }

// Clamp to [lo, hi]; NaN passes through unchanged (as np.clip).
BCT_HD BCT_INLINE float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Round to nearest, ties to even, for |x| <= 2**22 (callers clamp first): adding and subtracting
// 1.5 * 2**23 leaves exactly the rounded integer in float32 arithmetic. Bit-identical to np.rint
// in that range (also for -0.5 -> -0.0), and vectorises where std::nearbyint does not.
BCT_HD BCT_INLINE float round_half_even(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2**23
  return fsub(fadd(x, magic), magic);
}

// float32 -> uint8 of a value already rounded and clamped into [0, 255]; NaN gives 0.
BCT_HD BCT_INLINE uint8_t to_u8(float x) { return is_nan(x) ? uint8_t{0} : static_cast<uint8_t>(static_cast<int>(x)); }

// ---------------------------------------------------------------------------------------------
// float16 <-> float32, bit-exact with numpy (IEEE binary16, round to nearest even, overflow to inf,
// subnormals kept, NaN stays NaN).

BCT_HD BCT_INLINE uint16_t half_from_float(float value) {
  const uint32_t f = float_bits(value);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t abs = f & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? (0x0200u | ((abs >> 13) & 0x3ffu)) : 0u));
  }
  if (abs >= 0x477ff000u) {  // >= 65520: rounds to inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (abs >= 0x38800000u) {  // normal half (>= 2**-14)
    const uint32_t mant_odd = (abs >> 13) & 1u;
    const uint32_t rounded = abs + 0xfffu + mant_odd;  // round to nearest even at bit 13
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (abs < 0x33000000u) {  // < 2**-25: rounds to (signed) zero (2**-25 itself ties to 0)
    return static_cast<uint16_t>(sign);
  }
  // Subnormal half: value = m * 2**-24 with m in [0, 1024].
  const uint32_t exp = abs >> 23;                       // 102..112
  const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;  // 24-bit significand
  const uint32_t shift = 126u - exp;                    // 14..24: mant >> shift gives m
  const uint32_t m = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  const uint32_t up = (rest > halfway || (rest == halfway && (m & 1u))) ? 1u : 0u;
  return static_cast<uint16_t>(sign | (m + up));
}

BCT_HD BCT_INLINE float float_from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return float_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return float_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return float_from_bits(sign);
  // subnormal: mant * 2**-24, exact in float32
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

// ---------------------------------------------------------------------------------------------
// Power-of-two scales

// Smallest e with 2**e >= ratio, as block_format.pow2_exponent_at_least (numpy frexp semantics:
// 0, inf and NaN give frexp exponent 0), clamped to [-126, 127].
BCT_HD BCT_INLINE int pow2_exponent_at_least(float ratio) {
  const uint32_t u = float_bits(ratio) & 0x7fffffffu;
  const int biased = static_cast<int>(u >> 23);
  const uint32_t mant = u & 0x7fffffu;
  int e;
  if (biased == 0xff || u == 0) {
    e = 0;  // frexp exponent 0, mantissa != 0.5
  } else if (biased == 0) {  // subnormal: value = mant * 2**-149
    int top = 31;
    while (!((mant >> top) & 1u)) --top;  // floor(log2(mant))
    const bool power_of_two = (mant & (mant - 1u)) == 0;
    e = top - 149 + (power_of_two ? 0 : 1);
  } else {
    e = biased - 127 + (mant == 0 ? 0 : 1);
  }
  return e < kPow2MinExponent ? kPow2MinExponent : (e > kPow2MaxExponent ? kPow2MaxExponent : e);
}

// 2**(stored - 127) as float32 (stored 1..254 are normal floats; 0 gives 2**-127, subnormal; 255 gives
// 2**128 = inf, as numpy's ldexp in float32).
// A float8 E5M2 byte is the upper byte of the float16 with the same value (exact).
BCT_HD BCT_INLINE float float_from_e5m2(uint8_t stored) {
  return float_from_half(static_cast<uint16_t>(static_cast<uint16_t>(stored) << 8));
}

BCT_HD BCT_INLINE float pow2_scale(uint8_t stored) {
  const int e = static_cast<int>(stored) - kPow2Bias;
  if (e >= -126 && e <= 127) return float_from_bits(static_cast<uint32_t>(e + 127) << 23);
  if (e > 127) return float_from_bits(0x7f800000u);
  return float_from_bits(0x00400000u);  // 2**-127
}

// ---------------------------------------------------------------------------------------------
// Stored scales

// Bytes of one stored scale: float16 2, float32 4, pow2 exponent and float8e5m2 1.
BCT_HD BCT_INLINE std::size_t ScaleItemSize(ScaleKind kind) {
  return kind == ScaleKind::kFloat16 ? 2 : (kind == ScaleKind::kFloat32 ? 4 : 1);
}

// A block's stored scale in its storage form (float16 bits, float32, or biased exponent byte).
struct StoredScale {
  float value;     // the float32 scale the arithmetic uses
  uint32_t bits;   // the stored representation: half bits, float bits, or exponent byte
};

BCT_HD BCT_INLINE float scale_value(ScaleKind kind, const void* scales, int64_t index) {
  switch (kind) {
    case ScaleKind::kFloat16: return float_from_half(static_cast<const uint16_t*>(scales)[index]);
    case ScaleKind::kFloat32: return static_cast<const float*>(scales)[index];
    case ScaleKind::kFloat8E5M2: return float_from_e5m2(static_cast<const uint8_t*>(scales)[index]);
    default: return pow2_scale(static_cast<const uint8_t*>(scales)[index]);
  }
}

BCT_HD BCT_INLINE void store_scale(ScaleKind kind, void* scales, int64_t index, StoredScale s) {
  switch (kind) {
    case ScaleKind::kFloat16: static_cast<uint16_t*>(scales)[index] = static_cast<uint16_t>(s.bits); break;
    case ScaleKind::kFloat32: static_cast<float*>(scales)[index] = s.value; break;
    default: static_cast<uint8_t*>(scales)[index] = static_cast<uint8_t>(s.bits); break;
  }
}

// Float scale -> its stored form (float16 rounds to nearest even).
BCT_HD BCT_INLINE StoredScale make_float_scale(ScaleKind kind, float scale) {
  if (kind == ScaleKind::kFloat16) {
    const uint16_t h = half_from_float(scale);
    return StoredScale{float_from_half(h), h};
  }
  return StoredScale{scale, float_bits(scale)};
}

BCT_HD BCT_INLINE StoredScale make_pow2_scale(int exponent) {
  const uint8_t stored = static_cast<uint8_t>(exponent + kPow2Bias);
  return StoredScale{pow2_scale(stored), stored};
}

// 1 / scale in float32, 0 for a zero scale (block_format._inverse).
BCT_HD BCT_INLINE float inverse_scale(float scale) { return scale == 0.0f ? 0.0f : fdiv(1.0f, scale); }

// Symmetric scale from the block's element of largest magnitude m: m / -2**(bits-1); POW2: the
// smallest 2**e with |m| / (2**(bits-1) - 1) <= 2**e (0 for an all-zero or NaN block).
BCT_HD BCT_INLINE StoredScale symmetric_scale_of_extreme(float m, int bits, ScaleKind kind) {
  if (kind == ScaleKind::kPow2) {
    const float amax = m < 0.0f ? -m : m;
    const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
    if (!(amax > 0.0f)) return make_pow2_scale(0);
    return make_pow2_scale(pow2_exponent_at_least(fdiv(amax, qmax)));
  }
  return make_float_scale(kind, fdiv(m, -static_cast<float>(1 << (bits - 1))));
}

// Symmetric scale of one block x[0..n): the element m of largest magnitude (first on ties; a NaN
// wins like np.argmax) gives scale = m / -2**(bits-1); POW2: smallest 2**e with |m| / qmax <= 2**e.
// A block shorter than block_size was padded with zeros by the spec; zeros never win over the
// first element, and an empty block (n == 0) does not occur.
// The block's elements are x[0], x[stride], ... (stride > 1: a column of a row-major matrix).
BCT_HD BCT_INLINE StoredScale choose_symmetric_scale(const float* x, int64_t n, int bits, ScaleKind kind,
                                                     int64_t stride = 1) {
  float m = 0.0f;
  float best = -1.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    const float a = float_from_bits(float_bits(v) & 0x7fffffffu);  // np.abs
    if (a > best || (is_nan(a) && !is_nan(best))) {
      best = a;
      m = v;
    }
  }
  return symmetric_scale_of_extreme(m, bits, kind);
}

// Asymmetric scale and zero point from lo = min(block, 0) and hi = max(block, 0): the range spread
// over 2**bits - 1 steps; zero point = clamp(rne(-lo / scale), 0, 2**bits - 1).
BCT_HD BCT_INLINE StoredScale asymmetric_scale_of_range(float lo, float hi, int bits, ScaleKind kind,
                                                        uint8_t* zero_point) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const float step = fdiv(fsub(hi, lo), qmax);
  StoredScale s;
  if (kind == ScaleKind::kPow2) {
    s = make_pow2_scale(step > 0.0f ? pow2_exponent_at_least(step) : 0);
  } else {
    s = make_float_scale(kind, step);
  }
  const float inv = inverse_scale(s.value);
  *zero_point = to_u8(round_half_even(clampf(fmul(-lo, inv), 0.0f, qmax)));
  return s;
}

// Asymmetric scale and zero point of one block x[0..n) (min/max propagate NaN like numpy).
BCT_HD BCT_INLINE StoredScale choose_asymmetric_scale(const float* x, int64_t n, int bits, ScaleKind kind,
                                                      uint8_t* zero_point) {
  float lo = 0.0f;
  float hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    lo = nan_min(x[i], lo);
    hi = nan_max(x[i], hi);
  }
  return asymmetric_scale_of_range(lo, hi, bits, kind, zero_point);
}

// ---------------------------------------------------------------------------------------------
// Codes

// Unsigned code of x given inv = inverse_scale(scale) (block_format.codes_for):
//   symmetric:  clamp(rne(x * inv), -2**(bits-1), 2**(bits-1) - 1) + 2**(bits-1)
//   asymmetric: clamp(rne(x * inv) + zp, 0, 2**bits - 1)
// Clamping before rounding to integer bounds gives the same result and keeps |x| small for
// round_half_even.
BCT_HD BCT_INLINE uint8_t code_of(float x, float inv, int bits, bool symmetric, uint8_t zero_point) {
  const float q = fmul(x, inv);
  if (symmetric) {
    const float half = static_cast<float>(1 << (bits - 1));
    return to_u8(fadd(round_half_even(clampf(q, -half, half - 1.0f)), half));
  }
  const float zp = static_cast<float>(zero_point);
  const float qmax = static_cast<float>((1 << bits) - 1);
  return to_u8(fadd(round_half_even(clampf(q, -zp, qmax - zp)), zp));
}

// Value of a code: (u - zero_point) * scale in float32 (block_format.dequantize_codes). For
// symmetric blocks zero_point is 2**(bits-1).
BCT_HD BCT_INLINE float value_of(uint32_t code, float zero_point, float scale) {
  return fmul(fsub(static_cast<float>(code), zero_point), scale);
}

BCT_HD BCT_INLINE float implicit_zero_point(int bits) { return static_cast<float>(1 << (bits - 1)); }

// Bytes of one stored zero point or offset.
BCT_HD BCT_INLINE std::size_t zero_point_item_size(ZeroPointKind kind) {
  return kind == ZeroPointKind::kInteger ? 1 : (kind == ZeroPointKind::kFloat16 ? 2 : 4);
}

// Offset `index` of a float-offset zero_points array (float16 bits or float32), as float32.
BCT_HD BCT_INLINE float offset_value(ZeroPointKind kind, const void* offsets, int64_t index) {
  if (kind == ZeroPointKind::kFloat16) return float_from_half(static_cast<const uint16_t*>(offsets)[index]);
  return static_cast<const float*>(offsets)[index];
}

// Value of a code of a float-offset block: u * scale + offset in float32, one multiplication then
// one addition, each rounded (never an FMA), as block_format.dequantize_codes.
BCT_HD BCT_INLINE float value_with_offset(uint32_t code, float scale, float offset) {
  return fadd(fmul(static_cast<float>(code), scale), offset);
}

// Code of x in a float-offset block given inv = inverse_scale(scale) (block_format.codes_for):
// clamp(rne((x - offset) * inv), 0, 2**bits - 1).
BCT_HD BCT_INLINE uint8_t code_with_offset(float x, float inv, float offset, int bits) {
  const float q = fmul(fsub(x, offset), inv);
  return to_u8(round_half_even(clampf(q, 0.0f, static_cast<float>((1 << bits) - 1))));
}

// ---------------------------------------------------------------------------------------------
// Packing: code i of a row occupies bits [i*bits, (i+1)*bits) of the row, least significant first.

BCT_HD BCT_INLINE int64_t row_bytes(int64_t axis_size, int bits) { return (axis_size * bits + 7) / 8; }
BCT_HD BCT_INLINE int64_t num_blocks(int64_t axis_size, int64_t block_size) {
  return (axis_size + block_size - 1) / block_size;
}

// Code i of a packed row of row_nbytes bytes.
BCT_HD BCT_INLINE uint32_t get_code(const uint8_t* row, int64_t i, int bits, int64_t row_nbytes) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t word = row[byte];
  if (shift + bits > 8 && byte + 1 < row_nbytes) word |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

// ORs code into position i of a row whose bytes start zeroed.
BCT_HD BCT_INLINE void put_code(uint8_t* row, int64_t i, int bits, uint32_t code) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  const uint32_t word = code << shift;
  row[byte] = static_cast<uint8_t>(row[byte] | (word & 0xffu));
  if (shift + bits > 8) row[byte + 1] = static_cast<uint8_t>(row[byte + 1] | (word >> 8));
}

// Indices of the first and last code that overlap byte b of a row (codes may straddle bytes);
// used by kernels that write one whole byte per thread.
BCT_HD BCT_INLINE void codes_in_byte(int64_t b, int bits, int64_t axis_size, int64_t* first, int64_t* last) {
  *first = (b * 8) / bits;
  int64_t l = (b * 8 + 7) / bits;
  *last = l < axis_size - 1 ? l : axis_size - 1;
}

}  // namespace bct
