// BlockSilu's compute step on CUDA: nl::silu (bct/nonlinear_math.h) per element.
#include <cuda_runtime.h>

#include "nonlinear_launch.h"
#include "launch_grid.cuh"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void SiluKernel(float* y, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = SiluOne(y[i]);
  }
}

}  // namespace

const char* LaunchSiluRows(float* y, int64_t rows, int64_t d, void* stream) {
  const int64_t total = rows * d;
  if (total == 0) return nullptr;
  SiluKernel<<<GridFor(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(y, total);
  return LastCudaError();
}

}  // namespace cuda
}  // namespace bct
