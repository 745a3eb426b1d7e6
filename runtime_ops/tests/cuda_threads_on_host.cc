// Test helper (not shipped): runs every thread of the CUDA kernels of every op on the host, one
// after the other over the kernels' grids, through the same per-thread functions the kernels call
// (cuda/block_threads.h: BlockQuantize, BlockDequantize, BlockGather; cuda/matmul_threads.h:
// BlockMatMul, BlockActMatMul; cuda/row_threads.h: the row ops, a warp's 32 lanes in turn;
// cuda/attention_threads.h: BlockAttention).
// tests/runtime_ops/test_cuda_threads_on_host.py loads this library with ctypes and compares its
// results with the numpy specification, so the kernels' indexing, packing and rounding are checked
// on machines without a GPU.
#include <cstdint>
#include <vector>

#include "bct/epilogue.h"
#include "attention_threads.h"
#include "block_threads.h"
#include "matmul_threads.h"
#include "row_threads.h"

namespace {

bct::cuda::RowFormat Format(int bits, int64_t block_size, int symmetric, int scale_kind, int64_t axis_size) {
  return bct::cuda::RowFormat{bits,
                              block_size,
                              symmetric != 0,
                              scale_kind,
                              axis_size,
                              bct::row_bytes(axis_size, bits),
                              bct::num_blocks(axis_size, block_size),
                              /*zero_point_kind=*/0};
}

}  // namespace

extern "C" {

// scale_kind: 0 float16, 1 float32, 2 pow2 (bct::ScaleKind).
__attribute__((visibility("default"))) void bct_host_quantize(int bits, int64_t block_size, int symmetric,
                                                              int scale_kind, int64_t axis_size, int64_t rows,
                                                              const float* x, uint8_t* codes, void* scales,
                                                              uint8_t* zero_points) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < rows * fmt.num_blocks; ++k) bct::cuda::ChooseScaleOne(fmt, x, k, scales, zero_points);
  for (int64_t k = 0; k < rows * fmt.row_bytes; ++k) codes[k] = bct::cuda::PackByteOne(fmt, x, k, scales, zero_points);
}

__attribute__((visibility("default"))) void bct_host_dequantize(int bits, int64_t block_size, int symmetric,
                                                                int scale_kind, int64_t axis_size, int64_t rows,
                                                                const uint8_t* codes, const void* scales,
                                                                const uint8_t* zero_points, float* out) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < rows * axis_size; ++k) {
    const int64_t row = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, zero_points, row, k - row * axis_size);
  }
}

__attribute__((visibility("default"))) void bct_host_gather(int bits, int64_t block_size, int symmetric,
                                                            int scale_kind, int64_t axis_size, const int64_t* rows,
                                                            int64_t count, const uint8_t* codes, const void* scales,
                                                            const uint8_t* zero_points, float* out) {
  const auto fmt = Format(bits, block_size, symmetric, scale_kind, axis_size);
  for (int64_t k = 0; k < count * axis_size; ++k) {
    const int64_t n = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, zero_points, rows[n], k - n * axis_size);
  }
}

// Float-offset blocks (value = u * scale + offset): zero_point_kind 1 float16 / 2 float32 offsets.
__attribute__((visibility("default"))) void bct_host_dequantize_offsets(int bits, int64_t block_size, int scale_kind,
                                                                        int zero_point_kind, int64_t axis_size,
                                                                        int64_t rows, const uint8_t* codes,
                                                                        const void* scales, const void* offsets,
                                                                        float* out) {
  auto fmt = Format(bits, block_size, /*symmetric=*/0, scale_kind, axis_size);
  fmt.zero_point_kind = zero_point_kind;
  const auto* offset_bytes = static_cast<const uint8_t*>(offsets);
  for (int64_t k = 0; k < rows * axis_size; ++k) {
    const int64_t row = k / axis_size;
    out[k] = bct::cuda::DequantizeOne(fmt, codes, scales, offset_bytes, row, k - row * axis_size);
  }
}

