// The portable kernels (cpu/portable_kernels_impl.h) compiled for x86-64-v3 (AVX2, FMA; no FMA contraction: -ffp-contract=off).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bct/attention_math.h"
#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "cpu/act_quantize.h"
#include "cpu/kernel_table.h"

#if BCT_X86_SIMD
#pragma GCC target("arch=x86-64-v3")
#define BCT_PORTABLE_PATH avx2
#include "cpu/portable_kernels_impl.h"
#undef BCT_PORTABLE_PATH
#endif  // BCT_X86_SIMD
