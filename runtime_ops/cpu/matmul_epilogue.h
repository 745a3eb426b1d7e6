// BlockMatMul's epilogue on CPU (bct/epilogue.h, docs/ops.md): GELU or SiLU gating applied to rows
// of the float32 product the matmul kernel returns, through the row functions of the kernel table
// (the same float32 operations as the spec on every path), before Y is stored or requantized.
#pragma once

#include <cstdint>

#include "bct/epilogue.h"
#include "cpu/kernel_table.h"

namespace bct {
namespace cpu {

// out [count, epilogue_width(e, n)] from the product rows p [count, n]. out may be p itself when the
// width is n (GELU in place); with kSiluGate out must not overlap p.
void ApplyEpilogueRows(const KernelTable& kernels, Epilogue e, const float* p, int64_t count, int64_t n, float* out);

}  // namespace cpu
}  // namespace bct
