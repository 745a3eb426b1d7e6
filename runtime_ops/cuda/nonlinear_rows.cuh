// Device helpers shared by the row-wise nonlinear kernels (gelu.cu, softmax.cu, norm.cu): one warp
// per row, with row sums in exactly the lane order of bct/nonlinear_math.h (lane j of the spec is
// thread j of the warp, adding elements j, j+8, ... in order), so results match the CPU bit for bit.
#pragma once

#include <cuda_runtime.h>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"

namespace bct {
namespace cuda {

constexpr int kRowThreads = 128;  // 4 warps, one row each
constexpr int kRowsPerBlock = kRowThreads / 32;

inline unsigned RowGrid(int64_t rows) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

inline const char* LastCudaError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Scratch memory on the stream: the stream-ordered allocator, or, on a device without memory pools,
// plain cudaMalloc / cudaFree (cudaFree synchronises the device: slower, still correct).
inline cudaError_t AllocScratch(void** p, size_t bytes, cudaStream_t stream, bool* async) {
  *async = true;
  cudaError_t err = cudaMallocAsync(p, bytes, stream);
  if (err == cudaErrorNotSupported) {
    cudaGetLastError();  // clear it
    *async = false;
    err = cudaMalloc(p, bytes);
  }
  return err;
}

inline cudaError_t FreeScratch(void* p, cudaStream_t stream, bool async) {
  if (p == nullptr) return cudaSuccess;
  return async ? cudaFreeAsync(p, stream) : cudaFree(p);
}

// nl::lane_sum of v[0..n) computed by a whole warp; every lane gets the result.
__device__ __forceinline__ float WarpLaneSum(const float* v, int64_t n) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  if (lane < nl::kLanes) {
    for (int64_t i = lane; i < n; i += nl::kLanes) acc = fadd(acc, v[i]);
  }
  float lanes[nl::kLanes];
  for (int j = 0; j < nl::kLanes; ++j) lanes[j] = __shfl_sync(0xffffffffu, acc, j);
  return nl::combine_lanes(lanes);
}

// nl::lane_sum_sq of v[0..n) about c, by a whole warp.
__device__ __forceinline__ float WarpLaneSumSq(const float* v, int64_t n, float c) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  if (lane < nl::kLanes) {
    for (int64_t i = lane; i < n; i += nl::kLanes) {
      const float d = fsub(v[i], c);
      acc = fadd(acc, fmul(d, d));
    }
  }
  float lanes[nl::kLanes];
  for (int j = 0; j < nl::kLanes; ++j) lanes[j] = __shfl_sync(0xffffffffu, acc, j);
  return nl::combine_lanes(lanes);
}

// Max of v[0..n) ignoring NaNs (-inf if none), by a whole warp (order does not matter for max).
__device__ __forceinline__ float WarpMax(const float* v, int64_t n) {
  const int lane = threadIdx.x & 31;
  float m = -__builtin_huge_valf();
  for (int64_t i = lane; i < n; i += 32) m = v[i] > m ? v[i] : m;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, m, offset);
    m = other > m ? other : m;
  }
  return m;
}

}  // namespace cuda
}  // namespace bct
