// One entry per instruction-set path (cpu/isa.h): the functions its kernels run. Each path starts
// from the entry of the path below it and replaces what it has its own version of.
#include "cpu/kernel_table.h"

namespace bct {
namespace cpu {
namespace {

KernelTable BaselineEntry() {
  KernelTable t{};
  t.isa = Isa::kBaseline;
  t.quantize_rows = QuantizeRowsBaseline;
  t.dequantize_rows = DequantizeRowsBaseline;
  t.quantize_act_rows = baseline::QuantizeActRows;
  t.quantize_act_columns = baseline::QuantizeActColumns;
  t.act_dot_row = baseline::ActDotRow;
  t.act_dot_vnni = false;
  t.gelu_row = baseline::GeluRow;
  t.silu_row = baseline::SiluRow;
  t.softmax_rows = baseline::SoftmaxRows;
  t.layer_norm_rows = baseline::LayerNormRows;
  t.rms_norm_rows = baseline::RMSNormRows;
  t.add_row = baseline::AddRow;
  t.attention_rows = baseline::AttentionRows;
  t.scale_errors = baseline::ScaleErrors;
  t.scale_diffs = baseline::ScaleDiffs;
  t.gptq_columns = baseline::GptqColumns;
  t.matmul_tiles = nullptr;  // the scalar reference path
  t.matmul_compact_weights = false;
  return t;
}

#if BCT_X86_SIMD
KernelTable Avx2Entry() {
  KernelTable t = BaselineEntry();
  t.isa = Isa::kAvx2;
  t.dequantize_rows = DequantizeRowsAvx2;  // quantize_rows: the SSE2 loops are as fast here
  t.quantize_act_rows = avx2::QuantizeActRows;
  t.quantize_act_columns = avx2::QuantizeActColumns;
  t.act_dot_row = avx2::ActDotRow;
  t.gelu_row = avx2::GeluRow;
  t.silu_row = avx2::SiluRow;
  t.softmax_rows = avx2::SoftmaxRows;
  t.layer_norm_rows = avx2::LayerNormRows;
  t.rms_norm_rows = avx2::RMSNormRows;
  t.add_row = avx2::AddRow;
  t.attention_rows = avx2::AttentionRows;
  t.scale_errors = avx2::ScaleErrors;
  t.scale_diffs = avx2::ScaleDiffs;
  t.gptq_columns = avx2::GptqColumns;
  t.matmul_tiles = matmul::detail::TilesAvx2;
  return t;
}

KernelTable AvxVnniEntry() {
  KernelTable t = Avx2Entry();
  t.isa = Isa::kAvxVnni;
  t.matmul_tiles = matmul::detail::TilesAvxVnni;
  return t;
}

// AVX-512 without VNNI keeps BlockMatMul's 256-bit AVX2 tiles.
KernelTable Avx512Entry() {
  KernelTable t = Avx2Entry();
  t.isa = Isa::kAvx512;
  t.quantize_rows = QuantizeRowsAvx512;
  t.dequantize_rows = DequantizeRowsAvx512;
  t.quantize_act_rows = QuantizeActRowsAvx512;
  t.quantize_act_columns = QuantizeActColumnsAvx512;
  t.act_dot_row = avx512::ActDotRow;
  t.gelu_row = GeluRowAvx512;
  t.silu_row = avx512::SiluRow;
  t.softmax_rows = SoftmaxRowsAvx512;
  t.layer_norm_rows = LayerNormRowsAvx512;
  t.rms_norm_rows = RMSNormRowsAvx512;
  t.add_row = avx512::AddRow;
  t.attention_rows = AttentionRowsAvx512;
  t.scale_errors = avx512::ScaleErrors;
  t.scale_diffs = avx512::ScaleDiffs;
  t.gptq_columns = avx512::GptqColumns;
  return t;
}

KernelTable Avx512VnniEntry() {
  KernelTable t = Avx512Entry();
  t.isa = Isa::kAvx512Vnni;
  t.act_dot_vnni = true;
  t.matmul_tiles = matmul::detail::TilesAvx512;
  t.matmul_compact_weights = true;
  return t;
}

// BlockMatMul's integer prefill on AMX-INT8 tiles; every other kernel the AVX-512 VNNI one.
KernelTable AmxInt8Entry() {
  KernelTable t = Avx512VnniEntry();
  t.isa = Isa::kAmxInt8;
  t.matmul_tiles = matmul::detail::TilesAmx;
  return t;
}
#endif

struct Tables {
  KernelTable entries[kIsaCount];
  Tables() {
#if BCT_X86_SIMD
    const KernelTable all[kIsaCount] = {BaselineEntry(), Avx2Entry(),       AvxVnniEntry(),
                                        Avx512Entry(),   Avx512VnniEntry(), AmxInt8Entry()};
#else
    const KernelTable baseline = BaselineEntry();  // no other path is built
    const KernelTable all[kIsaCount] = {baseline, baseline, baseline, baseline, baseline, baseline};
#endif
    for (int i = 0; i < kIsaCount; ++i) entries[i] = all[i];
  }
};

}  // namespace

const KernelTable& Kernels(Isa isa) {
  static const Tables tables;
  return tables.entries[static_cast<int>(isa)];
}

}  // namespace cpu
}  // namespace bct
