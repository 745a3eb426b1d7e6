// BlockLayerNorm's and BlockRMSNorm's compute step on CUDA (and BlockAddLayerNorm's / BlockAddRMSNorm's,
// which add the residual first): one warp per row, the arithmetic of nl::layer_norm_row /
// nl::rms_norm_row (lane-ordered sums, correctly rounded sqrt and division).
#include <cuda_runtime.h>

#include "nonlinear_launch.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void LayerNormKernel(const float* scale, const float* bias, float epsilon, const float* skip,
                                int64_t skip_rows, float* sum, float* y, int64_t rows, int64_t d) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    if (skip != nullptr) {
      AddSkipRow(DeviceWarp{}, skip + (row % skip_rows) * d, sum != nullptr ? sum + row * d : nullptr, y + row * d, d);
    }
    LayerNormRow(DeviceWarp{}, scale, bias, epsilon, y + row * d, d);
  }
}

__global__ void RMSNormKernel(const float* scale, float epsilon, const float* skip, int64_t skip_rows, float* sum,
                              float* y, int64_t rows, int64_t d) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    if (skip != nullptr) {
      AddSkipRow(DeviceWarp{}, skip + (row % skip_rows) * d, sum != nullptr ? sum + row * d : nullptr, y + row * d, d);
    }
    RMSNormRow(DeviceWarp{}, scale, epsilon, y + row * d, d);
  }
}

}  // namespace

const char* LaunchNormRows(RowOp op, const float* scale, const float* bias, float epsilon, const float* skip,
                           int64_t skip_rows, float* sum, float* y, int64_t rows, int64_t d, void* stream) {
  if (rows == 0 || d == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  if (op == RowOp::kLayerNorm) {
    LayerNormKernel<<<RowGrid(rows), kRowThreads, 0, s>>>(scale, bias, epsilon, skip, skip_rows, sum, y, rows, d);
  } else {
    RMSNormKernel<<<RowGrid(rows), kRowThreads, 0, s>>>(scale, epsilon, skip, skip_rows, sum, y, rows, d);
  }
  return LastCudaError();
}

}  // namespace cuda
}  // namespace bct
