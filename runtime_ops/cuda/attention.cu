// BlockAttention on CUDA: the arithmetic of the CPU kernel and the spec (bct/attention_math.h), so
// all agree bit for bit. Simple rather than fast: Q and float K quantized one thread per (row,
// block), K codes unpacked and V codes dequantized one thread per row / element, then one thread per
// query row streams over its keys (block dots key by key, online softmax, p x V); nothing of size
// Sq x Sk is stored.
#include <cuda_runtime.h>

#include "attention_launch.h"
#include "attention_threads.h"
#include "bct/attention_math.h"
#include "launch_grid.cuh"
#include "matmul_threads.h"
#include "nonlinear_rows.cuh"

namespace bct {
namespace cuda {
namespace {

__global__ void QuantizeRowsKernel(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size, int64_t nb,
                                   int8_t* q, float* scales) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows * nb;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    QuantizeActBlockOne(x, k, bits, block_size, nb, t, q, scales, nullptr);
  }
}

__global__ void KeyCodesKernel(AttentionArgs a, int64_t rows, int8_t* kq, float* ks) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionKeyCodesOne(a, r, kq, ks);
  }
}

__global__ void DequantizeKernel(AttentionArgs a, const uint8_t* codes, const void* scales,
                                 const uint8_t* zero_points, int64_t total, float* out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[t] = AttentionDequantizeOne(a, codes, scales, zero_points, t);
  }
}

__global__ void AttentionKernel(AttentionArgs a, const int8_t* qq, const float* qs, const int8_t* kq, const float* ks,
                                const float* values, int64_t rows) {
  float tile[nl::kAttentionKeyTile];
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionRowOne(a, qq, qs, kq, ks, values, row, tile);
  }
}

__global__ void UnpackKernel(AttentionArgs a, int64_t total, float* out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionUnpackOne(a, t, out);
  }
}

__global__ void StepQKernel(AttentionStepArgs s, int64_t rows, float* q_out) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionStepQRowOne(s, r, q_out);
  }
}

__global__ void StepNewRowsKernel(AttentionStepArgs s, int64_t rows, float* fresh) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionStepNewRowOne(s, t, fresh);
  }
}

__global__ void StepPresentKernel(AttentionStepArgs s, int64_t rows, const float* fresh) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionStepPresentRowOne(s, t, fresh);
  }
}

__global__ void StepYKernel(AttentionStepArgs s, int64_t rows, const float* y_heads, float* y) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    AttentionStepYRowOne(s, r, y_heads, y);
  }
}

}  // namespace

