// BlockMatMul AVX-VNNI kernels (256-bit vpdpbusd, e.g. Intel Alder Lake and later without AVX-512):
// the kernels of matmul_kernel_avx2_impl.h compiled with VNNI.
// Standard headers come before the target pragma, so that no standard-library code is compiled
// (and possibly shared with other files) for the target.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "matmul_kernel.h"
#if BCT_X86_SIMD

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,avxvnni")
#endif

#define BCT_MATMUL_AVX_VNNI 1
#include "matmul_kernel_avx2_impl.h"

namespace bct {
namespace matmul {
namespace detail {

void TilesAvxVnni(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin,
                  int64_t row_end, int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  Tiles256(p, act, a_padded, row_begin, row_end, tile_begin, tile_end, bias, Y);
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
