// BlockMatMul kernel: weight repacking, the scalar reference path and the work split; the
// instruction-set paths come from Kernels(isa) (cpu/kernel_table.h). See matmul_kernel.h for the layouts.
#include "matmul_kernel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bct/nonlinear_math.h"
#include "cpu/kernel_table.h"
#if BCT_X86_SIMD
#include <immintrin.h>  // SSE2 (part of x86-64 itself); AVX-512 only in functions with that target
#endif

namespace bct {
namespace matmul {

namespace {

constexpr int kTileCols = 16;
constexpr int kStreamedPanelShift = 2;  // panels of 4 tiles: the AVX-512 decode kernel's register block

// Unpacks the K codes of one densely packed row.
void UnpackRow(const uint8_t* row, int64_t row_bytes, int bits, int64_t K, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, row, static_cast<size_t>(K));
  } else if (bits == 4) {
    for (int64_t i = 0; i + 1 < K; i += 2) {
      out[i] = row[i / 2] & 0x0f;
      out[i + 1] = row[i / 2] >> 4;
    }
    if (K & 1) out[K - 1] = row[K / 2] & 0x0f;
  } else {
    for (int64_t i = 0; i < K; ++i) out[i] = static_cast<uint8_t>(get_code(row, i, bits, row_bytes));
  }
}

// Zero point (as float) or float offset of block index i of asymmetric weights.
float ZeroPointAt(const Shape& shape, const WeightInputs& weights, int64_t i) {
  if (shape.zero_point_kind == ZeroPointKind::kInteger) return static_cast<float>(weights.zero_points[i]);
  return offset_value(shape.zero_point_kind, weights.zero_points, i);
}

}  // namespace

void SerialFor(std::size_t total, const std::function<void(std::size_t)>& task) {
  for (std::size_t i = 0; i < total; ++i) task(i);
}

