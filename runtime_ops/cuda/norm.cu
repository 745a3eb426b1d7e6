// BlockLayerNorm's and BlockRMSNorm's compute step on CUDA: one warp per row, the arithmetic of
// nl::layer_norm_row / nl::rms_norm_row (lane-ordered sums, correctly rounded sqrt and division).
#include <cuda_runtime.h>

#include "nonlinear_launch.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void LayerNormKernel(const float* scale, const float* bias, float epsilon, float* y, int64_t rows,
                                int64_t d) {
  const int lane = threadIdx.x & 31;
  const float count = static_cast<float>(d);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    float* v = y + row * d;
    const float mean = fdiv(WarpLaneSum(v, d), count);
    const float var = fdiv(WarpLaneSumSq(v, d, mean), count);
    const float inv = fdiv(1.0f, nl::fsqrt(fadd(var, epsilon)));
    __syncwarp();
    for (int64_t i = lane; i < d; i += 32) {
      const float t = fmul(fmul(fsub(v[i], mean), inv), scale[i]);
      v[i] = bias != nullptr ? fadd(t, bias[i]) : t;
    }
    __syncwarp();
  }
}

__global__ void RMSNormKernel(const float* scale, float epsilon, float* y, int64_t rows, int64_t d) {
  const int lane = threadIdx.x & 31;
  const float count = static_cast<float>(d);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    float* v = y + row * d;
    const float ms = fdiv(WarpLaneSumSq(v, d, 0.0f), count);
    const float inv = fdiv(1.0f, nl::fsqrt(fadd(ms, epsilon)));
    __syncwarp();
    for (int64_t i = lane; i < d; i += 32) v[i] = fmul(fmul(v[i], inv), scale[i]);
    __syncwarp();
  }
}

}  // namespace

const char* LaunchNormRows(RowOp op, const float* scale, const float* bias, float epsilon, float* y, int64_t rows,
                           int64_t d, void* stream) {
  if (rows == 0 || d == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  if (op == RowOp::kLayerNorm) {
    LayerNormKernel<<<RowGrid(rows), kRowThreads, 0, s>>>(scale, bias, epsilon, y, rows, d);
  } else {
    RMSNormKernel<<<RowGrid(rows), kRowThreads, 0, s>>>(scale, epsilon, y, rows, d);
  }
  return LastCudaError();
}

}  // namespace cuda
}  // namespace bct