const char* LaunchAttention(const AttentionArgs& a, void* stream) {
  const int64_t q_rows = a.batch * a.q_heads * a.sq, kv_rows = a.batch * a.kv_heads * a.sk;
  if (q_rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t nb = (a.dh + a.block_size - 1) / a.block_size;
  const char* err = nullptr;
  Scratch scratch(s);
  if (AttentionStrided(a)) {  // parts of one packed projection: copied apart, then as plain packed Q, K, V
    const int64_t q_n = q_rows * a.dh, kv_n = kv_rows * a.dh;
    float* rows = scratch.Get<float>(q_n + 2 * kv_n, &err);
    if (err != nullptr) return err;
    UnpackKernel<<<GridFor(q_n + 2 * kv_n), kThreads, 0, s>>>(a, q_n + 2 * kv_n, rows);
    if ((err = LastCudaError()) != nullptr) return err;
    AttentionArgs plain = a;
    plain.q = rows;
    plain.k = rows + q_n;
    plain.v = rows + q_n + kv_n;
    plain.q_stride = plain.k_stride = plain.v_stride = 0;
    return LaunchAttention(plain, stream);
  }
  int8_t* qq = scratch.Get<int8_t>(q_rows * a.dh, &err);
  float* qs = scratch.Get<float>(q_rows * nb, &err);
  int8_t* kq = scratch.Get<int8_t>(kv_rows * a.dh, &err);
  float* ks = scratch.Get<float>(kv_rows * nb, &err);
  if (err != nullptr) return err;
  QuantizeRowsKernel<<<GridFor(q_rows * nb), kThreads, 0, s>>>(a.q, q_rows, a.dh, a.act_bits, a.block_size, nb, qq, qs);
  if ((err = LastCudaError()) != nullptr) return err;
  if (a.k_direct) {
    KeyCodesKernel<<<GridFor(kv_rows), kThreads, 0, s>>>(a, kv_rows, kq, ks);
  } else {
    const float* k = a.k;
    if (a.kv_quantized) {
      float* deq = scratch.Get<float>(kv_rows * a.dh, &err);
      if (err != nullptr) return err;
      DequantizeKernel<<<GridFor(kv_rows * a.dh), kThreads, 0, s>>>(a, a.k_codes, a.k_scales, a.k_zero_points,
                                                                     kv_rows * a.dh, deq);
      if ((err = LastCudaError()) != nullptr) return err;
      k = deq;
    }
    QuantizeRowsKernel<<<GridFor(kv_rows * nb), kThreads, 0, s>>>(k, kv_rows, a.dh, a.act_bits, a.block_size, nb, kq, ks);
  }
  if ((err = LastCudaError()) != nullptr) return err;
  const float* values = a.v;
  if (a.kv_quantized) {
    float* deq = scratch.Get<float>(kv_rows * a.dh, &err);
    if (err != nullptr) return err;
    DequantizeKernel<<<GridFor(kv_rows * a.dh), kThreads, 0, s>>>(a, a.v_codes, a.v_scales, a.v_zero_points,
                                                                   kv_rows * a.dh, deq);
    if ((err = LastCudaError()) != nullptr) return err;
    values = deq;
  }
  AttentionKernel<<<GridFor(q_rows), kThreads, 0, s>>>(a, qq, qs, kq, ks, values, q_rows);
  return LastCudaError();
}

const char* LaunchAttentionStep(AttentionArgs a, const AttentionStepArgs& s, float* y, void* stream) {
  const nl::AttentionStepDims& d = s.dims;
  const int64_t q_rows = d.batch * d.q_heads * d.sq, new_rows = 2 * d.batch * d.kv_heads * d.sq;
  const int64_t present_rows = 2 * d.batch * d.kv_heads * (d.past + d.sq);
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  Scratch scratch(st);
  float* q_rot = scratch.Get<float>(q_rows * d.dh, &err);
  float* fresh = scratch.Get<float>(new_rows * d.dh, &err);
  float* y_heads = d.packed ? scratch.Get<float>(q_rows * d.dh, &err) : y;
  if (err != nullptr) return err;
  if (q_rows > 0) {
    StepQKernel<<<GridFor(q_rows), kThreads, 0, st>>>(s, q_rows, q_rot);
    if ((err = LastCudaError()) != nullptr) return err;
  }
  if (new_rows > 0) {
    StepNewRowsKernel<<<GridFor(new_rows), kThreads, 0, st>>>(s, new_rows, fresh);
    if ((err = LastCudaError()) != nullptr) return err;
  }
  if (present_rows > 0) {
    StepPresentKernel<<<GridFor(present_rows), kThreads, 0, st>>>(s, present_rows, fresh);
    if ((err = LastCudaError()) != nullptr) return err;
  }
  a.q = q_rot;
  if (s.codes) {
    a.k_codes = static_cast<const uint8_t*>(s.present_k);
    a.k_scales = s.present_k_scales;
    a.v_codes = static_cast<const uint8_t*>(s.present_v);
    a.v_scales = s.present_v_scales;
  } else {
    a.k = static_cast<const float*>(s.present_k);
    a.v = static_cast<const float*>(s.present_v);
  }
  a.y = y_heads;
  if ((err = LaunchAttention(a, stream)) != nullptr) return err;
  if (d.packed && q_rows > 0) {
    StepYKernel<<<GridFor(q_rows), kThreads, 0, st>>>(s, q_rows, y_heads, y);
    err = LastCudaError();
  }
  return err;
}

}  // namespace cuda
}  // namespace bct