// BlockMatMul as matmul.cu launches it: with act_bits > 0, the activation threads (quantizing a, or
// unpacking a_packed / a_packed_scales, codes already in the activation format), then one thread
// per output element. zero_point_kind: 0 uint8 zero points, 1 float16 / 2 float32 offsets.
__attribute__((visibility("default"))) void bct_host_matmul(int64_t k, int64_t n, int bits, int64_t block_size,
                                                            int symmetric, int act_bits, int scale_kind,
                                                            int zero_point_kind, int64_t rows, const float* a,
                                                            const uint8_t* a_packed, const float* a_packed_scales,
                                                            const uint8_t* codes, const void* scales,
                                                            const uint8_t* zero_points, const float* bias, float* y) {
  const bct::cuda::MatMulParams p{k,          n, bits, block_size, symmetric != 0, act_bits, scale_kind,
                                  bct::row_bytes(k, bits), bct::num_blocks(k, block_size), zero_point_kind};
  std::vector<int8_t> a_codes;
  std::vector<float> a_scales;
  std::vector<int32_t> a_sums;
  if (act_bits > 0) {
    const int64_t total_blocks = rows * p.num_blocks;
    a_codes.resize(static_cast<size_t>(rows * k));
    a_scales.resize(static_cast<size_t>(total_blocks));
    a_sums.resize(static_cast<size_t>(total_blocks));
    for (int64_t t = 0; t < total_blocks; ++t) {
      if (a_packed != nullptr) {
        bct::cuda::UnpackActBlockOne(p, a_packed, a_packed_scales, t, a_codes.data(), a_scales.data(), a_sums.data());
      } else {
        bct::cuda::QuantizeActBlockOne(a, k, act_bits, block_size, p.num_blocks, t, a_codes.data(), a_scales.data(),
                                       a_sums.data());
      }
    }
  }
  for (int64_t t = 0; t < rows * n; ++t) {
    y[t] = bct::cuda::MatMulOne(p, a, act_bits > 0 ? a_codes.data() : nullptr, a_scales.data(), a_sums.data(), codes,
                                scales, zero_points, bias, t);
  }
}

// BlockActMatMul (float operands) as act_matmul.cu launches it: quantize A's rows, transpose B
// (unless transpose_b), quantize B^T's rows, then one thread per output element. Batches: output
// batch o has coordinates out_dims (row-major, batch_rank of them); its A / B batch is
// sum(coordinate * stride), stride 0 on broadcast dims.
__attribute__((visibility("default"))) void bct_host_act_matmul(int act_bits, int64_t block_size, int transpose_b,
                                                                int64_t m, int64_t k, int64_t n, int64_t a_batches,
                                                                int64_t b_batches, int64_t out_batches, int batch_rank,
                                                                const int64_t* out_dims, const int64_t* a_strides,
                                                                const int64_t* b_strides, const float* a,
                                                                const float* b, float* y) {
  bct::cuda::ActMatMulArgs args;
  args.act_bits = act_bits;
  args.block_size = block_size;
  args.transpose_b = transpose_b != 0;
  args.m = m;
  args.k = k;
  args.n = n;
  args.a_batches = a_batches;
  args.b_batches = b_batches;
  args.out_batches = out_batches;
  args.batch_rank = batch_rank;
  for (int d = 0; d < batch_rank; ++d) {
    args.out_dims[d] = out_dims[d];
    args.a_strides[d] = a_strides[d];
    args.b_strides[d] = b_strides[d];
  }
  const int64_t nb = bct::num_blocks(k, block_size);
  const int64_t a_rows = a_batches * m, b_rows = b_batches * n;
  std::vector<int8_t> qa(static_cast<size_t>(a_rows * k)), qb(static_cast<size_t>(b_rows * k));
  std::vector<float> sa(static_cast<size_t>(a_rows * nb)), sb(static_cast<size_t>(b_rows * nb));
  for (int64_t t = 0; t < a_rows * nb; ++t) {
    bct::cuda::QuantizeActBlockOne(a, k, act_bits, block_size, nb, t, qa.data(), sa.data(), nullptr);
  }
  std::vector<float> bt;
  const float* b_rows_k = b;
  if (!args.transpose_b) {
    bt.resize(static_cast<size_t>(b_rows * k));
    for (int64_t t = 0; t < b_rows * k; ++t) bt[static_cast<size_t>(t)] = bct::cuda::TransposeOne(b, k, n, t);
    b_rows_k = bt.data();
  }
  for (int64_t t = 0; t < b_rows * nb; ++t) {
    bct::cuda::QuantizeActBlockOne(b_rows_k, k, act_bits, block_size, nb, t, qb.data(), sb.data(), nullptr);
  }
  for (int64_t t = 0; t < out_batches * m * n; ++t) {
    y[t] = bct::cuda::ActDotOne(args, qa.data(), sa.data(), qb.data(), sb.data(), nb, t);
  }
}

