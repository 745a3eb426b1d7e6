// The per-path function tables of the CPU kernels: Kernels(isa) holds every function whose code
// differs by instruction set. A kernel picks its Isa once at creation (cpu/isa.h) and calls through
// the table, so no kernel tests CPU features or environment variables itself.
//
// Adding an instruction-set path (e.g. AMX GEMM): write its functions in a new file compiled for
// that target (a `#pragma GCC target` after the includes, as cpu/matmul_kernel_avx512.cc does),
// declare them below, and point the path's entry in kernel_table.cc at them; entries a path does not
// specialise reuse the functions of the path below it. Adding a kernel: add a field here and fill
// it for every path in kernel_table.cc (the portable C++ of cpu/portable_kernels.h, compiled once
// per path, is the usual starting point).
#pragma once

#include <cstdint>
#include <string>

#include "bct/attention_math.h"
#include "bct/nonlinear_math.h"
#include "cpu/act_quantize.h"
#include "cpu/isa.h"
#include "cpu/matmul_kernel.h"
#include "cpu/row_kernels.h"

namespace bct {
namespace cpu {

// Blockwise rows of any format (cpu/row_kernels.h).
using QuantizeRowsFn = void (*)(const RowFormat& fmt, const float* x, int64_t rows, uint8_t* codes, void* scales,
                                uint8_t* zero_points);
using DequantizeRowsFn = void (*)(const RowFormat& fmt, const uint8_t* codes, const void* scales,
                                  const uint8_t* zero_points, int64_t rows, float* out);

// BlockActMatMul's block dots. K-major B: one output row y [n] from A's signed codes qa [k] and
// scales sa [nb], B's codes qkn [k, n] and scales sbn [nb, n]; acc is scratch of n int32.
using ActDotRowFn = void (*)(const int8_t* qa, const float* sa, const int8_t* qkn, const float* sbn, int64_t n,
                             int64_t k, int64_t block_size, int64_t nb, int32_t* acc, float* y);

// Row functions of the nonlinear ops (bct/nonlinear_math.h), in place on y [n] (softmax and the
// norms: `rows` consecutive rows of n).
using GeluRowFn = void (*)(float* y, int64_t n, nl::GeluForm form);
using SiluRowFn = void (*)(float* y, int64_t n);
using SoftmaxRowsFn = void (*)(float* y, int64_t rows, int64_t n);
using LayerNormRowsFn = void (*)(float* y, int64_t rows, int64_t n, const float* scale, const float* bias,
                                 float epsilon);
using RMSNormRowsFn = void (*)(float* y, int64_t rows, int64_t n, const float* scale, float epsilon);
// y = a + b on one row of n (also into sum unless it is nullptr): the residual Add of the Add + norm ops.
using AddRowFn = void (*)(const float* a, const float* b, int64_t n, float* y, float* sum);

// BlockAttention (bct/attention_math.h): `rows` consecutive query rows i = row0 .. of one (batch,
// query head), codes q [rows, dh] and scales qs [rows, nb], over the keys of one KV head, with their
// block dots already computed, dots [rows, sk] (then q and qs are not read and may be nullptr); mask nullptr or read at
// mask[i * mask_row_stride + j * mask_key_stride]; y [rows, dh] with rows y_stride floats apart.
using AttentionRowsFn = void (*)(const int8_t* q, const float* qs, const float* dots, int64_t rows, int64_t row0,
                                 int64_t sq, int64_t sk, bool causal, const nl::AttentionKeys& kv, float scale,
                                 const float* mask, int64_t mask_row_stride, int64_t mask_key_stride, float* y,
                                 int64_t y_stride);

// BlockScaleErrors (GPTQ's scale search): weighted squared errors [candidates, n] of K-major blocks x
// [len, n] with candidate float32 scales (and zero points, nullptr when symmetric) [candidates, n].
using ScaleErrorsFn = void (*)(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,
                               int64_t candidates, const float* importance, int bits, bool symmetric, float* errors);
// ... with reduce=0: the differences q * scale - x [candidates, n, len] of blocks held row by row, x [n, len].
using ScaleDiffsFn = void (*)(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,
                              int64_t candidates, int bits, bool symmetric, float* diffs);

// BlockGptqColumns (GPTQ's walk over one block's columns, integer codes): block [len, n] float64 corrected in
// place, levels [len, n] and errors [len, n] written (cpu/portable_kernels_impl.h).
using GptqColumnsFn = void (*)(double* block, int64_t len, int64_t n, const double* hinv, const double* inverse_diagonal,
                               const float* scale, const float* inverse, const float* zero, int bits, bool symmetric,
                               float* levels, double* errors);

struct KernelTable {
  Isa isa;
  QuantizeRowsFn quantize_rows;
  DequantizeRowsFn dequantize_rows;
  QuantizeActRowsFn quantize_act_rows;        // the one run-time activation quantizer: rows along K
  QuantizeActColumnsFn quantize_act_columns;  // ... and K-major columns
  ActDotRowFn act_dot_row;
  bool act_dot_vnni;  // BlockActMatMul packs B for the AVX-512 VNNI dots (cpu/act_matmul_vnni.h)
  GeluRowFn gelu_row;
  SiluRowFn silu_row;
  SoftmaxRowsFn softmax_rows;
  LayerNormRowsFn layer_norm_rows;
  RMSNormRowsFn rms_norm_rows;
  AddRowFn add_row;
  AttentionRowsFn attention_rows;
  ScaleErrorsFn scale_errors;
  ScaleDiffsFn scale_diffs;
  GptqColumnsFn gptq_columns;
  matmul::TilesFn matmul_tiles;  // nullptr: BlockMatMul's scalar reference path
  bool matmul_compact_weights;   // streamed layout (matmul_kernel.h), float16 scales / uint8 zero points as stored
};

// The table of a path (any Isa value; the caller made sure the CPU runs it).
const KernelTable& Kernels(Isa isa);

// The path a kernel being created runs: IsaFromEnvironment, or node.Fail with its message.
template <class Node>
Isa KernelIsa(const Node& node) {
  Isa isa = Isa::kBaseline;
  std::string error;
  if (!IsaFromEnvironment(&isa, &error)) node.Fail(error);
  return isa;
}

// Functions of each path, by file.
// cpu/row_kernels.cc
void QuantizeRowsBaseline(const RowFormat&, const float*, int64_t, uint8_t*, void*, uint8_t*);
void QuantizeRowsAvx512(const RowFormat&, const float*, int64_t, uint8_t*, void*, uint8_t*);
void DequantizeRowsBaseline(const RowFormat&, const uint8_t*, const void*, const uint8_t*, int64_t, float*);
void DequantizeRowsAvx2(const RowFormat&, const uint8_t*, const void*, const uint8_t*, int64_t, float*);
void DequantizeRowsAvx512(const RowFormat&, const uint8_t*, const void*, const uint8_t*, int64_t, float*);
void QuantizeActRowsAvx512(const float*, int64_t, int64_t, int, int64_t, const ActCodes&);
void QuantizeActColumnsAvx512(const float*, int64_t, int64_t, int, int8_t*, float*);
// cpu/nonlinear_avx512.cc (explicit AVX-512 where auto-vectorisation falls short)
void GeluRowAvx512(float* y, int64_t n, nl::GeluForm form);
void SoftmaxRowsAvx512(float* y, int64_t rows, int64_t n);
// cpu/norm_avx512.cc
void LayerNormRowsAvx512(float* y, int64_t rows, int64_t n, const float* scale, const float* bias, float epsilon);
void RMSNormRowsAvx512(float* y, int64_t rows, int64_t n, const float* scale, float epsilon);
// cpu/attention_avx512.cc
void AttentionRowsAvx512(const int8_t* q, const float* qs, const float* dots, int64_t rows, int64_t row0, int64_t sq,
                         int64_t sk, bool causal, const nl::AttentionKeys& kv, float scale, const float* mask,
                         int64_t mask_row_stride, int64_t mask_key_stride, float* y, int64_t y_stride);

// cpu/portable_kernels_{baseline,avx2,avx512}.cc: cpu/portable_kernels_impl.h compiled for each path.
#define BCT_DECLARE_PORTABLE_KERNELS(path)                                                                      \
  namespace path {                                                                                              \
  void QuantizeActRows(const float* x, int64_t rows, int64_t k, int bits, int64_t block_size, const ActCodes& out); \
  void QuantizeActColumns(const float* b, int64_t n, int64_t len, int bits, int8_t* q, float* scales);          \
  void ActDotRow(const int8_t* qa, const float* sa, const int8_t* qkn, const float* sbn, int64_t n, int64_t k,  \
                 int64_t block_size, int64_t nb, int32_t* acc, float* y);                                       \
  void GeluRow(float* y, int64_t n, nl::GeluForm form);                                                         \
  void SiluRow(float* y, int64_t n);                                                                            \
  void SoftmaxRows(float* y, int64_t rows, int64_t n);                                                          \
  void LayerNormRows(float* y, int64_t rows, int64_t n, const float* scale, const float* bias, float epsilon);  \
  void RMSNormRows(float* y, int64_t rows, int64_t n, const float* scale, float epsilon);                       \
  void AddRow(const float* a, const float* b, int64_t n, float* y, float* sum);                                 \
  void AttentionRows(const int8_t* q, const float* qs, const float* dots, int64_t rows, int64_t row0, int64_t sq, \
                     int64_t sk, bool causal, const nl::AttentionKeys& kv, float scale, const float* mask,     \
                     int64_t mask_row_stride, int64_t mask_key_stride, float* y, int64_t y_stride);            \
  void DequantizeValueCodes(const nl::AttentionKeys& kv, int64_t t0, int64_t count, float* out);               \
  void ScaleErrors(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,      \
                   int64_t candidates, const float* importance, int bits, bool symmetric, float* errors);     \
  void ScaleDiffs(const float* x, int64_t len, int64_t n, const float* scales, const float* zero_points,       \
                  int64_t candidates, int bits, bool symmetric, float* diffs);                                 \
  void GptqColumns(double* block, int64_t len, int64_t n, const double* hinv, const double* inverse_diagonal,   \
                   const float* scale, const float* inverse, const float* zero, int bits, bool symmetric,       \
                   float* levels, double* errors);                                                              \
  }
BCT_DECLARE_PORTABLE_KERNELS(baseline)
BCT_DECLARE_PORTABLE_KERNELS(avx2)
BCT_DECLARE_PORTABLE_KERNELS(avx512)
#undef BCT_DECLARE_PORTABLE_KERNELS

}  // namespace cpu
}  // namespace bct
