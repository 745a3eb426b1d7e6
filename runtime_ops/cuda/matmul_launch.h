// Plain C++ launcher of the BlockMatMul CUDA kernels (cuda/matmul.cu). The host side (compiled with
// the ORT headers, cpu/matmul_op.cc) sees only this header; nvcc never sees ORT. Pointers are device
// pointers; stream is a cudaStream_t. Returns nullptr on success or the first CUDA error string.
#pragma once

#include <cstdint>

namespace bct {
namespace cuda {

struct MatMulParams {
  int64_t K;
  int64_t N;
  int bits;
  int64_t block_size;
  bool symmetric;
  int act_bits;     // 0: float activations; 2..8: activations quantized per block at run time
  int scale_kind;   // bct::ScaleKind as int
  int64_t row_bytes;   // ceil(K * bits / 8)
  int64_t num_blocks;  // ceil(K / block_size)
};

// y[rows, N] = a[rows, K] x W'^T (+ bias). zero_points and bias may be nullptr.
const char* LaunchBlockMatMul(const MatMulParams& params, const float* a, int64_t rows, const uint8_t* codes,
                              const void* scales, const uint8_t* zero_points, const float* bias, float* y,
                              void* stream);

}  // namespace cuda
}  // namespace bct