std::unique_ptr<PackedWeights> Pack(const Shape& shape, const WeightInputs& weights, cpu::Isa isa) {
  auto p = std::make_unique<PackedWeights>();
  p->shape = shape;
  p->isa = isa;
  const int64_t K = shape.K, N = shape.N, nb = shape.num_blocks(), row_bytes = shape.row_bytes();
  const int64_t bs = shape.block_size;
  p->num_blocks = nb;
  p->implicit_zero_point = static_cast<float>(1 << (shape.bits - 1));
  std::vector<uint8_t> row(static_cast<size_t>(K));

  const cpu::KernelTable& kernels = cpu::Kernels(isa);
  if (kernels.matmul_tiles == nullptr) {
    p->block_padded = bs;
    p->k_padded = K;
    p->codes.resize(static_cast<size_t>(N * K));
    p->scales.resize(static_cast<size_t>(N * nb));
    if (!shape.symmetric) p->zero_points.resize(static_cast<size_t>(N * nb));
    for (int64_t n = 0; n < N; ++n) {
      UnpackRow(weights.codes + n * row_bytes, row_bytes, shape.bits, K, p->codes.data() + n * K);
      for (int64_t b = 0; b < nb; ++b) {
        p->scales[n * nb + b] = scale_value(weights.scale_kind, weights.scales, n * nb + b);
        if (!shape.symmetric) p->zero_points[n * nb + b] = ZeroPointAt(shape, weights, n * nb + b);
      }
    }
    return p;
  }

  const int64_t bkp = (std::min<int64_t>(bs, K) + 7) / 8 * 8;  // no block is longer than K
  const int64_t k_padded = nb * bkp;
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  const bool signed_codes = shape.act_bits == 0 && shape.symmetric;
  const bool streamed = kernels.matmul_compact_weights;
  // 5-bit integer-mode weights on the streamed path: nibbles plus one high bit plane, 5/8 of the bytes
  // (a decoder's 5-bit output table is the largest read of its decode step). Two planes (6 bits) cost
  // more in the kernel than the bytes they save on a decoder's small 6-bit projections.
  // (The AVX-512 decode kernel reads exactly one plane: more would need its kPlanes path changed.)
  const int high_planes = streamed && shape.act_bits > 0 && shape.bits == 5 ? 1 : 0;
  const bool nibble = shape.bits <= 4 || high_planes > 0;
  const int64_t group_k = nibble ? 8 : 4;
  const int64_t groups = bkp / group_k;
  const int zp_mode = ZeroPointMode(shape);
  p->block_padded = bkp;
  p->k_padded = k_padded;
  p->num_tiles = tiles;
  p->block_code_bytes = groups * 64 + high_planes * groups * 16;
  p->tile_bytes = nb * p->block_code_bytes;
  p->nibble = nibble;
  p->high_planes = high_planes;
  p->signed_codes = signed_codes;
  p->gfni = streamed && cpu::UseGfni();
  p->amx_emulated = isa == cpu::Isa::kAmxInt8 && !cpu::AmxTilesPresent();
  // float8e5m2 scales are float16 values (their upper byte): widened to float16 bits exactly.
  p->half_scales =
      streamed && (weights.scale_kind == ScaleKind::kFloat16 || weights.scale_kind == ScaleKind::kFloat8E5M2);
  const int64_t scale_bytes = p->half_scales ? 2 * kTileCols : 4 * kTileCols;
  const int64_t zero_point_bytes = zp_mode == kZpSymmetric ? 0 : zp_mode == kZpInteger ? kTileCols : 4 * kTileCols;
  if (streamed) {
    p->panel_shift = kStreamedPanelShift;
    p->panel_tiles = int64_t{1} << kStreamedPanelShift;
    p->param_bytes = scale_bytes + zero_point_bytes;
  } else {
    const size_t params = static_cast<size_t>(tiles * nb * kTileCols);
    p->scales.assign(params, 0.f);
    if (!shape.symmetric) p->zero_points.assign(params, 0.f);
  }
  const int64_t last_panel = (tiles - 1) >> p->panel_shift << p->panel_shift;  // its first tile
  p->codes.assign(static_cast<size_t>(BlockCodesOffset(*p, last_panel, 0) + nb * PanelBlockBytes(*p, last_panel)), 0);
  const int zw = 1 << (shape.bits - 1);
  const uint32_t mask = nibble ? 0xfu : 0xffu;
  const uint32_t offset = signed_codes ? static_cast<uint32_t>(zw) : 0u;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t tile = n / kTileCols, col = n % kTileCols;
    UnpackRow(weights.codes + n * row_bytes, row_bytes, shape.bits, K, row.data());
    for (int64_t k0 = 0, block = 0; k0 < K; k0 += bs, ++block) {
      uint8_t* dst = p->codes.data() + BlockCodesOffset(*p, tile, block) + col * 4;
      const int64_t len = std::min<int64_t>(bs, K - k0);
      for (int64_t kk = 0; kk < len; ++kk) {
        const uint32_t v = (static_cast<uint32_t>(row[k0 + kk]) - offset) & mask;  // two's complement if signed
        if (nibble) {
          uint8_t& byte = dst[(kk >> 3) * 64 + (kk & 3)];
          byte = static_cast<uint8_t>(byte | ((kk & 4) ? v << 4 : v));
          const int64_t bit = col * 4 + (kk & 3);  // the code's byte in the group's nibble vector
          for (int q = 0; q < high_planes; ++q) {
            if ((row[k0 + kk] >> (4 + q) & 1) == 0) continue;
            uint8_t* masks = dst - col * 4 + groups * 64 + (q * groups + (kk >> 3)) * 16 + ((kk & 4) ? 8 : 0);
            masks[bit >> 3] = static_cast<uint8_t>(masks[bit >> 3] | (1u << (bit & 7)));
          }
        } else {
          dst[(kk >> 2) * 64 + (kk & 3)] = static_cast<uint8_t>(v);
        }
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t in = n * nb + b;
      if (!streamed) {
        const int64_t at = (tile * nb + b) * kTileCols + col;
        p->scales[at] = scale_value(weights.scale_kind, weights.scales, in);
        if (!shape.symmetric) p->zero_points[at] = ZeroPointAt(shape, weights, in);
        continue;
      }
      uint8_t* params = p->codes.data() + BlockParamsOffset(*p, tile, b);
      if (p->half_scales) {
        const uint16_t half = weights.scale_kind == ScaleKind::kFloat8E5M2
                                  ? static_cast<uint16_t>(static_cast<const uint8_t*>(weights.scales)[in] << 8)
                                  : static_cast<const uint16_t*>(weights.scales)[in];
        std::memcpy(params + col * 2, &half, 2);
      } else {
        const float scale = scale_value(weights.scale_kind, weights.scales, in);
        std::memcpy(params + col * 4, &scale, 4);
      }
      if (zp_mode == kZpInteger) {
        params[scale_bytes + col] = weights.zero_points[in];
      } else if (zp_mode == kZpOffset) {
        const float zero_point = ZeroPointAt(shape, weights, in);
        std::memcpy(params + scale_bytes + col * 4, &zero_point, 4);
      }
    }
  }
  return p;
}

