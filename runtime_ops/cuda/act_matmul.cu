// BlockActMatMul on CUDA: the arithmetic of the CPU kernel (nl::quantize_act_row per block,
// nl::act_dot per output element), so both agree bit for bit. Simple rather than fast: one thread
// per (row, block) to quantize, one thread per output element for the integer block dot products.
#include <cuda_runtime.h>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "launch_grid.cuh"
#include "matmul_threads.h"
#include "nonlinear_launch.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

// Grid-stride loops over the thread bodies of matmul_threads.h.
// x [rows, k] -> signed codes q [rows, k], float32 scales [rows, nb]; one thread per (row, block).
__global__ void QuantizeActKernel(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size,
                                  int64_t nb, int8_t* q, float* scales) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows * nb;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    QuantizeActBlockOne(x, k, bits, block_size, nb, t, q, scales, nullptr);
  }
}

// B [batches, k, n] -> B^T [batches, n, k].
__global__ void TransposeKernel(const float* b, int64_t batches, int64_t k, int64_t n, float* bt) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < batches * n * k;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bt[t] = TransposeOne(b, k, n, t);
  }
}

__global__ void DotKernel(ActMatMulArgs args, const int8_t* qa, const float* sa, const int8_t* qb, const float* sb,
                          int64_t nb, float* y) {
  const int64_t total = args.out_batches * args.m * args.n;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[t] = ActDotOne(args, qa, sa, qb, sb, nb, t);
  }
}

}  // namespace

const char* LaunchActMatMul(const ActMatMulArgs& a, void* stream) {
  const int64_t out_total = a.out_batches * a.m * a.n;
  if (out_total == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t nb = (a.k + a.block_size - 1) / a.block_size;
  const char* err = nullptr;
  Scratch scratch(s);
  const int64_t a_rows = a.a_batches * a.m, b_rows = a.b_batches * a.n;

  const float* a_float = a.a;
  if (a.in_quantized) {
    float* deq = scratch.Get<float>(a_rows * a.k, &err);
    if (err == nullptr) err = LaunchDequantize(a.in_fmt, a.in_codes, a.in_scales, a.in_zero_points, a_rows, deq, stream);
    a_float = deq;
  }
  int8_t* qa = scratch.Get<int8_t>(a_rows * a.k, &err);
  float* sa = scratch.Get<float>(a_rows * nb, &err);
  if (err != nullptr) return err;
  QuantizeActKernel<<<GridFor(a_rows * nb), kThreads, 0, s>>>(a_float, a_rows, a.k, a.act_bits, a.block_size, nb, qa, sa);
  if ((err = LastCudaError()) != nullptr) return err;

  const float* bt = a.b;
  if (!a.transpose_b) {
    float* tmp = scratch.Get<float>(b_rows * a.k, &err);
    if (err != nullptr) return err;
    TransposeKernel<<<GridFor(b_rows * a.k), kThreads, 0, s>>>(a.b, a.b_batches, a.k, a.n, tmp);
    if ((err = LastCudaError()) != nullptr) return err;
    bt = tmp;
  }
  int8_t* qb = scratch.Get<int8_t>(b_rows * a.k, &err);
  float* sb = scratch.Get<float>(b_rows * nb, &err);
  if (err != nullptr) return err;
  QuantizeActKernel<<<GridFor(b_rows * nb), kThreads, 0, s>>>(bt, b_rows, a.k, a.act_bits, a.block_size, nb, qb, sb);
  if ((err = LastCudaError()) != nullptr) return err;

  float* y = a.out_quantized ? scratch.Get<float>(out_total, &err) : a.y;
  if (err != nullptr) return err;
  DotKernel<<<GridFor(out_total), kThreads, 0, s>>>(a, qa, sa, qb, sb, nb, y);
  if ((err = LastCudaError()) != nullptr) return err;
  if (a.out_quantized) {
    err = LaunchQuantize(a.out_fmt, y, a.out_batches * a.m, a.out_codes, a.out_scales, a.out_zero_points, stream);
  }
  return err;
}

}  // namespace cuda
}  // namespace bct