// BlockMatMul's epilogue as matmul_epilogue.cu runs it: one thread per element of out
// [rows, epilogue_width(epilogue, n)] from the product p [rows, n]; epilogue as bct::Epilogue.
__attribute__((visibility("default"))) void bct_host_matmul_epilogue(int epilogue, int64_t rows, int64_t n,
                                                                     const float* p, float* out) {
  const auto e = static_cast<bct::Epilogue>(epilogue);
  for (int64_t t = 0; t < rows * bct::epilogue_width(e, n); ++t) out[t] = bct::EpilogueOne(e, p, n, t);
}

// The compute step of BlockAddLayerNorm (op 4) / BlockAddRMSNorm (op 5) as norm.cu runs it: each
// warp adds its row of skip (keeping the sum in sum unless nullptr), then the norm row.
__attribute__((visibility("default"))) int bct_host_add_norm(int op, int64_t rows, int64_t d, float* y,
                                                             const float* skip, float* sum, const float* scale,
                                                             const float* bias, float epsilon) {
  const bct::cuda::HostWarp warp;
  if (op != 4 && op != 5) return -1;
  for (int64_t r = 0; r < rows; ++r) {
    bct::cuda::AddSkipRow(warp, skip + r * d, sum != nullptr ? sum + r * d : nullptr, y + r * d, d);
    if (op == 4) {
      bct::cuda::LayerNormRow(warp, scale, bias, epsilon, y + r * d, d);
    } else {
      bct::cuda::RMSNormRow(warp, scale, epsilon, y + r * d, d);
    }
  }
  return 0;
}

// The compute step of a row op, in place on y [rows, d], as the kernels run it: op 0 Gelu (exact),
// 1 Gelu (tanh), 2 Silu (one thread per element); 3 Softmax, 4 LayerNorm (scale, bias or nullptr),
// 5 RMSNorm (scale) (one warp per row).
__attribute__((visibility("default"))) int bct_host_row_op(int op, int64_t rows, int64_t d, float* y,
                                                           const float* scale, const float* bias, float epsilon) {
  const bct::cuda::HostWarp warp;
  switch (op) {
    case 0:
    case 1:
      for (int64_t i = 0; i < rows * d; ++i) y[i] = bct::cuda::GeluOne(op == 1, y[i]);
      return 0;
    case 2:
      for (int64_t i = 0; i < rows * d; ++i) y[i] = bct::cuda::SiluOne(y[i]);
      return 0;
    case 3:
      for (int64_t r = 0; r < rows; ++r) bct::cuda::SoftmaxRow(warp, y + r * d, d);
      return 0;
    case 4:
      for (int64_t r = 0; r < rows; ++r) bct::cuda::LayerNormRow(warp, scale, bias, epsilon, y + r * d, d);
      return 0;
    case 5:
      for (int64_t r = 0; r < rows; ++r) bct::cuda::RMSNormRow(warp, scale, epsilon, y + r * d, d);
      return 0;
    default:
      return -1;
  }
}

