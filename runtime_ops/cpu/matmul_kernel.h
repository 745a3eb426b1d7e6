// BlockMatMul CPU kernel, independent of ONNX Runtime: Y[M, N] = A[M, K] x W'[N, K]^T + bias.
//
// W' is the blockwise weight of docs/ops.md (codes packed densely along K, one scale per block of
// block_size along K, optional zero points). The weight is repacked once (Pack) into the layout the
// selected instruction set wants; Compute then runs on any number of activation rows.
//
// act_bits == 0: float activations, fp32 arithmetic. Prefill (4 rows or more) dequantizes each tile
//   exactly as block_format.dequantize does ((code - zero_point) * scale, one rounding) and runs an
//   fp32 GEMM micro-kernel; the GEMV of nibble codes sums a * (code - zero_point) per block (codes
//   turned into floats by a vpermps table) and scales the block sum once.
// act_bits in 2..8: each row of A is quantized per block exactly as
//   block_format.quantize_codes(A, BlockFormat(act_bits, block_size, True, "float32")); per block the
//   integer dot product sum(sa * (uw - zw)) (sa = signed activation code) is scaled by
//   a_scale * w_scale and accumulated in fp32. AVX-512 VNNI: up to kDecodeRows rows (decode) stream the
//   packed codes once, nibbles unpacked in registers, split over N only; more rows (prefill) run a
//   vpdpbusd micro-kernel on the same packed codes, no per-call copy: 8 rows x 32 columns on nibbles
//   (unpacked in registers, by GFNI where the CPU has it) with activations interleaved per 8-row
//   block, 4 rows x 64 columns on bytes (5-bit codes with a high bit plane from bytes expanded once,
//   prefill_bytes), in tasks of 16 or 32 whole rows that quantize their own rows first (so the
//   quantization runs in parallel too), the block's scale product applied in the K-block epilogue (cvt, mul, fma: the spec's order,
//   so the bits equal the scalar path's). Both end in StoreTiles, which adds the bias and writes the
//   float tile.
// Float-offset weights (value u * scale + offset, zero_point_kind float16/float32): float mode
//   dequantizes u * scale + offset (two roundings) wherever it reads a weight (the nibble vpermps GEMV
//   is not used for them); integer mode adds a_scale * (w_scale * dot(sa, uw) + offset * sum(sa)).
// Results agree with bct_onnx.reference_ops.matmul_reference exactly on data whose sums are exact in
// float32, and within (K + 4) * 2**-24 * (|A'| @ |W'|^T) otherwise (tests/runtime_ops/test_matmul.py).
//
// SIMD layout (AVX2, AVX-VNNI and AVX-512 share it): columns are grouped in tiles of 16; inside a tile
// the codes of one group of k values sit in 64 bytes, one 32-bit lane per column:
//   nibble storage (bits <= 4): a group is 8 k; byte j of a lane holds k = 8g + j in its low nibble
//                               and k = 8g + 4 + j in its high nibble;
//   byte storage (bits 5..8):   a group is 4 k; byte j of a lane holds k = 4g + j.
//   high bit planes (5 bits, AVX-512 streamed layout, integer mode): nibble storage of the low 4
//                               bits, then per block, for plane q (code bit 4 + q) and group g, two
//                               64-bit masks at groups * 64 + (q * groups + g) * 16 (+8): bit i is
//                               that bit of the code in byte i of the group's low (then high) nibbles.
//                               A block reads (4 + planes) / 8 of the bytes of byte storage.
// Codes are unsigned, except float mode with symmetric weights, which stores code - 2**(bits-1) in
// two's complement (so no zero point is left to subtract). Each block is padded to
// min(block_size, K) rounded up to 8 k with code 0 (activations are padded with 0, so padded positions
// contribute nothing). The scalar path keeps one unpacked byte per code and is the reference the
// SIMD paths are tested against.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "bct/block_math.h"
#include "cpu/isa.h"
#include "cpu/weight_memory.h"

namespace bct {
namespace matmul {

using ScaleKind = ::bct::ScaleKind;  // float16, float32, or pow2 exponent bytes

struct Shape {
  int64_t K = 0;
  int64_t N = 0;
  int bits = 4;
  int64_t block_size = 32;
  bool symmetric = true;
  int act_bits = 0;
  // Asymmetric weights: uint8 zero points ((u - zp) * scale) or float offsets (u * scale + offset).
  ZeroPointKind zero_point_kind = ZeroPointKind::kInteger;

