// Plain C++ launcher of the BlockMatMul CUDA kernels (cuda/matmul.cu). The host side (compiled with
// the ORT headers, cpu/matmul_op.cc) sees only this header; nvcc never sees ORT. Pointers are device
// pointers; stream is a cudaStream_t. Returns nullptr on success or the first CUDA error string.
#pragma once

#include <cstdint>

#include "bct/epilogue.h"
#include "block_launch.h"

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
  int zero_point_kind;  // bct::ZeroPointKind as int: 0 uint8 zero points, 1 float16 / 2 float32 offsets
};

// y[rows, N] = a[rows, K] x W'^T (+ bias). zero_points and bias may be nullptr; zero_points holds the
// bytes of uint8 zero points or float16 / float32 offsets (params.zero_point_kind).
const char* LaunchBlockMatMul(const MatMulParams& params, const float* a, int64_t rows, const uint8_t* codes,
                              const void* scales, const uint8_t* zero_points, const float* bias, float* y,
                              void* stream);

// BlockMatMul's operand and result encodings (docs/ops.md, in_* / out_* attributes).
struct MatMulIo {
  const float* a = nullptr;                // float A [rows, K] (in_bits = 0)
  const uint8_t* a_codes = nullptr;        // quantized A [rows, in_fmt.row_bytes]
  const void* a_scales = nullptr;          // [rows, in_fmt.num_blocks]
  const uint8_t* a_zero_points = nullptr;  // nullptr when symmetric
  RowFormat in_fmt{};
  bool own_format = false;  // a_codes are in the run-time activation format: used without dequantizing
  Epilogue epilogue = Epilogue::kNone;  // applied to the product [rows, N] (bct/epilogue.h)
  float* y = nullptr;       // float Y [rows, epilogue_width(epilogue, N)] (out_bits = 0)
  bool out_quantized = false;
  RowFormat out_fmt{};
  uint8_t* out_codes = nullptr;
  void* out_scales = nullptr;
  uint8_t* out_zero_points = nullptr;
};

// out [rows, epilogue_width(e, n)] from the product p [rows, n] (cuda/matmul_epilogue.cu); out must not
// overlap p.
const char* LaunchMatMulEpilogue(Epilogue e, const float* p, int64_t rows, int64_t n, float* out, void* stream);

// As LaunchBlockMatMul, with A float or quantized, the epilogue applied, and Y float or requantized
// along its last axis.
const char* LaunchBlockMatMulIo(const MatMulParams& params, const MatMulIo& io, int64_t rows, const uint8_t* codes,
                                const void* scales, const uint8_t* zero_points, const float* bias, void* stream);

}  // namespace cuda
}  // namespace bct