namespace detail {

// Signed codes sa = ua - 2**(act_bits-1) of packed rows, in the padded block layout, with the block
// sums QuantizeRowsScalar computes; scales are copied.
void UnpackRows(const PackedWeights& p, const ActivationCodes& in, int64_t row_begin, int64_t row_end, ActRows* out) {
  const Shape& s = p.shape;
  const int64_t K = s.K, nb = p.num_blocks, bkp = p.block_padded, kp = p.k_padded;
  const int64_t rb = row_bytes(K, s.act_bits);
  const int half = 1 << (s.act_bits - 1);
  const int32_t zw = static_cast<int32_t>(p.implicit_zero_point);
#if BCT_X86_SIMD
  if (s.act_bits == 8 && s.block_size % 16 == 0 && K % s.block_size == 0) {  // no padding: 16 codes at a time
    // sa = u - 128 is the byte u ^ 0x80; the block sum is sum(u) - 128 * block_size (psadbw sums bytes).
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int64_t m = row_begin; m < row_end; ++m) {
      const uint8_t* row = in.codes + m * rb;
      int8_t* codes = out->codes.data() + m * kp;
      for (int64_t b = 0; b < nb; ++b) {
        __m128i sums = _mm_setzero_si128();
        for (int64_t k = b * s.block_size; k < (b + 1) * s.block_size; k += 16) {
          const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
          sums = _mm_add_epi64(sums, _mm_sad_epu8(u, _mm_setzero_si128()));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm_xor_si128(u, flip));
        }
        const int32_t sum = _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_unpackhi_epi64(sums, sums)) -
                            half * static_cast<int32_t>(s.block_size);
        out->scales[m * nb + b] = in.scales[m * nb + b];
        out->corr[m * nb + b] = -zw * sum;
        out->sums[m * nb + b] = static_cast<float>(sum);
      }
    }
    return;
  }
#endif
  std::vector<uint8_t> row(static_cast<size_t>(K));
  for (int64_t m = row_begin; m < row_end; ++m) {
    UnpackRow(in.codes + m * rb, rb, s.act_bits, K, row.data());
    int8_t* codes = out->codes.data() + m * kp;
    std::memset(codes, 0, static_cast<size_t>(kp));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * s.block_size, len = std::min<int64_t>(s.block_size, K - k0);
      int32_t sum = 0;
      for (int64_t k = 0; k < len; ++k) {
        const int32_t code = static_cast<int32_t>(row[static_cast<size_t>(k0 + k)]) - half;
        codes[b * bkp + k] = static_cast<int8_t>(code);
        sum += code;
      }
      out->scales[m * nb + b] = in.scales[m * nb + b];
      out->corr[m * nb + b] = -zw * sum;
      out->sums[m * nb + b] = static_cast<float>(sum);
    }
  }
}

}  // namespace detail

