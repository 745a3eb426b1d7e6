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
#define BCT_MATMUL_TILES TilesAvxVnni
#include "matmul_kernel_avx2_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
