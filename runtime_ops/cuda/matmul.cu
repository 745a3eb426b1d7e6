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
#include "matmul_launch.h"

namespace bct {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// One thread per (row, block) of A: block_format.quantize_codes(A, BlockFormat(act_bits, block_size,
// True, "float32")), stored as signed codes sa = code - 2**(act_bits-1), with the block's scale and sum(sa).
__global__ void QuantizeActivationsKernel(MatMulParams p, const float* a, int64_t total_blocks, int8_t* codes,
                                          float* scales, int32_t* sums) {
  const int half = 1 << (p.act_bits - 1);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total_blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / p.num_blocks;
    const int64_t b = t - row * p.num_blocks;
    const int64_t begin = b * p.block_size;
    const int64_t len = begin + p.block_size < p.K ? p.block_size : p.K - begin;
    const float* x = a + row * p.K + begin;
    const float scale = choose_symmetric_scale(x, len, p.act_bits, ScaleKind::kFloat32).value;
    const float inv = inverse_scale(scale);
    int32_t sum = 0;
    for (int64_t k = 0; k < len; ++k) {
      const int code = static_cast<int>(code_of(x[k], inv, p.act_bits, true, 0)) - half;
      codes[row * p.K + begin + k] = static_cast<int8_t>(code);
      sum += code;
    }
    scales[t] = scale;
    sums[t] = sum;
  }
}

// One thread per (row, block) of packed codes already in the activation format: signed codes,
// the block's scale (float32) and sum(sa), as QuantizeActivationsKernel would have produced.
__global__ void UnpackActivationsKernel(MatMulParams p, const uint8_t* packed, const float* packed_scales,
                                        int64_t total_blocks, int8_t* codes, float* scales, int32_t* sums) {
  const int half = 1 << (p.act_bits - 1);
  const int64_t rb = row_bytes(p.K, p.act_bits);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total_blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / p.num_blocks;
    const int64_t b = t - row * p.num_blocks;
    const int64_t begin = b * p.block_size;
    const int64_t len = begin + p.block_size < p.K ? p.block_size : p.K - begin;
    const uint8_t* src = packed + row * rb;
    int32_t sum = 0;
    for (int64_t k = 0; k < len; ++k) {
      const int code = static_cast<int>(get_code(src, begin + k, p.act_bits, rb)) - half;
      codes[row * p.K + begin + k] = static_cast<int8_t>(code);
      sum += code;
    }
    scales[t] = packed_scales[t];
    sums[t] = sum;
  }
}

__global__ void MatMulKernel(MatMulParams p, const float* a, const int8_t* a_codes, const float* a_scales,
                             const int32_t* a_sums, int64_t rows, const uint8_t* codes, const void* scales,
                             const uint8_t* zero_points, const float* bias, float* y) {
  const ScaleKind kind = static_cast<ScaleKind>(p.scale_kind);
  const int64_t total = rows * p.N;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / p.N;
    const int64_t n = t - row * p.N;
    const uint8_t* w = codes + n * p.row_bytes;
    float acc = 0.0f;
    for (int64_t b = 0; b < p.num_blocks; ++b) {
      const int64_t begin = b * p.block_size;
      const int64_t end = begin + p.block_size < p.K ? begin + p.block_size : p.K;
      const int64_t block_index = n * p.num_blocks + b;
      const float ws = scale_value(kind, scales, block_index);
      const ZeroPointKind zp_kind = static_cast<ZeroPointKind>(p.zero_point_kind);
      if (!p.symmetric && zp_kind != ZeroPointKind::kInteger) {  // u * scale + offset
        const float offset = offset_value(zp_kind, zero_points, block_index);
        if (p.act_bits > 0) {
          const int8_t* sa = a_codes + row * p.K;
          int32_t dot = 0;
          for (int64_t k = begin; k < end; ++k) {
            dot += static_cast<int32_t>(sa[k]) * static_cast<int32_t>(get_code(w, k, p.bits, p.row_bytes));
          }
          const float sum = static_cast<float>(a_sums[row * p.num_blocks + b]);
          const float f = fmaf(offset, sum, fmul(static_cast<float>(dot), ws));
          acc = fmaf(f, a_scales[row * p.num_blocks + b], acc);
        } else {
          const float* x = a + row * p.K;
          for (int64_t k = begin; k < end; ++k) {
            acc = fmaf(x[k], value_with_offset(get_code(w, k, p.bits, p.row_bytes), ws, offset), acc);
          }
        }
        continue;
      }
      const int zw = p.symmetric ? (1 << (p.bits - 1)) : static_cast<int>(zero_points[block_index]);
      if (p.act_bits > 0) {
        const int8_t* sa = a_codes + row * p.K;
        int32_t dot = 0;
        for (int64_t k = begin; k < end; ++k) {
          dot += static_cast<int32_t>(sa[k]) * static_cast<int32_t>(get_code(w, k, p.bits, p.row_bytes));
        }
        const int32_t sum = a_sums[row * p.num_blocks + b];
        float f;
        if (p.symmetric) {
          f = static_cast<float>(dot - zw * sum);
        } else {
          f = fmaf(-static_cast<float>(zw), static_cast<float>(sum), static_cast<float>(dot));
        }
        f = fmul(f, a_scales[row * p.num_blocks + b]);
        acc = fmaf(f, ws, acc);
      } else {
        const float* x = a + row * p.K;
        const float zero_point = static_cast<float>(zw);
        for (int64_t k = begin; k < end; ++k) {
          acc = fmaf(x[k], value_of(get_code(w, k, p.bits, p.row_bytes), zero_point, ws), acc);
        }
      }
    }
    y[t] = bias != nullptr ? fadd(acc, bias[n]) : acc;
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
  if (!in_quantized && !io.out_quantized) {
    return LaunchBlockMatMul(params, io.a, rows, codes, scales, zero_points, bias, io.y, stream);
  }
  // One stream-ordered scratch allocation: Y (when requantized), then A's float values (when
  // dequantized) or A's signed codes, scales and sums (own format).
  const int64_t total_blocks = rows * params.num_blocks;
  const size_t y_bytes = io.out_quantized ? static_cast<size_t>(rows * params.N) * sizeof(float) : 0;
  size_t a_bytes = 0;
  const size_t code_bytes = (static_cast<size_t>(rows * params.K) + 3) / 4 * 4;
  if (in_quantized && io.own_format) {
    a_bytes = code_bytes + static_cast<size_t>(total_blocks) * (sizeof(float) + sizeof(int32_t));
  } else if (in_quantized) {
    a_bytes = static_cast<size_t>(rows * params.K) * sizeof(float);
  }
  void* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(&scratch, y_bytes + a_bytes + 4, s);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  char* base = static_cast<char*>(scratch);
  float* y = io.out_quantized ? reinterpret_cast<float*>(base) : io.y;
  char* a_base = base + y_bytes;
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
                                                                 codes, scales, zero_points, bias, y);
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
    if (error == nullptr) error = LaunchBlockMatMul(params, a, rows, codes, scales, zero_points, bias, y, stream);
  }
  if (error == nullptr && io.out_quantized) {
    error = LaunchQuantize(io.out_fmt, y, rows, io.out_codes, io.out_scales, io.out_zero_points, stream);
  }
  const cudaError_t free_err = cudaFreeAsync(scratch, s);
  if (error == nullptr && free_err != cudaSuccess) error = cudaGetErrorString(free_err);
  return error;
}

}  // namespace cuda
}  // namespace bct
