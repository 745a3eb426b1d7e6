// CUDA kernels of BlockQuantize, BlockDequantize and BlockGather. Simple and exact: every value is
// computed by the same bct/block_math.h functions the CPU kernels use (no FMA contraction: the
// header uses __fmul_rn/__fadd_rn on the device).
#include <cuda_runtime.h>

#include "bct/block_math.h"
#include "block_launch.h"
#include "block_threads.h"
#include "launch_grid.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void DequantizeKernel(RowFormat fmt, const uint8_t* codes, const void* scales,
                                 const uint8_t* zero_points, int64_t total, float* out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / fmt.axis_size;
    const int64_t i = k - row * fmt.axis_size;
    out[k] = DequantizeOne(fmt, codes, scales, zero_points, row, i);
  }
}

__global__ void GatherKernel(RowFormat fmt, const int64_t* rows, const uint8_t* codes, const void* scales,
                             const uint8_t* zero_points, int64_t total, float* out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = k / fmt.axis_size;
    const int64_t i = k - n * fmt.axis_size;
    out[k] = DequantizeOne(fmt, codes, scales, zero_points, rows[n], i);
  }
}

// One thread per (row, block): choose and store the scale (and zero point).
__global__ void ChooseScalesKernel(RowFormat fmt, const float* x, int64_t total_blocks, void* scales,
                                   uint8_t* zero_points) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total_blocks;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ChooseScaleOne(fmt, x, k, scales, zero_points);
  }
}

// One thread per output byte: computes the codes overlapping that byte from the stored scales.
__global__ void PackCodesKernel(RowFormat fmt, const float* x, int64_t total_bytes, const void* scales,
                                const uint8_t* zero_points, uint8_t* codes) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total_bytes;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    codes[k] = PackByteOne(fmt, x, k, scales, zero_points);
  }
}

const char* LastError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* LaunchDequantize(const RowFormat& fmt, const uint8_t* codes, const void* scales,
                             const uint8_t* zero_points, int64_t rows, float* out, void* stream) {
  const int64_t total = rows * fmt.axis_size;
  if (total == 0) return nullptr;
  DequantizeKernel<<<GridFor(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(fmt, codes, scales,
                                                                                         zero_points, total, out);
  return LastError();
}

const char* LaunchGather(const RowFormat& fmt, const int64_t* host_rows, int64_t count, const uint8_t* codes,
                         const void* scales, const uint8_t* zero_points, float* out, void* stream) {
  if (count == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  int64_t* rows = nullptr;
  const size_t nbytes = static_cast<size_t>(count) * sizeof(int64_t);
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&rows), nbytes, s);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  // From pageable memory the copy returns once host_rows has been staged, so the caller may free it.
  err = cudaMemcpyAsync(rows, host_rows, nbytes, cudaMemcpyHostToDevice, s);
  if (err == cudaSuccess) {
    const int64_t total = count * fmt.axis_size;
    GatherKernel<<<GridFor(total), kThreads, 0, s>>>(fmt, rows, codes, scales, zero_points, total, out);
    err = cudaGetLastError();
  }
  const cudaError_t free_err = cudaFreeAsync(rows, s);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return free_err == cudaSuccess ? nullptr : cudaGetErrorString(free_err);
}

const char* LaunchQuantize(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                           uint8_t* zero_points, void* stream) {
  if (rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t total_blocks = rows * fmt.num_blocks;
  ChooseScalesKernel<<<GridFor(total_blocks), kThreads, 0, s>>>(fmt, x, total_blocks, scales, zero_points);
  if (const char* err = LastError()) return err;
  const int64_t total_bytes = rows * fmt.row_bytes;
  PackCodesKernel<<<GridFor(total_bytes), kThreads, 0, s>>>(fmt, x, total_bytes, scales, zero_points, codes);
  return LastError();
}

}  // namespace cuda
}  // namespace bct
