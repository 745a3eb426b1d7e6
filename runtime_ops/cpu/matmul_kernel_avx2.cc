// BlockMatMul AVX2 + FMA kernels (compiled for the target here, chosen at run time): the 256-bit
// kernels of matmul_kernel_avx2_impl.h without VNNI.
// Standard headers come before the target pragma, so that no standard-library code is compiled
// (and possibly shared with other files) for the target.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "matmul_kernel.h"
#if BCT_X86_SIMD

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

#define BCT_MATMUL_AVX_VNNI 0
#define BCT_MATMUL_TILES TilesAvx2
#include "matmul_kernel_avx2_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