namespace {

// The calling thread's quantized activations, kept for its next call: a call then allocates, zeroes
// and page-faults nothing for them (up to 1% of an encoder's time). A call nested in another on the
// same thread (a row sink recomputing overflowed rows) uses buffers of its own, as the outer call's
// tasks may still read these.
thread_local detail::ActRows t_act_rows;
thread_local int t_compute_depth = 0;

struct CallDepth {
  CallDepth() { ++t_compute_depth; }
  ~CallDepth() { --t_compute_depth; }
  CallDepth(const CallDepth&) = delete;
  CallDepth& operator=(const CallDepth&) = delete;
  bool outermost() const { return t_compute_depth == 1; }
};

// Grows v to at least n elements (never shrinks it: the contents past a call's rows are not read).
template <class T>
void GrowTo(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

// Quantizes rows [row_begin, row_end) of A with the run-time activation quantizer of the path, into
// the padded block layout, with the block sums the integer kernels correct by.
void QuantizeActivations(const PackedWeights& p, const float* A, int64_t row_begin, int64_t row_end,
                         detail::ActRows* out) {
  const Shape& s = p.shape;
  const int64_t nb = p.num_blocks;
  cpu::ActCodes codes;
  codes.codes = out->codes.data() + row_begin * p.k_padded;
  codes.row_stride = p.k_padded;
  codes.block_stride = p.block_padded;
  codes.scales = out->scales.data() + row_begin * nb;
  codes.sums = out->corr.data() + row_begin * nb;
  cpu::Kernels(p.isa).quantize_act_rows(A + row_begin * s.K, row_end - row_begin, s.K, s.act_bits, s.block_size, codes);
  const int32_t zw = static_cast<int32_t>(p.implicit_zero_point);
  for (int64_t i = row_begin * nb; i < row_end * nb; ++i) {
    const int32_t sum = out->corr[i];
    out->sums[i] = static_cast<float>(sum);
    out->corr[i] = -zw * sum;
  }
}

void ComputeScalarRows(const PackedWeights& p, const detail::ActRows* act, const float* A, int64_t row_begin,
                       int64_t row_end, const float* bias, float* Y) {
  const Shape& s = p.shape;
  const int64_t K = s.K, N = s.N, nb = p.num_blocks, bs = s.block_size;
  const bool offsets = ZeroPointMode(s) == kZpOffset;
  for (int64_t m = row_begin; m < row_end; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* w = p.codes.data() + n * K;
      float y = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bs, k1 = std::min(K, k0 + bs);
        const float ws = p.scales[n * nb + b];
        const float zw = s.symmetric ? p.implicit_zero_point : p.zero_points[n * nb + b];  // or the offset
        if (act && offsets) {  // a_scale * (w_scale * dot + offset * sum(sa))
          const int32_t dot = nl::dot_i8(act->codes.data() + m * p.k_padded + b * p.block_padded, w + k0, k1 - k0);
          const float f = std::fma(zw, act->sums[m * nb + b], static_cast<float>(dot) * ws);
          y = std::fma(f, act->scales[m * nb + b], y);
        } else if (offsets) {
          const float* a = A + m * K;
          for (int64_t k = k0; k < k1; ++k) y = std::fma(a[k], value_with_offset(w[k], ws, zw), y);
        } else if (act) {
          const int32_t dot = (s.symmetric ? act->corr[m * nb + b] : 0) +
                              nl::dot_i8(act->codes.data() + m * p.k_padded + b * p.block_padded, w + k0, k1 - k0);
          float f = static_cast<float>(dot);
          if (!s.symmetric) f = std::fma(-zw, act->sums[m * nb + b], f);
          f *= act->scales[m * nb + b];
          y = std::fma(f, ws, y);
        } else {
          const float* a = A + m * K;
          for (int64_t k = k0; k < k1; ++k) y = std::fma(a[k], (static_cast<float>(w[k]) - zw) * ws, y);
        }
      }
      Y[m * N + n] = bias ? y + bias[n] : y;
    }
  }
}

// True when Y[r0:r1, c0:c1] (row stride N) holds no infinity or NaN: an exponent of all ones is the
// only way to exceed 0x7f7fffff once the sign is cleared (a loop the compiler vectorises).
bool RegionFiniteBaseline(const float* Y, int64_t N, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  int32_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = Y + r * N;
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t bits;
      std::memcpy(&bits, row + c, sizeof(bits));
      bad |= static_cast<int32_t>(bits & 0x7fffffffu) > 0x7f7fffff;
    }
  }
  return bad == 0;
}