// BlockAttention as cuda/attention.cu runs it. kv_bits 0: k, v float32; else k, v are codes with
// scales (scale_kind) and zero points (nullptr when symmetric) in blocks of kv_block_size along dh.
// mask nullptr or with strides mask_strides[4]. packed: q, float k, v and y are [B, S, H * dh]; packed 2:
// q is Q, K and V as one [B, S, (Hq + 2 Hkv) * dh] projection (k, v unused), y [B, S, Hq * dh].
__attribute__((visibility("default"))) void bct_host_attention(
    int act_bits, int64_t block_size, float scale, int causal, int64_t batch, int64_t q_heads, int64_t kv_heads,
    int64_t sq, int64_t sk, int64_t dh, const float* q, int kv_bits, int64_t kv_block_size, int kv_symmetric,
    int scale_kind, const void* k, const void* k_scales, const uint8_t* k_zero_points, const void* v,
    const void* v_scales, const uint8_t* v_zero_points, const float* mask, const int64_t* mask_strides, float* y,
    int packed) {
  bct::cuda::AttentionArgs a;
  a.packed = packed != 0;
  a.act_bits = act_bits;
  a.block_size = block_size;
  a.scale = scale;
  a.causal = causal != 0;
  a.batch = batch;
  a.q_heads = q_heads;
  a.kv_heads = kv_heads;
  a.sq = sq;
  a.sk = sk;
  a.dh = dh;
  a.q = q;
  a.kv_quantized = kv_bits > 0;
  a.k_direct = kv_bits > 0 && kv_symmetric != 0 && kv_block_size == block_size;
  if (a.kv_quantized) {
    a.kv_fmt = Format(kv_bits, kv_block_size, kv_symmetric, scale_kind, dh);
    a.k_codes = static_cast<const uint8_t*>(k);
    a.k_scales = k_scales;
    a.k_zero_points = k_zero_points;
    a.v_codes = static_cast<const uint8_t*>(v);
    a.v_scales = v_scales;
    a.v_zero_points = v_zero_points;
  } else {
    a.k = static_cast<const float*>(k);
    a.v = static_cast<const float*>(v);
  }
  a.mask = mask;
  for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask != nullptr ? mask_strides[i] : 0;
  a.y = y;
  const int64_t nb = bct::num_blocks(dh, block_size);
  const int64_t q_rows = batch * q_heads * sq, kv_rows = batch * kv_heads * sk;
  std::vector<float> unpacked;
  if (packed == 2) {  // Q, K, V as one [B, S, (Hq + 2 Hkv) * Dh] projection at q: the unpack threads first
    a.q_stride = a.k_stride = a.v_stride = q_heads + 2 * kv_heads;
    a.k = q + q_heads * dh;
    a.v = q + (q_heads + kv_heads) * dh;
    if (!bct::cuda::AttentionStrided(a)) return;  // leaves y unwritten: the test fails
    unpacked.resize(static_cast<size_t>((q_rows + 2 * kv_rows) * dh));
    for (int64_t t = 0; t < (q_rows + 2 * kv_rows) * dh; ++t) bct::cuda::AttentionUnpackOne(a, t, unpacked.data());
    a.q = q = unpacked.data();
    a.k = unpacked.data() + q_rows * dh;
    a.v = unpacked.data() + (q_rows + kv_rows) * dh;
    a.q_stride = a.k_stride = a.v_stride = 0;
  }
  std::vector<int8_t> qq(static_cast<size_t>(q_rows * dh)), kq(static_cast<size_t>(kv_rows * dh));
  std::vector<float> qs(static_cast<size_t>(q_rows * nb)), ks(static_cast<size_t>(kv_rows * nb));
  for (int64_t t = 0; t < q_rows * nb; ++t) {
    bct::cuda::QuantizeActBlockOne(q, dh, act_bits, block_size, nb, t, qq.data(), qs.data(), nullptr);
  }
  std::vector<float> k_float, values;
  if (a.kv_quantized) {
    values.resize(static_cast<size_t>(kv_rows * dh));
    for (int64_t t = 0; t < kv_rows * dh; ++t) {
      values[static_cast<size_t>(t)] = bct::cuda::AttentionDequantizeOne(a, a.v_codes, a.v_scales, a.v_zero_points, t);
    }
  }
  if (a.k_direct) {
    for (int64_t r = 0; r < kv_rows; ++r) bct::cuda::AttentionKeyCodesOne(a, r, kq.data(), ks.data());
  } else {
    const float* k_rows = a.k;
    if (a.kv_quantized) {
      k_float.resize(static_cast<size_t>(kv_rows * dh));
      for (int64_t t = 0; t < kv_rows * dh; ++t) {
        k_float[static_cast<size_t>(t)] =
            bct::cuda::AttentionDequantizeOne(a, a.k_codes, a.k_scales, a.k_zero_points, t);
      }
      k_rows = k_float.data();
    }
    for (int64_t t = 0; t < kv_rows * nb; ++t) {
      bct::cuda::QuantizeActBlockOne(k_rows, dh, act_bits, block_size, nb, t, kq.data(), ks.data(), nullptr);
    }
  }
  float tile[bct::nl::kAttentionKeyTile];
  const float* v_rows = a.kv_quantized ? values.data() : a.v;
  for (int64_t row = 0; row < q_rows; ++row) {
    bct::cuda::AttentionRowOne(a, qq.data(), qs.data(), kq.data(), ks.data(), v_rows, row, tile);
  }
}

