// CUDA kernel of BlockMatMul's epilogue (bct/epilogue.h): one thread per output element through
// EpilogueOne, the function tests/cuda_threads_on_host.cc runs on the host against the spec.
#include <cuda_runtime.h>

#include "bct/epilogue.h"
#include "launch_grid.cuh"
#include "matmul_launch.h"

namespace bct {
namespace cuda {
namespace {

__global__ void MatMulEpilogueKernel(Epilogue e, const float* p, int64_t rows, int64_t n, float* out) {
  const int64_t total = rows * epilogue_width(e, n);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[t] = EpilogueOne(e, p, n, t);
  }
}

}  // namespace

const char* LaunchMatMulEpilogue(Epilogue e, const float* p, int64_t rows, int64_t n, float* out, void* stream) {
  const int64_t total = rows * epilogue_width(e, n);
  if (total <= 0) return nullptr;
  MatMulEpilogueKernel<<<GridFor(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(e, p, rows, n, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace bct
