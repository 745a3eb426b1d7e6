// LaunchRowOp: the dequantize -> compute -> requantize driver of the row-wise nonlinear ops on
// CUDA. Dequantization and quantization are the BlockDequantize / BlockQuantize launchers
// (block_kernels.cu); the compute step is the family's launcher (gelu.cu, silu.cu, softmax.cu,
// norm.cu).
// Scratch: AllocScratch / FreeScratch (nonlinear_rows.cuh).
#include <cuda_runtime.h>

#include "nonlinear_launch.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {

const char* LaunchRowOp(const RowOpArgs& a, void* stream) {
  if (a.rows == 0 || a.d == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const size_t bytes = static_cast<size_t>(a.rows) * static_cast<size_t>(a.d) * sizeof(float);
  float* buffer = a.y;
  bool async = true;
  if (a.out_quantized) {
    void* scratch = nullptr;
    const cudaError_t alloc = AllocScratch(&scratch, bytes, s, &async);
    if (alloc != cudaSuccess) return cudaGetErrorString(alloc);
    buffer = static_cast<float*>(scratch);
  }
  const char* err = nullptr;
  if (a.in_quantized) {
    err = LaunchDequantize(a.in_fmt, a.in_codes, a.in_scales, a.in_zero_points, a.rows, buffer, stream);
  } else if (cudaMemcpyAsync(buffer, a.x, bytes, cudaMemcpyDeviceToDevice, s) != cudaSuccess) {
    err = LastCudaError();
  }
  if (err == nullptr) {
    switch (a.op) {
      case RowOp::kGeluErf:
      case RowOp::kGeluTanh: err = LaunchGeluRows(a.op, buffer, a.rows, a.d, stream); break;
      case RowOp::kSilu: err = LaunchSiluRows(buffer, a.rows, a.d, stream); break;
      case RowOp::kSoftmax: err = LaunchSoftmaxRows(buffer, a.rows, a.d, stream); break;
      default:
        err = LaunchNormRows(a.op, a.scale, a.bias, a.epsilon, a.skip, a.skip_rows, a.sum, buffer, a.rows, a.d,
                             stream);
        break;
    }
  }
  if (err == nullptr && a.out_quantized) {
    err = LaunchQuantize(a.out_fmt, buffer, a.rows, a.out_codes, a.out_scales, a.out_zero_points, stream);
  }
  if (a.out_quantized) {
    const cudaError_t freed = FreeScratch(buffer, s, async);
    if (err == nullptr && freed != cudaSuccess) err = cudaGetErrorString(freed);
  }
  return err;
}

}  // namespace cuda
}  // namespace bct
