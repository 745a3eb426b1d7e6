// The work of one CUDA thread of the BlockMatMul and BlockActMatMul kernels, as host/device
// functions: matmul.cu and act_matmul.cu add only the grid-stride loops and the launches, and
// tests/cuda_threads_on_host.cc runs every "thread" on the CPU to check them against the spec
// without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "matmul_launch.h"
#include "nonlinear_launch.h"

namespace bct {
namespace cuda {

// Thread t of the run-time activation quantizer (both matmuls): block t (row-major over
// [rows, nb]) of x [rows, k] -> signed codes q (same layout as x) and float32 scale by
// nl::quantize_act_row itself, and, when sums is not nullptr, the sum of the block's codes.
BCT_HD BCT_INLINE void QuantizeActBlockOne(const float* x, int64_t k, int bits, int64_t block_size, int64_t nb,
                                           int64_t t, int8_t* q, float* scales, int32_t* sums) {
  const int64_t row = t / nb;
  const int64_t begin = (t - row * nb) * block_size;
  const int64_t len = (k - begin) < block_size ? (k - begin) : block_size;
  int8_t* qb = q + row * k + begin;
  nl::quantize_act_row(x + row * k + begin, len, bits, len, qb, scales + t);
  if (sums == nullptr) return;
  int32_t sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += qb[i];
  sums[t] = sum;
}

// Thread t of BlockMatMul's unpacking of A codes already in the activation format: block t gets
// the signed codes, scale and code sum QuantizeActBlockOne would have produced.
BCT_HD BCT_INLINE void UnpackActBlockOne(const MatMulParams& p, const uint8_t* packed, const float* packed_scales,
                                         int64_t t, int8_t* codes, float* scales, int32_t* sums) {
  const int half = 1 << (p.act_bits - 1);
  const int64_t rb = row_bytes(p.K, p.act_bits);
  const int64_t row = t / p.num_blocks;
  const int64_t begin = (t - row * p.num_blocks) * p.block_size;
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

// Integer dot product of a block: signed activation codes sa[begin, end) x weight codes of row w.
BCT_HD BCT_INLINE int32_t WeightBlockDot(const MatMulParams& p, const int8_t* sa, const uint8_t* w, int64_t begin,
                                         int64_t end) {
  int32_t dot = 0;
  for (int64_t k = begin; k < end; ++k) {
    dot += static_cast<int32_t>(sa[k]) * static_cast<int32_t>(get_code(w, k, p.bits, p.row_bytes));
  }
  return dot;
}

// Thread t of BlockMatMul: output element t of Y [rows, N]. Integer mode (act_bits > 0) reads the
// activation codes, scales and sums; float mode reads a.
BCT_HD BCT_INLINE float MatMulOne(const MatMulParams& p, const float* a, const int8_t* a_codes, const float* a_scales,
                                  const int32_t* a_sums, const uint8_t* codes, const void* scales,
                                  const uint8_t* zero_points, const float* bias, int64_t t) {
  const ScaleKind kind = static_cast<ScaleKind>(p.scale_kind);
  const ZeroPointKind zp_kind = static_cast<ZeroPointKind>(p.zero_point_kind);
  const int64_t row = t / p.N;
  const int64_t n = t - row * p.N;
  const uint8_t* w = codes + n * p.row_bytes;
  float acc = 0.0f;
  for (int64_t b = 0; b < p.num_blocks; ++b) {
    const int64_t begin = b * p.block_size;
    const int64_t end = begin + p.block_size < p.K ? begin + p.block_size : p.K;
    const int64_t block_index = n * p.num_blocks + b;
    const float ws = scale_value(kind, scales, block_index);
    if (!p.symmetric && zp_kind != ZeroPointKind::kInteger) {  // u * scale + offset
      const float offset = offset_value(zp_kind, zero_points, block_index);
      if (p.act_bits > 0) {
        const int32_t dot = WeightBlockDot(p, a_codes + row * p.K, w, begin, end);
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
      const int32_t dot = WeightBlockDot(p, a_codes + row * p.K, w, begin, end);
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
  return bias != nullptr ? fadd(acc, bias[n]) : acc;
}

// Thread t of BlockActMatMul's transpose of B [batches, k, n] into B^T [batches, n, k]: element t of B^T.
BCT_HD BCT_INLINE float TransposeOne(const float* b, int64_t k, int64_t n, int64_t t) {
  const int64_t batch = t / (n * k), rest = t - batch * n * k;
  const int64_t col = rest / k, i = rest - col * k;
  return b[batch * k * n + i * n + col];
}

// Thread t of BlockActMatMul's dot kernel: output element t of Y [out_batches, m, n] from the
// quantized rows of A (qa [a_rows, k], sa [a_rows, nb]) and of B^T (qb, sb), batches broadcast.
BCT_HD BCT_INLINE float ActDotOne(const ActMatMulArgs& args, const int8_t* qa, const float* sa, const int8_t* qb,
                                  const float* sb, int64_t nb, int64_t t) {
  const int64_t ob = t / (args.m * args.n), rest = t - ob * args.m * args.n;
  const int64_t mi = rest / args.n, j = rest - mi * args.n;
  int64_t coords = ob, a_batch = 0, b_batch = 0;
  for (int d = args.batch_rank - 1; d >= 0; --d) {
    const int64_t c = coords % args.out_dims[d];
    coords /= args.out_dims[d];
    a_batch += c * args.a_strides[d];
    b_batch += c * args.b_strides[d];
  }
  const int64_t a_row = a_batch * args.m + mi, b_row = b_batch * args.n + j;
  return nl::act_dot(qa + a_row * args.k, sa + a_row * nb, qb + b_row * args.k, sb + b_row * nb, args.k,
                     args.block_size);
}

}  // namespace cuda
}  // namespace bct
