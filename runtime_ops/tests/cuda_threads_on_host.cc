// Test helper (not shipped): runs every thread of the CUDA kernels of BlockQuantize,
// BlockDequantize and BlockGather on the host, one after the other, through the same per-thread
// functions the kernels call (cuda/block_threads.h). tests/runtime_ops/test_cuda_threads_on_host.py
// loads this library with ctypes and compares its results with the numpy specification, so the
// kernels' indexing, packing and rounding are checked on machines without a GPU.
#include <cstdint>

#include "block_threads.h"

namespace {

bct::cuda::RowFormat Format(int bits, int64_t block_size, int symmetric, int scale_kind, int64_t axis_size) {
  return bct::cuda::RowFormat{bits,
                              block_size,
                              symmetric != 0,
                              scale_kind,
                              axis_size,
                              bct::row_bytes(axis_size, bits),
                              bct::num_blocks(axis_size, block_size),
                              /*zero_point_kind=*/0};
}

}  // namespace

extern "C" {

// scale_kind: 0 float16, 1 float32, 2 pow2 (bct::ScaleKind).
__attribute__((visibility("default"))) void bct_host_quantize(int bits, int64_t block_size, int symmetric,
                                                              int scale_kind, int64_t axis_size, int64_t rows,
                                                              const float* x, uint8_t* codes, void* scales,
                                                              uint8_t* zero_points) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < rows * fmt.num_blocks; ++k) bct::cuda::ChooseScaleOne(fmt, x, k, scales, zero_points);
  for (int64_t k = 0; k < rows * fmt.row_bytes; ++k) codes[k] = bct::cuda::PackByteOne(fmt, x, k, scales, zero_points);
}

__attribute__((visibility("default"))) void bct_host_dequantize(int bits, int64_t block_size, int symmetric,
                                                                int scale_kind, int64_t axis_size, int64_t rows,
                                                                const uint8_t* codes, const void* scales,
                                                                const uint8_t* zero_points, float* out) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < rows * axis_size; ++k) {
    const int64_t row = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, zero_points, row, k - row * axis_size);
  }
}

__attribute__((visibility("default"))) void bct_host_gather(int bits, int64_t block_size, int symmetric,
                                                            int scale_kind, int64_t axis_size, const int64_t* rows,
                                                            int64_t count, const uint8_t* codes, const void* scales,
                                                            const uint8_t* zero_points, float* out) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < count * axis_size; ++k) {
    const int64_t n = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, zero_points, rows[n], k - n * axis_size);
  }
}

// Float-offset blocks (value = u * scale + offset): zero_point_kind 1 float16 / 2 float32 offsets.
__attribute__((visibility("default"))) void bct_host_dequantize_offsets(int bits, int64_t block_size, int scale_kind,
                                                                        int zero_point_kind, int64_t axis_size,
                                                                        int64_t rows, const uint8_t* codes,
                                                                        const void* scales, const void* offsets,
                                                                        float* out) {
  auto fmt = Format(bits, block_size, /*symmetric=*/0, scale_kind, axis_size);
  fmt.zero_point_kind = zero_point_kind;
  const auto* offset_bytes = static_cast<const uint8_t*>(offsets);
  for (int64_t k = 0; k < rows * axis_size; ++k) {
    const int64_t row = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, offset_bytes, row, k - row * axis_size);
  }
}

}  // extern "C"
