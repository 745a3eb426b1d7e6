// The run-time activation quantizer: every op that quantizes float activations itself (BlockMatMul
// with act_bits, BlockActMatMul's two operands) uses it, through Kernels(isa) (cpu/kernel_table.h).
//
// The rule is block_format.quantize_codes(x, BlockFormat(bits, block_size, symmetric=True,
// scale_kind="float32")) with signed codes q = u - 2**(bits-1) (nl::quantize_act_row): per block the
// first element of largest magnitude m gives scale = m / -2**(bits-1); a block holding a NaN takes
// choose_symmetric_scale itself. Every path gives the same bits.
#pragma once

#include <cstdint>

#include "bct/block_math.h"

namespace bct {
namespace cpu {

// Where the codes of `rows` rows of k values go: block b of row r starts at
// codes + r * row_stride + b * block_stride and receives exactly min(block_size, k - b * block_size)
// codes (padding, if the layout has any, is left as it is). scales [rows, nb]; sums [rows, nb] (the
// sum of each block's codes) when not nullptr.
struct ActCodes {
  int8_t* codes = nullptr;
  int64_t row_stride = 0;
  int64_t block_stride = 0;
  float* scales = nullptr;
  int32_t* sums = nullptr;
};

// Quantizes x [rows, k] (rows contiguous) along k.
using QuantizeActRowsFn = void (*)(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size,
                                   const ActCodes& out);

// Quantizes every column of a row-major block b [len, n] (len <= block_size: one block per column)
// as quantize_act_row quantizes that column: signed codes q [len, n], scales [n].
using QuantizeActColumnsFn = void (*)(const float* b, int64_t n, int64_t len, int bits, int8_t* q, float* scales);

// Column j of b [len, n] by the reference rule (choose_symmetric_scale): the columns quantizers'
// path for a column block holding a NaN.
inline void QuantizeActColumnExactly(const float* b, int64_t n, int64_t len, int bits, int64_t j, int8_t* q,
                                     float* scales) {
  const int zp = 1 << (bits - 1);
  const float scale = choose_symmetric_scale(b + j, len, bits, ScaleKind::kFloat32, n).value;
  const float inv = inverse_scale(scale);
  scales[j] = scale;
  for (int64_t i = 0; i < len; ++i) {
    q[i * n + j] = static_cast<int8_t>(static_cast<int>(code_of(b[i * n + j], inv, bits, true, 0)) - zp);
  }
}

}  // namespace cpu
}  // namespace bct
