// CUDA kernels of BlockMatMul: simple and correct, one thread per output element. Every format
// formula (code access, scales, activation quantization) comes from bct/block_math.h, the header the
// CPU kernels and their tests use, and the accumulation order per output matches the CPU kernels:
//   act_bits > 0: per block f = float(dot(sa, uw) - zw * sum(sa)) * a_scale; y = fma(f, w_scale, y)
//   act_bits = 0: y = fma(a[k], (uw - zw) * w_scale, y)
// Float-offset weights (zero_point_kind 1/2): f = fma(offset, sum(sa), float(dot) * w_scale);
//   y = fma(f, a_scale, y); float mode y = fma(a[k], value_with_offset(uw, w_scale, offset), y).
#include <cuda_runtime.h>

#include "bct/block_math.h"
#include "block_launch.h"
#include "launch_grid.cuh"
#include "matmul_launch.h"
#include "matmul_threads.h"

namespace bct {
namespace cuda {
namespace {

// Grid-stride loops over the thread bodies of matmul_threads.h.
__global__ void QuantizeActivationsKernel(MatMulParams p, const float* a, int64_t total_blocks, int8_t* codes,
                                          float* scales, int32_t* sums) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total_blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    QuantizeActBlockOne(a, p.K, p.act_bits, p.block_size, p.num_blocks, t, codes, scales, sums);
  }
}

__global__ void UnpackActivationsKernel(MatMulParams p, const uint8_t* packed, const float* packed_scales,
                                        int64_t total_blocks, int8_t* codes, float* scales, int32_t* sums) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total_blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    UnpackActBlockOne(p, packed, packed_scales, t, codes, scales, sums);
  }
}

__global__ void MatMulKernel(MatMulParams p, const float* a, const int8_t* a_codes, const float* a_scales,
                             const int32_t* a_sums, int64_t rows, const uint8_t* codes, const void* scales,
                             const uint8_t* zero_points, const float* bias, float* y) {
  const int64_t total = rows * p.N;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[t] = MatMulOne(p, a, a_codes, a_scales, a_sums, codes, scales, zero_points, bias, t);
  }
}

}  // namespace