// BlockAttention's decoder step as cuda/attention.cu's LaunchAttentionStep runs it: the step's
// thread bodies, then bct_host_attention over the present cache (kv_bits 0: float cache), then the
// packed-Y rows. Q, K_new, V_new in the layout `packed` says; cos / sin nullptr or [Bc, Sq, rot].
__attribute__((visibility("default"))) void bct_host_attention_step(
    int act_bits, int64_t block_size, float scale, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t sq,
    int64_t past, int64_t dh, int packed, int64_t rot, int64_t cos_batch_stride, const float* q, const float* k_new,
    const float* v_new, const float* cos, const float* sin, int kv_bits, int64_t kv_block_size, int scale_kind,
    const void* past_k, const void* past_k_scales, const void* past_v, const void* past_v_scales, const float* mask,
    const int64_t* mask_strides, void* present_k, void* present_k_scales, void* present_v, void* present_v_scales,
    float* y) {
  bct::cuda::AttentionStepArgs s;
  s.dims = bct::nl::AttentionStepDims{batch, q_heads, kv_heads, sq, past, dh, packed != 0, rot, cos_batch_stride};
  s.q = q;
  s.k_new = k_new;
  s.v_new = v_new;
  s.cos = cos;
  s.sin = sin;
  s.codes = kv_bits > 0;
  s.bits = kv_bits;
  s.kv_block_size = kv_block_size;
  s.scale_kind = scale_kind;
  s.row_bytes = s.codes ? bct::row_bytes(dh, kv_bits) : 0;
  s.num_blocks = s.codes ? bct::num_blocks(dh, kv_block_size) : 0;
  s.past_k = past_k;
  s.past_v = past_v;
  s.past_k_scales = past_k_scales;
  s.past_v_scales = past_v_scales;
  s.present_k = present_k;
  s.present_v = present_v;
  s.present_k_scales = present_k_scales;
  s.present_v_scales = present_v_scales;
  const int64_t q_rows = batch * q_heads * sq, new_rows = 2 * batch * kv_heads * sq;
  const int64_t present_rows = 2 * batch * kv_heads * (past + sq);
  std::vector<float> q_rot(static_cast<size_t>(q_rows * dh)), fresh(static_cast<size_t>(new_rows * dh));
  std::vector<float> y_heads(static_cast<size_t>(q_rows * dh));
  for (int64_t r = 0; r < q_rows; ++r) bct::cuda::AttentionStepQRowOne(s, r, q_rot.data());
  for (int64_t t = 0; t < new_rows; ++t) bct::cuda::AttentionStepNewRowOne(s, t, fresh.data());
  for (int64_t t = 0; t < present_rows; ++t) bct::cuda::AttentionStepPresentRowOne(s, t, fresh.data());
  bct_host_attention(act_bits, block_size, scale, 0, batch, q_heads, kv_heads, sq, past + sq, dh, q_rot.data(), kv_bits,
                     kv_block_size, 1, scale_kind, present_k, present_k_scales, nullptr, present_v, present_v_scales,
                     nullptr, mask, mask_strides, packed != 0 ? y_heads.data() : y, 0);
  if (packed != 0) {
    for (int64_t r = 0; r < q_rows; ++r) bct::cuda::AttentionStepYRowOne(s, r, y_heads.data(), y);
  }
}

}  // extern "C"
