// One entry per instruction-set path (cpu/isa.h): the functions its kernels run.
#include "cpu/kernel_table.h"

namespace bct {
namespace cpu {
namespace {

using matmul::detail::TilesAvx2;
using matmul::detail::TilesAvx512;
using matmul::detail::TilesAvxVnni;

// field order: isa, quantize_rows, dequantize_rows, quantize_act_rows, quantize_act_columns,
// act_dot_row, act_dot_vnni, gelu_row, silu_row, softmax_rows, layer_norm_row, rms_norm_row,
// matmul_tiles, matmul_compact_weights
constexpr KernelTable kBaselineTable = {
    Isa::kBaseline,        QuantizeRowsBaseline,         DequantizeRowsBaseline, baseline::QuantizeActRows,
    baseline::QuantizeActColumns, baseline::ActDotRow,   false,                  baseline::GeluRow,
    baseline::SiluRow,     baseline::SoftmaxRows,        baseline::LayerNormRow, baseline::RMSNormRow,
    nullptr,               false};

#if BCT_X86_SIMD
constexpr KernelTable kAvx2Table = {
    Isa::kAvx2,        QuantizeRowsBaseline,     DequantizeRowsAvx2, avx2::QuantizeActRows,
    avx2::QuantizeActColumns, avx2::ActDotRow,   false,              avx2::GeluRow,
    avx2::SiluRow,     avx2::SoftmaxRows,        avx2::LayerNormRow, avx2::RMSNormRow,
    TilesAvx2,         false};

constexpr KernelTable kAvxVnniTable = {
    Isa::kAvxVnni,     QuantizeRowsBaseline,     DequantizeRowsAvx2, avx2::QuantizeActRows,
    avx2::QuantizeActColumns, avx2::ActDotRow,   false,              avx2::GeluRow,
    avx2::SiluRow,     avx2::SoftmaxRows,        avx2::LayerNormRow, avx2::RMSNormRow,
    TilesAvxVnni,      false};

// AVX-512 without VNNI: BlockMatMul's 256-bit AVX2 tiles.
constexpr KernelTable kAvx512Table = {
    Isa::kAvx512,      QuantizeRowsAvx512,        DequantizeRowsAvx512, QuantizeActRowsAvx512,
    QuantizeActColumnsAvx512, avx512::ActDotRow,  false,                GeluRowAvx512,
    avx512::SiluRow,   SoftmaxRowsAvx512,         avx512::LayerNormRow, avx512::RMSNormRow,
    TilesAvx2,         false};

constexpr KernelTable kAvx512VnniTable = {
    Isa::kAvx512Vnni,  QuantizeRowsAvx512,        DequantizeRowsAvx512, QuantizeActRowsAvx512,
    QuantizeActColumnsAvx512, avx512::ActDotRow,  true,                 GeluRowAvx512,
    avx512::SiluRow,   SoftmaxRowsAvx512,         avx512::LayerNormRow, avx512::RMSNormRow,
    TilesAvx512,       true};

// No kernel has an AMX-INT8 version yet: the AVX-512 VNNI functions.
constexpr KernelTable kAmxInt8Table = {
    Isa::kAmxInt8,     QuantizeRowsAvx512,        DequantizeRowsAvx512, QuantizeActRowsAvx512,
    QuantizeActColumnsAvx512, avx512::ActDotRow,  true,                 GeluRowAvx512,
    avx512::SiluRow,   SoftmaxRowsAvx512,         avx512::LayerNormRow, avx512::RMSNormRow,
    TilesAvx512,       true};

constexpr const KernelTable* kTables[kIsaCount] = {&kBaselineTable, &kAvx2Table,       &kAvxVnniTable,
                                                   &kAvx512Table,   &kAvx512VnniTable, &kAmxInt8Table};
#else
constexpr const KernelTable* kTables[kIsaCount] = {&kBaselineTable, &kBaselineTable, &kBaselineTable,
                                                   &kBaselineTable, &kBaselineTable, &kBaselineTable};
#endif

}  // namespace

const KernelTable& Kernels(Isa isa) { return *kTables[static_cast<int>(isa)]; }

}  // namespace cpu
}  // namespace bct