  int64_t num_blocks() const { return (K + block_size - 1) / block_size; }
  int64_t row_bytes() const { return (K * bits + 7) / 8; }
};

struct WeightInputs {
  const uint8_t* codes = nullptr;        // [N, row_bytes(K)]
  const void* scales = nullptr;          // [N, num_blocks], element type given by scale_kind
  ScaleKind scale_kind = ScaleKind::kFloat16;
  // [N, num_blocks]; nullptr when symmetric. The bytes of uint8 zero points, or of float16 / float32
  // offsets when shape.zero_point_kind says so.
  const uint8_t* zero_points = nullptr;
};

// How the SIMD templates treat a weight's blocks (a template parameter, so each mode compiles apart).
constexpr int kZpSymmetric = 0;  // implicit zero point 2**(bits-1)
constexpr int kZpInteger = 1;    // (u - zp) * scale, zp a stored uint8
constexpr int kZpOffset = 2;     // u * scale + offset, offset a stored float
inline int ZeroPointMode(const Shape& shape) {
  if (shape.symmetric) return kZpSymmetric;
  return shape.zero_point_kind == ZeroPointKind::kInteger ? kZpInteger : kZpOffset;
}

// Calls f(nibble, zp) with std::integral_constant arguments for the weight's storage (nibble codes
// or bytes) and zero-point mode, so a SIMD path instantiates its templates for each combination once.
template <class F>
void ForWeightMode(bool nibble, const Shape& shape, const F& f) {
  using Nibble = std::integral_constant<bool, true>;
  using Bytes = std::integral_constant<bool, false>;
  switch (ZeroPointMode(shape)) {
    case kZpSymmetric:
      return nibble ? f(Nibble{}, std::integral_constant<int, kZpSymmetric>{})
                    : f(Bytes{}, std::integral_constant<int, kZpSymmetric>{});
    case kZpInteger:
      return nibble ? f(Nibble{}, std::integral_constant<int, kZpInteger>{})
                    : f(Bytes{}, std::integral_constant<int, kZpInteger>{});
    default:
      return nibble ? f(Nibble{}, std::integral_constant<int, kZpOffset>{})
                    : f(Bytes{}, std::integral_constant<int, kZpOffset>{});
  }
}

// Activations of at most this many rows are decode-shaped: the kernels stream the packed weight codes
// once for all rows (work split over N only); more rows take the prefill kernels (split over M and N).
constexpr int64_t kDecodeRows = 8;

// Runs task(i) for i in [0, total), possibly on several threads; returns when all are done.
using ParallelFor = std::function<void(std::size_t total, const std::function<void(std::size_t)>& task)>;

// Runs everything on the calling thread.
void SerialFor(std::size_t total, const std::function<void(std::size_t)>& task);

// Weights repacked for one instruction set. Immutable after Pack, so Compute may run concurrently.
//
// SIMD code layout: panels of panel_tiles tiles; per panel, block after block, the codes of each of
// its tiles for the block (block_code_bytes each), then (streamed layout, param_bytes > 0) each
// tile's block parameters: 16 scales (float16 when half_scales, else float32), then 16 zero points
// (uint8 for integer zero points, float32 for float offsets) when asymmetric, the parameter region
// padded to 64 bytes. The last panel may hold fewer tiles. With panel_tiles = 1 and no parameters
// in the stream this is [num_tiles][tile_bytes] (the AVX2 / AVX-VNNI paths, whose scales and zero
// points are float32 arrays of their own). The AVX-512 path streams 4 tiles with their parameters:
// a decode GEMV then reads one sequential stream of weight bytes.
struct PackedWeights {
  Shape shape;
  cpu::Isa isa = cpu::Isa::kBaseline;  // the path (cpu/kernel_table.h: its tiles; none: the scalar path)
  int64_t num_blocks = 0;
  int64_t block_padded = 0;  // SIMD: min(block_size, K) rounded up to 8; scalar: block_size
  int64_t k_padded = 0;      // num_blocks * block_padded
  int64_t num_tiles = 0;     // SIMD: ceil(N / 16)
  int64_t tile_bytes = 0;    // SIMD: code bytes of one tile (num_blocks * block_code_bytes)
  int64_t block_code_bytes = 0;  // SIMD: code bytes of one tile for one block
  int64_t panel_tiles = 1;       // SIMD: tiles interleaved block by block (1 << panel_shift)
  int panel_shift = 0;
  int64_t param_bytes = 0;       // SIMD: bytes of one tile's block parameters in the stream (0: none)
  bool half_scales = false;      // streamed scales are float16 (else float32)
  bool nibble = false;       // SIMD: bits <= 4 (two codes a byte), or nibbles with high_planes
  // Streamed layout, integer mode, 5 bits: the low 4 bits of each code as nibble storage, then
  // high_planes (bits - 4) bit planes ("high bit planes" above), not one byte a code.
  int high_planes = 0;
  bool signed_codes = false; // codes stored as (code - zero_point) two's complement (float symmetric)
  bool gfni = false;         // AVX-512 prefill: high nibbles unpacked by vgf2p8affineqb (cpu::UseGfni at Pack)
  bool amx_emulated = false; // amx path without AMX tiles (BCT_ONNX_AMX_EMULATE): tile instructions emulated
  float implicit_zero_point = 0.f;
  cpu::WeightVector<uint8_t> codes;  // SIMD: the layout above; scalar: [N][K] one code a byte
  // Weight scales and zero points when not in the stream, float32 (float offsets too); SIMD:
  // [num_tiles][num_blocks][16]; scalar: [N][num_blocks]. Unused vectors stay empty.
  cpu::WeightVector<float> scales;
  cpu::WeightVector<float> zero_points;
  // high_planes weights as byte storage for the integer prefill kernel: the panels of `codes`, per
  // block each tile's byte codes (per group of 8 k: the low, then the high nibbles with their plane
  // bits, 64 bytes each; block_padded * 16 bytes a tile), then the panel's block parameters copied
  // from `codes`. Built once, on the first prefill call (the AVX-512 path's PrefillBytes, under
  // prefill_bytes_once, so concurrent calls wait for one expansion), then read by every prefill call;
  // decode keeps streaming `codes`. Costs one byte a weight (1.6x the packed 5-bit codes), only in
  // kernels that run prefill.
  mutable std::once_flag prefill_bytes_once;
  mutable cpu::WeightVector<uint8_t> prefill_bytes;
};

// Tiles in the panel of `tile` (panel_tiles except in a last, partial panel).
inline int64_t TilesInPanel(const PackedWeights& p, int64_t tile) {
  const int64_t first = tile >> p.panel_shift << p.panel_shift;
  return p.num_tiles - first < p.panel_tiles ? p.num_tiles - first : p.panel_tiles;
}

// Bytes of one block of the panel of `tile`: from a tile's codes for block b to its codes for b + 1.
inline int64_t PanelBlockBytes(const PackedWeights& p, int64_t tile) {
  const int64_t tiles = TilesInPanel(p, tile);
  return tiles * p.block_code_bytes + (tiles * p.param_bytes + 63) / 64 * 64;
}

// Byte offsets in p.codes of a tile's codes for one block, and of its block parameters.
inline int64_t BlockCodesOffset(const PackedWeights& p, int64_t tile, int64_t block) {
  const int64_t panel = tile >> p.panel_shift, in_panel = tile & (p.panel_tiles - 1);
  const int64_t full_panel = p.panel_tiles * p.block_code_bytes + (p.panel_tiles * p.param_bytes + 63) / 64 * 64;
  return panel * p.num_blocks * full_panel + block * PanelBlockBytes(p, tile) + in_panel * p.block_code_bytes;
}
inline int64_t BlockParamsOffset(const PackedWeights& p, int64_t tile, int64_t block) {
  const int64_t in_panel = tile & (p.panel_tiles - 1);
  return BlockCodesOffset(p, tile, block) + (TilesInPanel(p, tile) - in_panel) * p.block_code_bytes +
         in_panel * p.param_bytes;
}
inline const uint8_t* BlockCodes(const PackedWeights& p, int64_t tile, int64_t block) {
  return p.codes.data() + BlockCodesOffset(p, tile, block);
}
inline const uint8_t* BlockParams(const PackedWeights& p, int64_t tile, int64_t block) {
  return p.codes.data() + BlockParamsOffset(p, tile, block);
}

// Validates nothing beyond what it needs (the op validates); the inputs must match shape.
std::unique_ptr<PackedWeights> Pack(const Shape& shape, const WeightInputs& weights, cpu::Isa isa);

// Activation rows already quantized in the kernel's own run-time format (act_bits, block_size,
// symmetric, float32 scales): what quantizing A would give, so the kernel uses them as they are.
struct ActivationCodes {
  const uint8_t* codes = nullptr;  // [M, row_bytes(K, act_bits)], densely packed unsigned codes
  const float* scales = nullptr;   // [M, num_blocks]
};

// Takes finished rows [row_begin, row_end) of Y (rows: their values, row stride N, writable scratch
// the sink may overwrite) on the thread that computed them; finite is false when one of them is not.
using RowSink = std::function<void(int64_t row_begin, int64_t row_end, float* rows, bool finite)>;

// Y[M, N] = A[M, K] x W'^T (+ bias[N] when bias != nullptr). A and Y are dense row-major.
// With act_codes (integer mode only), A is not read: the rows' codes and scales are used directly,
// giving the same Y as A whose quantization they are.
// Returns true when every output is finite (each task checks the part of Y it wrote while it is still
// in cache), so that the caller looks for overflowed rows only when there are some.
// With a sink, Y must be nullptr: every row of Y is handed to the sink once instead (in chunks, in any
// order, possibly concurrently). Integer prefill computes whole rows per task, then into a per-thread
// buffer, handed over while they are in cache, so a product that is requantized is never written to
// and read back from memory.
bool Compute(const PackedWeights& packed, const float* A, int64_t M, const float* bias, float* Y,
             const ParallelFor& parallel_for, const ActivationCodes* act_codes = nullptr,
             const RowSink* sink = nullptr);

// Internal entry points of the instruction-set specific files (see matmul_kernel.cc).
namespace detail {

struct ActRows {  // quantized activations of M rows, in the padded block layout
  std::vector<int8_t> codes;    // [M][k_padded] signed codes sa = ua - 2**(act_bits-1)
  std::vector<float> scales;    // [M][num_blocks] a_scale
  std::vector<int32_t> corr;    // [M][num_blocks] -implicit_weight_zero_point * sum(sa) (symmetric weights)
  std::vector<float> sums;      // [M][num_blocks] float(sum(sa)) (asymmetric weights)
};

// Fills out from codes already in the activation format (the fast path of a quantized input).
void UnpackRows(const PackedWeights& p, const ActivationCodes& in, int64_t row_begin, int64_t row_end, ActRows* out);

// Where the integer prefill kernels read tiles [tile0, tile0 + T) (all in one panel): tile t's codes
// for block b at codes + b * block_stride + t * tile_stride, its block parameters (the packed stream's
// format) at params + b * block_stride + t * p.param_bytes.
struct PrefillView {
  const uint8_t* codes;
  const uint8_t* params;
  int64_t block_stride;
  int64_t tile_stride;
};

// The codes of tiles [tile0, ...) of one panel for the integer prefill kernels (AVX-512 builds):
// nibbles or bytes as packed, or the bytes expanded (once per weight) from nibbles with high bit planes.
PrefillView PrefillTiles(const PackedWeights& p, int64_t tile0);

// Computes rows [row_begin, row_end) x tiles [tile_begin, tile_end) of Y: the SIMD paths' entries
// of Kernels(isa).matmul_tiles. Integer mode reads act; float mode reads a_padded ([M][k_padded] floats).
void TilesAvx2(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
               int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);
void TilesAvx512(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                 int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);
// TilesAvx512's few-row (decode) kernels, matmul_gemv_avx512.cc: rows [row_begin, row_end) at most
// kDecodeRows in integer mode, 3 in float mode.
void DecodeTilesAvx512(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                       int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);
void TilesAvxVnni(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                  int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);
// The amx path (matmul_kernel_amx.cc): integer prefill rows in blocks of 16 on AMX-INT8 tiles, the rest
// (other rows, float mode) as TilesAvx512.
void TilesAmx(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);

}  // namespace detail

using TilesFn = void (*)(const PackedWeights& p, const detail::ActRows* act, const float* a_padded, int64_t row_begin,
                         int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y);

}  // namespace matmul
}  // namespace bct
