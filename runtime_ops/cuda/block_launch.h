// Plain C++ launchers of the CUDA kernels of BlockQuantize, BlockDequantize and BlockGather.
// This header is all the host side (compiled by the C++ compiler with ORT headers) sees of
// block_kernels.cu (compiled by nvcc without ORT headers). Pointers are device pointers unless
// named host_*; stream is a cudaStream_t. Each launcher returns nullptr on success or the CUDA
// error string of the first failing call.
#pragma once

#include <cstdint>

namespace bct {
namespace cuda {

struct RowFormat {
  int bits;
  int64_t block_size;
  bool symmetric;
  int scale_kind;  // bct::ScaleKind as int
  int64_t axis_size;
  int64_t row_bytes;
  int64_t num_blocks;
  int zero_point_kind;  // bct::ZeroPointKind as int: 0 uint8 zero points, 1 float16 / 2 float32 offsets
};

// zero_points: the bytes of uint8 zero points or float16 / float32 offsets (fmt.zero_point_kind).
const char* LaunchDequantize(const RowFormat& fmt, const uint8_t* codes, const void* scales,
                             const uint8_t* zero_points, int64_t rows, float* out, void* stream);

// host_rows: validated, non-negative table rows (copied to the device by the launcher).
const char* LaunchGather(const RowFormat& fmt, const int64_t* host_rows, int64_t count, const uint8_t* codes,
                         const void* scales, const uint8_t* zero_points, float* out, void* stream);

const char* LaunchQuantize(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                           uint8_t* zero_points, void* stream);

}  // namespace cuda
}  // namespace bct
