// The work of one CUDA thread of each BlockQuantize / BlockDequantize / BlockGather kernel, as
// host/device functions, so that tests/cuda_threads_on_host.cc can run every "thread" on the CPU
// and check the CUDA kernels' indexing and packing without a GPU. block_kernels.cu only adds the
// grid-stride loops and the launches.
#pragma once

#include <cstdint>

#include "bct/block_math.h"
#include "block_launch.h"

namespace bct {
namespace cuda {

// Value of element i of row `row`.
BCT_HD BCT_INLINE float DequantizeOne(const RowFormat& fmt, const uint8_t* codes, const void* scales,
                                      const uint8_t* zero_points, int64_t row, int64_t i) {
  const int64_t b = i / fmt.block_size;
  const int64_t block_index = row * fmt.num_blocks + b;
  const float scale = scale_value(static_cast<ScaleKind>(fmt.scale_kind), scales, block_index);
  const ZeroPointKind zp_kind = static_cast<ZeroPointKind>(fmt.zero_point_kind);
  if (!fmt.symmetric && zp_kind != ZeroPointKind::kInteger) {  // float offset: u * scale + offset
    const uint32_t code = get_code(codes + row * fmt.row_bytes, i, fmt.bits, fmt.row_bytes);
    return value_with_offset(code, scale, offset_value(zp_kind, zero_points, block_index));
  }
  const float zp = fmt.symmetric ? implicit_zero_point(fmt.bits) : static_cast<float>(zero_points[block_index]);
  const uint32_t code = get_code(codes + row * fmt.row_bytes, i, fmt.bits, fmt.row_bytes);
  return value_of(code, zp, scale);
}

// Thread k of the scale kernel: block k (row-major over [rows, num_blocks]) gets its stored scale
// (and zero point).
BCT_HD BCT_INLINE void ChooseScaleOne(const RowFormat& fmt, const float* x, int64_t k, void* scales,
                                      uint8_t* zero_points) {
  const ScaleKind kind = static_cast<ScaleKind>(fmt.scale_kind);
  const int64_t row = k / fmt.num_blocks;
  const int64_t b = k - row * fmt.num_blocks;
  const int64_t begin = b * fmt.block_size;
  const int64_t end = begin + fmt.block_size < fmt.axis_size ? begin + fmt.block_size : fmt.axis_size;
  const float* xb = x + row * fmt.axis_size + begin;
  if (fmt.symmetric) {
    store_scale(kind, scales, k, choose_symmetric_scale(xb, end - begin, fmt.bits, kind));
  } else {
    uint8_t zp = 0;
    store_scale(kind, scales, k, choose_asymmetric_scale(xb, end - begin, fmt.bits, kind, &zp));
    zero_points[k] = zp;
  }
}

// Thread k of the packing kernel: output byte k (row-major over [rows, row_bytes]), assembled from
// the codes that overlap it, computed from the stored scales the scale kernel wrote.
BCT_HD BCT_INLINE uint8_t PackByteOne(const RowFormat& fmt, const float* x, int64_t k, const void* scales,
                                      const uint8_t* zero_points) {
  const ScaleKind kind = static_cast<ScaleKind>(fmt.scale_kind);
  const int64_t row = k / fmt.row_bytes;
  const int64_t byte = k - row * fmt.row_bytes;
  int64_t first = 0, last = 0;
  codes_in_byte(byte, fmt.bits, fmt.axis_size, &first, &last);
  uint32_t value = 0;
  for (int64_t i = first; i <= last; ++i) {
    const int64_t block_index = row * fmt.num_blocks + i / fmt.block_size;
    const float inv = inverse_scale(scale_value(kind, scales, block_index));
    const uint8_t zp = fmt.symmetric ? uint8_t{0} : zero_points[block_index];
    const uint32_t code = code_of(x[row * fmt.axis_size + i], inv, fmt.bits, fmt.symmetric, zp);
    const int64_t shift = i * fmt.bits - byte * 8;  // negative for a code that starts in the byte before
    value |= shift >= 0 ? (code << shift) : (code >> -shift);
  }
  return static_cast<uint8_t>(value & 0xffu);
}

}  // namespace cuda
}  // namespace bct
