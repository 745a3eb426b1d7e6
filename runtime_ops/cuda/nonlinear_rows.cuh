// Device helpers shared by the row-wise nonlinear kernels (gelu.cu, softmax.cu, norm.cu): one warp
// per row (DeviceWarp, for the row functions of row_threads.h), with row sums in exactly the lane
// order of bct/nonlinear_math.h (lane j of the spec is thread j of the warp, adding elements j,
// j+8, ... in order), so results match the CPU bit for bit.
#pragma once

#include <cuda_runtime.h>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "row_threads.h"

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

// Scratch allocations of a launcher (AllocScratch), freed on the stream when it returns (at most 8).
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  ~Scratch() {
    for (int i = 0; i < count_; ++i) FreeScratch(ptrs_[i], stream_, async_[i]);
  }
  template <class T>
  T* Get(int64_t n, const char** err) {
    void* p = nullptr;
    if (*err != nullptr) return nullptr;
    bool async = true;
    const cudaError_t alloc = AllocScratch(&p, static_cast<size_t>(n > 0 ? n : 1) * sizeof(T), stream_, &async);
    if (alloc != cudaSuccess) {
      *err = cudaGetErrorString(alloc);
      return nullptr;
    }
    ptrs_[count_] = p;
    async_[count_++] = async;
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t stream_;
  void* ptrs_[8] = {};
  bool async_[8] = {};
  int count_ = 0;
};

// The warp of a row function (row_threads.h) on the device: this thread is one lane; reductions
// combine the lanes' parts with shuffles, and every lane gets the result.
struct DeviceWarp {
  __device__ float Max(const float* v, int64_t n) const {
    float m = RowMaxPart(v, n, threadIdx.x & 31);
    for (int offset = 16; offset > 0; offset >>= 1) m = CombineMax(m, __shfl_xor_sync(0xffffffffu, m, offset));
    return m;
  }
  __device__ float LaneSum(const float* v, int64_t n) const {
    const int lane = threadIdx.x & 31;
    return Combine(lane < nl::kLanes ? LaneSumPart(v, n, lane) : 0.0f);
  }
  __device__ float LaneSumSq(const float* v, int64_t n, float c) const {
    const int lane = threadIdx.x & 31;
    return Combine(lane < nl::kLanes ? LaneSumSqPart(v, n, c, lane) : 0.0f);
  }
  template <class F>
  __device__ void ForLanes(const F& f) const {
    f(static_cast<int>(threadIdx.x & 31));
    __syncwarp();
  }

 private:
  // nl::combine_lanes of spec lanes 0..7 (threads 0..7 of the warp).
  __device__ static float Combine(float part) {
    float lanes[nl::kLanes];
    for (int j = 0; j < nl::kLanes; ++j) lanes[j] = __shfl_sync(0xffffffffu, part, j);
    return nl::combine_lanes(lanes);
  }
};

}  // namespace cuda
}  // namespace bct