#if BCT_X86_SIMD
// The same test 16 floats at a time (the baseline loop is SSE2 at best): every prefill product is
// scanned once, so this is a few percent of a GEMM.
__attribute__((target("avx512f"))) bool RegionFiniteAvx512(const float* Y, int64_t N, int64_t r0, int64_t r1,
                                                           int64_t c0, int64_t c1) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const __m512i largest = _mm512_set1_epi32(0x7f7fffff);
  __mmask16 bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = Y + r * N;
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
      const __m512i v = _mm512_loadu_si512(row + c);
      bad = static_cast<__mmask16>(bad | _mm512_cmpgt_epi32_mask(_mm512_and_si512(v, magnitude), largest));
    }
    if (c < c1) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (c1 - c)) - 1u);
      const __m512i v = _mm512_maskz_loadu_epi32(tail, row + c);
      bad = static_cast<__mmask16>(bad | _mm512_mask_cmpgt_epi32_mask(tail, _mm512_and_si512(v, magnitude), largest));
    }
  }
  return bad == 0;
}
#endif

// RegionFinite on the widest vectors the kernel's path may use.
bool RegionFinite(const PackedWeights& p, const float* Y, int64_t N, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#if BCT_X86_SIMD
  if (p.isa == cpu::Isa::kAvx512 || p.isa == cpu::Isa::kAvx512Vnni || p.isa == cpu::Isa::kAmxInt8) {
    return RegionFiniteAvx512(Y, N, r0, r1, c0, c1);
  }
#endif
  return RegionFiniteBaseline(Y, N, r0, r1, c0, c1);
}

}  // namespace

namespace {

// Rows a task of the row-chunked integer prefill takes (all tiles, so each task streams every weight
// once, each tile pair then read from L1 for all its rows): 32 from 64 rows on, else 16 (more than
// kDecodeRows, so the prefill kernels run; at least 4 tasks from 128 rows on, for ORT's pool to
// balance; from 64 rows on 32 rather than 16 halves the weight bytes streamed per row, 1-5% on
// BERT-base's FFN products here); 0 when the shape does not take that path (decode, float mode, the scalar path, or too few
// rows for two tasks).
int64_t RowChunkRows(const PackedWeights& p, int64_t M) {
  if (p.shape.act_bits == 0 || cpu::Kernels(p.isa).matmul_tiles == nullptr || M < 32) return 0;
  return M >= 64 ? 32 : 16;
}

// Decode (M <= kDecodeRows) work split: tasks of whole 4-tile register blocks, so each weight byte is
// read once, by one task. A task streams at least kDecodeTaskBytes / M weight bytes (more rows do more
// arithmetic per byte), so a GEMV that reads its weights in a few microseconds runs on the calling
// thread rather than paying a fork/join of the pool; a larger one is cut into that many nearly equal
// tasks (an even count when few, at most kDecodeMaxTasks), which the pool hands out one at a time,
// so two threads finish within one task of each other. 32 KB (was 128): a decoder's small projections
// (SmolLM2's 576 x 576 and 576 x 192, 62-186 KB) then run on both threads; its decode step at 2 threads
// took 0.95x the time (per interleaved round, quiet Intel host, session 16; 16 KB within noise of 32).
constexpr int64_t kDecodeTaskBytes = int64_t{32} << 10;
constexpr int64_t kDecodeMaxTasks = 64;

int64_t DecodeTasks(const PackedWeights& p, int64_t M, int64_t blocks) {
  // Bytes a 16-column tile streams: its codes and, per block, its scales (and zero points).
  const int64_t tile_bytes = p.tile_bytes + p.num_blocks * (p.param_bytes > 0 ? p.param_bytes : 64);
  int64_t tasks = std::min(blocks, p.num_tiles * tile_bytes * M / kDecodeTaskBytes);
  if (tasks <= 1) return 1;
  if (tasks < 8) tasks += tasks & 1;
  return std::min({tasks, blocks, kDecodeMaxTasks});
}

}  // namespace