const char* LaunchBlockMatMul(const MatMulParams& params, const float* a, int64_t rows, const uint8_t* codes,
                              const void* scales, const uint8_t* zero_points, const float* bias, float* y,
                              void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (rows <= 0 || params.N <= 0) return nullptr;
  int8_t* a_codes = nullptr;
  float* a_scales = nullptr;
  int32_t* a_sums = nullptr;
  cudaError_t err = cudaSuccess;
  if (params.act_bits > 0) {
    const int64_t total_blocks = rows * params.num_blocks;
    // One stream-ordered scratch allocation: codes, then scales, then sums (4-byte aligned).
    const size_t code_bytes = (static_cast<size_t>(rows * params.K) + 3) / 4 * 4;
    const size_t bytes = code_bytes + static_cast<size_t>(total_blocks) * (sizeof(float) + sizeof(int32_t));
    void* scratch = nullptr;
    err = cudaMallocAsync(&scratch, bytes, s);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    a_codes = static_cast<int8_t*>(scratch);
    a_scales = reinterpret_cast<float*>(static_cast<char*>(scratch) + code_bytes);
    a_sums = reinterpret_cast<int32_t*>(a_scales + total_blocks);
    QuantizeActivationsKernel<<<GridFor(total_blocks), kThreads, 0, s>>>(params, a, total_blocks, a_codes, a_scales,
                                                                        a_sums);
    err = cudaGetLastError();
    if (err == cudaSuccess) {
      MatMulKernel<<<GridFor(rows * params.N), kThreads, 0, s>>>(params, a, a_codes, a_scales, a_sums, rows, codes,
                                                                 scales, zero_points, bias, y);
      err = cudaGetLastError();
    }
    const cudaError_t free_err = cudaFreeAsync(scratch, s);
    if (err == cudaSuccess) err = free_err;
  } else {
    MatMulKernel<<<GridFor(rows * params.N), kThreads, 0, s>>>(params, a, nullptr, nullptr, nullptr, rows, codes,
                                                               scales, zero_points, bias, y);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* LaunchBlockMatMulIo(const MatMulParams& params, const MatMulIo& io, int64_t rows, const uint8_t* codes,
                                const void* scales, const uint8_t* zero_points, const float* bias, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (rows <= 0 || params.N <= 0) return nullptr;
  const bool in_quantized = io.a_codes != nullptr;
  const bool has_epilogue = io.epilogue != Epilogue::kNone;
  if (!in_quantized && !io.out_quantized && !has_epilogue) {
    return LaunchBlockMatMul(params, io.a, rows, codes, scales, zero_points, bias, io.y, stream);
  }
  // One stream-ordered scratch allocation: Y (when requantized), the product (when an epilogue
  // follows), then A's float values (when dequantized) or A's signed codes, scales and sums (own format).
  const int64_t total_blocks = rows * params.num_blocks;
  const int64_t width = epilogue_width(io.epilogue, params.N);
  const size_t y_bytes = io.out_quantized ? static_cast<size_t>(rows * width) * sizeof(float) : 0;
  const size_t p_bytes = has_epilogue ? static_cast<size_t>(rows * params.N) * sizeof(float) : 0;
  size_t a_bytes = 0;
  const size_t code_bytes = (static_cast<size_t>(rows * params.K) + 3) / 4 * 4;
  if (in_quantized && io.own_format) {
    a_bytes = code_bytes + static_cast<size_t>(total_blocks) * (sizeof(float) + sizeof(int32_t));
  } else if (in_quantized) {
    a_bytes = static_cast<size_t>(rows * params.K) * sizeof(float);
  }
  void* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(&scratch, y_bytes + p_bytes + a_bytes + 4, s);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  char* base = static_cast<char*>(scratch);
  float* y = io.out_quantized ? reinterpret_cast<float*>(base) : io.y;  // Y [rows, width]
  float* product = has_epilogue ? reinterpret_cast<float*>(base + y_bytes) : y;  // [rows, N]
  char* a_base = base + y_bytes + p_bytes;
  const char* error = nullptr;
  if (in_quantized && io.own_format) {
    int8_t* a_codes = reinterpret_cast<int8_t*>(a_base);
    float* a_scales = reinterpret_cast<float*>(a_base + code_bytes);
    int32_t* a_sums = reinterpret_cast<int32_t*>(a_scales + total_blocks);
    UnpackActivationsKernel<<<GridFor(total_blocks), kThreads, 0, s>>>(
        params, io.a_codes, static_cast<const float*>(io.a_scales), total_blocks, a_codes, a_scales, a_sums);
    err = cudaGetLastError();
    if (err == cudaSuccess) {
      MatMulKernel<<<GridFor(rows * params.N), kThreads, 0, s>>>(params, nullptr, a_codes, a_scales, a_sums, rows,
                                                                 codes, scales, zero_points, bias, product);
      err = cudaGetLastError();
    }
    if (err != cudaSuccess) error = cudaGetErrorString(err);
  } else {
    const float* a = io.a;
    if (in_quantized) {
      float* deq = reinterpret_cast<float*>(a_base);
      error = LaunchDequantize(io.in_fmt, io.a_codes, io.a_scales, io.a_zero_points, rows, deq, stream);
      a = deq;
    }
    if (error == nullptr) error = LaunchBlockMatMul(params, a, rows, codes, scales, zero_points, bias, product, stream);
  }
  if (error == nullptr && has_epilogue) error = LaunchMatMulEpilogue(io.epilogue, product, rows, params.N, y, stream);
  if (error == nullptr && io.out_quantized) {
    error = LaunchQuantize(io.out_fmt, y, rows, io.out_codes, io.out_scales, io.out_zero_points, stream);
  }
  const cudaError_t free_err = cudaFreeAsync(scratch, s);
  if (error == nullptr && free_err != cudaSuccess) error = cudaGetErrorString(free_err);
  return error;
}

}  // namespace cuda
}  // namespace bct
