// CPU loops over one row of the blockwise format, shared by BlockQuantize, BlockDequantize and
// BlockGather (and usable by other ops). All arithmetic comes from bct/block_math.h; the SIMD fast
// paths compute the same float32 operations in the same order, so results stay bit-exact.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bct/block_math.h"

namespace bct {
namespace cpu {

// Instruction-set level of the row loops. kAuto: the best this CPU has (baseline when
// BCT_ONNX_BASELINE_SIMD is set at library load); the others force a level, capped by the CPU.
// Every level computes the same float32 operations in the same order: the same bits.
enum class RowSimd : int { kAuto = 0, kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };

// Format of one row of D values: what every row loop needs.
struct RowFormat {
  int bits = 4;
  int64_t block_size = 32;
  bool symmetric = true;
  ScaleKind scale_kind = ScaleKind::kFloat16;
  int64_t axis_size = 0;   // D
  int64_t row_bytes = 0;   // ceil(D * bits / 8)
  int64_t num_blocks = 0;  // ceil(D / block_size)
  // Asymmetric only: integer zero points (uint8) or float offsets (float16 / float32 elements).
  ZeroPointKind zero_point_kind = ZeroPointKind::kInteger;
  RowSimd simd = RowSimd::kAuto;  // SIMD level of the loops (not part of the format)
};

// Dequantizes one packed row: codes [row_bytes], scales [num_blocks] (stored form, typed by
// scale_kind), zero_points [num_blocks] or nullptr when symmetric -> out [D] float32. With float
// offsets (fmt.zero_point_kind), zero_points points at num_blocks float16 or float32 offsets.
void DequantizeRow(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                   float* out);

// Quantizes one row x [D]: writes packed codes [row_bytes], stored scales [num_blocks] and, when
// asymmetric, zero_points [num_blocks].
void QuantizeRow(const RowFormat& fmt, const float* x, uint8_t* codes, void* scales, uint8_t* zero_points);

// QuantizeRow of `rows` consecutive rows x [rows, D] into codes [rows, row_bytes], scales and zero
// points [rows, num_blocks]. The AVX-512 path does the per-block scale work of all the rows' blocks
// 16 at a time (rows of few blocks, e.g. softmax's, gain most).
void QuantizeRows(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                  uint8_t* zero_points);

// DequantizeRow of `rows` consecutive rows (codes [rows, row_bytes], scales / zero points or float
// offsets [rows, num_blocks]) into out [rows, D]; 8-bit rows with integer zero points have an
// AVX-512 path over the rows' blocks.
void DequantizeRows(const RowFormat& fmt, const uint8_t* codes, const void* scales, const uint8_t* zero_points,
                    int64_t rows, float* out);

// Row-by-row view of a quantized tensor in one RowFormat: codes [rows, row_bytes], scales
// [rows, num_blocks] (stored form), zero points [rows, num_blocks] or nullptr when symmetric.
struct PackedRows {
  PackedRows(const RowFormat& format, const uint8_t* codes, const void* scales, const uint8_t* zero_points)
      : fmt(format),
        codes(codes),
        scales(static_cast<const uint8_t*>(scales)),
        zero_points(zero_points),
        scale_row_bytes(static_cast<std::size_t>(format.num_blocks) * ScaleItemSize(format.scale_kind)) {}

  // Dequantizes row `row` into out [D].
  void Dequantize(int64_t row, float* out) const {
    DequantizeRow(fmt, codes + row * fmt.row_bytes, scales + row * scale_row_bytes,
                  zero_points ? zero_points + row * fmt.num_blocks * zero_point_item_size(fmt.zero_point_kind)
                              : nullptr,
                  out);
  }

  // Dequantizes rows [row, row + count) into out [count, D].
  void DequantizeRange(int64_t row, int64_t count, float* out) const {
    DequantizeRows(fmt, codes + row * fmt.row_bytes, scales + row * scale_row_bytes,
                   zero_points ? zero_points + row * fmt.num_blocks * zero_point_item_size(fmt.zero_point_kind)
                               : nullptr,
                   count, out);
  }

  RowFormat fmt;
  const uint8_t* codes;
  const uint8_t* scales;
  const uint8_t* zero_points;
  std::size_t scale_row_bytes;
};

// The same for a tensor being written.
struct MutablePackedRows {
  MutablePackedRows(const RowFormat& format, uint8_t* codes, void* scales, uint8_t* zero_points)
      : fmt(format),
        codes(codes),
        scales(static_cast<uint8_t*>(scales)),
        zero_points(zero_points),
        scale_row_bytes(static_cast<std::size_t>(format.num_blocks) * ScaleItemSize(format.scale_kind)) {}

  // Quantizes x [D] into row `row`.
  void Quantize(const float* x, int64_t row) const {
    QuantizeRow(fmt, x, codes + row * fmt.row_bytes, scales + row * scale_row_bytes,
                zero_points ? zero_points + row * fmt.num_blocks : nullptr);
  }

  // Quantizes x [count, D] into rows [row, row + count).
  void QuantizeRange(const float* x, int64_t row, int64_t count) const {
    QuantizeRows(fmt, x, count, codes + row * fmt.row_bytes, scales + row * scale_row_bytes,
                 zero_points ? zero_points + row * fmt.num_blocks : nullptr);
  }

  RowFormat fmt;
  uint8_t* codes;
  uint8_t* scales;
  uint8_t* zero_points;
  std::size_t scale_row_bytes;
};

// nl::quantize_act_row (BlockActMatMul's run-time quantization: symmetric, float32 scales, signed
// codes q = u - 2**(bits-1)) of `rows` consecutive rows of k values, with AVX-512: q [rows, k],
// scales [rows, nb]. Returns false, writing nothing, when `simd` does not resolve to kAvx512 (the
// caller then runs its own loop).
bool QuantizeActRowsAvx512(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size, RowSimd simd,
                           int8_t* q, float* scales);

// nl::quantize_act_row of every column of a row-major block b [len, n] (len <= block_size: one
// block per column) with AVX-512: signed codes q [len, n], float32 scales [n]; has_nan[j] = 1 where
// column j holds a NaN (its scale and codes must then be redone with the scalar rule). Returns false,
// writing nothing, when `simd` does not resolve to kAvx512.
bool QuantizeColumnsAvx512(const float* b, int64_t n, int64_t len, int bits, RowSimd simd, int8_t* q, float* scales,
                           uint8_t* has_nan);

// The level `requested` resolves to on this CPU (kAuto -> the load-time choice; a forced level is
// capped by what the CPU has).
RowSimd ResolveRowSimd(RowSimd requested);

// The level the environment asks for now: BCT_ONNX_BASELINE_SIMD set -> kBaseline; else
// BCT_ONNX_ISA=scalar -> kBaseline, avx2 / avxvnni -> kAvx2, avx512vnni -> kAvx512; else kAuto.
// Kernels read it when they are created, so tests can force each path.
RowSimd RowSimdFromEnvironment();

// The SIMD level the row loops use on this machine: "avx512", "avx2" (chosen at run time) or "sse2".
const char* SimdName();

// True when the environment variable BCT_ONNX_BASELINE_SIMD is set (to anything but 0): the row
// loops then use the baseline (SSE2) paths only, so tests can cover both on an AVX2 machine.
bool ForceBaselineSimd();

}  // namespace cpu
}  // namespace bct
