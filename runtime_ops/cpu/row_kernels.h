// CPU loops over rows of the blockwise format: the one quantize-rows and dequantize-rows of every
// op that reads or writes the format (BlockQuantize, BlockDequantize, BlockGather, the operands
// and results of the other ops). All arithmetic comes from bct/block_math.h; the SIMD fast
// paths compute the same float32 operations in the same order, so results stay bit-exact.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bct/block_math.h"
#include "cpu/isa.h"

namespace bct {
namespace cpu {

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
  Isa isa = Isa::kBaseline;  // the loops' path (not part of the format): the kernel's, cpu/isa.h
};

// Quantizes `rows` consecutive rows x [rows, D] into codes [rows, row_bytes], stored scales and,
// when asymmetric, zero points [rows, num_blocks], on the path fmt.isa. The AVX-512 path does the
// per-block scale work of all the rows' blocks 16 at a time (rows of few blocks, e.g. softmax's,
// gain most).
void QuantizeRows(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                  uint8_t* zero_points);

// Dequantizes `rows` consecutive packed rows, codes [rows, row_bytes], scales [rows, num_blocks]
// (stored form, typed by scale_kind), zero points [rows, num_blocks] or nullptr when symmetric (with
// float offsets, fmt.zero_point_kind: float16 / float32 offsets) into out [rows, D], on the path
// fmt.isa; 8-bit rows with integer zero points have an AVX-512 path over the rows' blocks.
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
  void Dequantize(int64_t row, float* out) const { DequantizeRange(row, 1, out); }

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
  void Quantize(const float* x, int64_t row) const { QuantizeRange(x, row, 1); }

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

}  // namespace cpu
}  // namespace bct
