// BlockSoftmax's compute step on CUDA: one warp per row, nl::softmax_row's arithmetic (max, exp_f32,
// lane-ordered sum, reciprocal, product) so the CPU and CUDA results agree bit for bit.
#include <cuda_runtime.h>

#include "nonlinear_launch.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void SoftmaxKernel(float* y, int64_t rows, int64_t d) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    SoftmaxRow(DeviceWarp{}, y + row * d, d);
  }
}

}  // namespace

const char* LaunchSoftmaxRows(float* y, int64_t rows, int64_t d, void* stream) {
  if (rows == 0 || d == 0) return nullptr;
  SoftmaxKernel<<<RowGrid(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(y, rows, d);
  return LastCudaError();
}

}  // namespace cuda
}  // namespace bct