bool Compute(const PackedWeights& p, const float* A, int64_t M, const float* bias, float* Y,
             const ParallelFor& parallel_for, const ActivationCodes* act_codes, const RowSink* sink) {
  const Shape& s = p.shape;
  if (M <= 0 || s.N <= 0) return true;
  // Integer prefill runs in row chunks: each task quantizes its own rows (in parallel, while they are
  // in cache) and computes them against all tiles, into Y or (with a sink) per-thread scratch.
  const int64_t chunk_rows = RowChunkRows(p, M);
  if (sink != nullptr && chunk_rows == 0) {  // the product as usual, then the sink over row chunks
    std::vector<float> product(static_cast<size_t>(M * s.N));
    const bool finite = Compute(p, A, M, bias, product.data(), parallel_for, act_codes);
    const int64_t rows_per_task = std::max<int64_t>(1, 8192 / s.N);
    parallel_for(static_cast<std::size_t>((M + rows_per_task - 1) / rows_per_task), [&](std::size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
      float* rows = product.data() + r0 * s.N;
      (*sink)(r0, r1, rows, finite || RegionFinite(p, rows, s.N, 0, r1 - r0, 0, s.N));
    });
    return finite;
  }
  std::atomic<bool> finite{true};
  const bool quantized = s.act_bits > 0;
  const CallDepth depth;
  detail::ActRows nested;
  detail::ActRows& act = depth.outermost() ? t_act_rows : nested;
  if (quantized) {
    GrowTo(act.codes, M * p.k_padded);
    GrowTo(act.scales, M * p.num_blocks);
    GrowTo(act.corr, M * p.num_blocks);
    GrowTo(act.sums, M * p.num_blocks);
    // Padding (K or a block short of the padded layout) must read as code 0 in the dot products; the
    // quantizers write only the blocks' own codes.
    if (p.k_padded != s.K) std::fill_n(act.codes.begin(), M * p.k_padded, int8_t{0});
    // Quantizing costs about 0.3 ns an element; a parallel section costs more than that below
    // about 2**18 elements (thread wake-up), so small batches are quantized on the calling thread.
    const int64_t rows_per_task = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(1, s.K));
    const int64_t tasks = (M + rows_per_task - 1) / rows_per_task;
    auto quantize = [&](std::size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
      if (act_codes != nullptr) return detail::UnpackRows(p, *act_codes, r0, r1, &act);
      QuantizeActivations(p, A, r0, r1, &act);
    };
    // Row-chunked prefill (chunk_rows > 0) quantizes each task's rows in the task itself, below.
    if (chunk_rows == 0 && tasks > 1) {
      parallel_for(static_cast<std::size_t>(tasks), quantize);
    } else if (chunk_rows == 0) {
      quantize(0);
    }
  }

  const matmul::TilesFn tiles = cpu::Kernels(p.isa).matmul_tiles;
  if (tiles == nullptr) {
    const int64_t rows_per_task = std::max<int64_t>(1, std::min<int64_t>(8, M));
    const int64_t tasks = (M + rows_per_task - 1) / rows_per_task;
    parallel_for(static_cast<std::size_t>(tasks), [&](std::size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
      ComputeScalarRows(p, quantized ? &act : nullptr, A, r0, r1, bias, Y);
      if (!RegionFinite(p, Y, s.N, r0, r1, 0, s.N)) finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
  }

  // Float mode reads activations in the padded block layout; copy only when padding exists.
  std::vector<float> padded;
  const float* a_padded = A;
  if (!quantized && p.k_padded != s.K) {
    padded.assign(static_cast<size_t>(M * p.k_padded), 0.f);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < p.num_blocks; ++b) {
        const int64_t k0 = b * s.block_size, len = std::min<int64_t>(s.block_size, s.K - k0);
        std::memcpy(padded.data() + m * p.k_padded + b * p.block_padded, A + m * s.K + k0,
                    static_cast<size_t>(len) * sizeof(float));
      }
    }
    a_padded = padded.data();
  }

  if (chunk_rows > 0) {
    const int64_t tasks = (M + chunk_rows - 1) / chunk_rows;
    parallel_for(static_cast<std::size_t>(tasks), [&](std::size_t task) {
      const int64_t r0 = static_cast<int64_t>(task) * chunk_rows, r1 = std::min(M, r0 + chunk_rows);
      if (act_codes != nullptr) {
        detail::UnpackRows(p, *act_codes, r0, r1, &act);
      } else {
        QuantizeActivations(p, A, r0, r1, &act);
      }
      float* y = Y;
      float* rows = Y + r0 * s.N;
      if (sink != nullptr) {
        thread_local std::vector<float> scratch;
        scratch.resize(static_cast<size_t>(chunk_rows * s.N));
        rows = scratch.data();
        // The kernels address row r of Y at Y + r * N: an address r0 rows before the scratch puts row
        // r0 at its start (integer arithmetic: no pointer outside the buffer is formed and dereferenced).
        y = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(scratch.data()) -
                                     static_cast<uintptr_t>(r0 * s.N) * sizeof(float));
      }
      // All tiles in one call: the paths walk them tile (or tile pair) after tile, each read from L1 for
      // all rows, and the AVX-512 path prepares its rows' activations once.
      tiles(p, &act, a_padded, r0, r1, 0, p.num_tiles, bias, y);
      const bool rows_finite = RegionFinite(p, rows, s.N, 0, r1 - r0, 0, s.N);
      if (!rows_finite) finite.store(false, std::memory_order_relaxed);
      if (sink != nullptr) (*sink)(r0, r1, rows, rows_finite);
    });
    return finite.load();
  }

  const detail::ActRows* act_ptr = quantized ? &act : nullptr;
  if (M <= kDecodeRows) {  // decode: all rows, tasks of whole register blocks (DecodeTasks)
    const int64_t blocks = (p.num_tiles + 3) / 4, tasks = DecodeTasks(p, M, blocks);
    parallel_for(static_cast<std::size_t>(tasks), [&](std::size_t task) {
      const int64_t i = static_cast<int64_t>(task);
      const int64_t t0 = blocks * i / tasks * 4, t1 = std::min(p.num_tiles, blocks * (i + 1) / tasks * 4);
      tiles(p, act_ptr, a_padded, 0, M, t0, t1, bias, Y);
      if (!RegionFinite(p, Y, s.N, 0, M, t0 * kTileCols, std::min(s.N, t1 * kTileCols))) {
        finite.store(false, std::memory_order_relaxed);
      }
    });
    return finite.load();
  }
  // Tasks: row chunks times tile chunks, many more tasks than threads so that ONNX Runtime's pool
  // (which hands out tasks one at a time) balances the load on a busy machine. Integer tasks of fewer
  // than 32 rows take them all and whole blocks of 4 tiles; float prefill tasks dequantize their tiles
  // once for 128 rows.
  const int64_t rows_per_task = std::min<int64_t>(M, quantized ? 32 : 128);
  const int64_t row_chunks = (M + rows_per_task - 1) / rows_per_task;
  const int64_t work_tasks = std::max<int64_t>(1, M * s.K * s.N / (1 << 18));  // >= 256K MACs a task
  const int64_t target_tasks = std::min<int64_t>(64, work_tasks);
  const int64_t tile_chunks_wanted = std::max<int64_t>(1, target_tasks / row_chunks);
  const int64_t tile_multiple = quantized ? 4 : 2;
  int64_t tiles_per_task = (p.num_tiles + tile_chunks_wanted - 1) / tile_chunks_wanted;
  tiles_per_task = (tiles_per_task + tile_multiple - 1) / tile_multiple * tile_multiple;
  const int64_t tile_chunks = (p.num_tiles + tiles_per_task - 1) / tiles_per_task;
  parallel_for(static_cast<std::size_t>(row_chunks * tile_chunks), [&](std::size_t task) {
    const int64_t rc = static_cast<int64_t>(task) / tile_chunks, tc = static_cast<int64_t>(task) % tile_chunks;
    const int64_t r0 = rc * rows_per_task, r1 = std::min(M, r0 + rows_per_task);
    const int64_t t0 = tc * tiles_per_task, t1 = std::min(p.num_tiles, t0 + tiles_per_task);
    tiles(p, act_ptr, a_padded, r0, r1, t0, t1, bias, Y);
    if (!RegionFinite(p, Y, s.N, r0, r1, t0 * kTileCols, std::min(s.N, t1 * kTileCols))) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

}  // namespace matmul
}  // namespace bct
