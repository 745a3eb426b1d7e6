// Plain C++ launchers of the CUDA kernels of BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm,
// BlockRMSNorm (cuda/gelu.cu, cuda/silu.cu, cuda/softmax.cu, cuda/norm.cu) and BlockActMatMul
// (cuda/act_matmul.cu). This header is all the host side (cuda/nonlinear_ops_cuda.cc, compiled with the ORT headers) sees of them.
// Pointers are device pointers; stream is a cudaStream_t. Each launcher returns nullptr on success or
// the CUDA error string of the first failing call. Scratch memory comes from the stream-ordered
// allocator (cudaMallocAsync / cudaFreeAsync on the same stream), or cudaMalloc / cudaFree on a
// device without memory pools.
#pragma once

#include <cstdint>

#include "block_launch.h"

namespace bct {
namespace cuda {

enum class RowOp : int { kGeluErf = 0, kGeluTanh = 1, kSoftmax = 2, kLayerNorm = 3, kRMSNorm = 4, kSilu = 5 };

// The encoded sides every operand op's launch has: the main input as codes (in_*, when
// in_quantized; the float input is the op's own field) and the result as float32 y or codes (out_*,
// when out_quantized). Quantized sides use the RowFormat of block_launch.h.
struct OperandIo {
  bool in_quantized = false;
  RowFormat in_fmt{};
  const uint8_t* in_codes = nullptr;
  const void* in_scales = nullptr;
  const uint8_t* in_zero_points = nullptr;
  bool out_quantized = false;
  RowFormat out_fmt{};
  float* y = nullptr;
  uint8_t* out_codes = nullptr;
  void* out_scales = nullptr;
  uint8_t* out_zero_points = nullptr;
};

// One row-wise op over rows x d: load (float x, or dequantize in_*), compute, store (float y, or
// quantize into out_*). The RowFormats' axis_size is d.
struct RowOpArgs : OperandIo {
  RowOp op = RowOp::kGeluErf;
  float epsilon = 0.0f;
  const float* scale = nullptr;  // LayerNorm / RMSNorm [d]
  const float* bias = nullptr;   // LayerNorm [d] or nullptr
  const float* skip = nullptr;   // Add + norm: the residual [skip_rows, d] added before the norm, or nullptr
  int64_t skip_rows = 1;         // row r adds skip row r % skip_rows (broadcast over leading dims)
  float* sum = nullptr;          // Add + norm: x + skip [rows, d] (output 3), or nullptr
  int64_t rows = 0;
  int64_t d = 0;
  const float* x = nullptr;
};

// Dispatches on args.op to the family's launcher below.
const char* LaunchRowOp(const RowOpArgs& args, void* stream);

// The per-family compute step, in place on a float32 [rows, d] buffer.
const char* LaunchGeluRows(RowOp op, float* y, int64_t rows, int64_t d, void* stream);
const char* LaunchSiluRows(float* y, int64_t rows, int64_t d, void* stream);
const char* LaunchSoftmaxRows(float* y, int64_t rows, int64_t d, void* stream);
// With skip, each row first becomes y + skip (kept in sum when not nullptr): the Add + norm ops.
const char* LaunchNormRows(RowOp op, const float* scale, const float* bias, float epsilon, const float* skip,
                           int64_t skip_rows, float* sum, float* y, int64_t rows, int64_t d, void* stream);

constexpr int kMaxBatchRank = 8;

// BlockActMatMul: A [a_batches, M, K] (float, or quantized in_fmt) x B (float) -> Y [out_batches, M, N].
// Output batch o has coordinates out_dims (row-major); its A / B batch is sum(coord * stride) with
// stride 0 on broadcast dims.
struct ActMatMulArgs : OperandIo {
  int act_bits = 8;
  int64_t block_size = 32;
  bool transpose_b = false;
  int64_t m = 0, k = 0, n = 0;
  int64_t a_batches = 0, b_batches = 0, out_batches = 0;
  int batch_rank = 0;
  int64_t out_dims[kMaxBatchRank] = {};
  int64_t a_strides[kMaxBatchRank] = {};
  int64_t b_strides[kMaxBatchRank] = {};
  const float* a = nullptr;  // float A (in_quantized = false)
  const float* b = nullptr;  // [b_batches, K, N], or [b_batches, N, K] with transpose_b
};

const char* LaunchActMatMul(const ActMatMulArgs& args, void* stream);

}  // namespace cuda
}  // namespace bct
