// The portable kernels (cpu/portable_kernels_impl.h) compiled for x86-64-v4 (AVX-512 F/BW/VL/DQ).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bct/attention_math.h"
#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "cpu/act_quantize.h"
#include "cpu/kernel_table.h"

#if BCT_X86_SIMD
#pragma GCC target("arch=x86-64-v4")
#define BCT_PORTABLE_PATH avx512
#include "cpu/portable_kernels_impl.h"
#undef BCT_PORTABLE_PATH
#endif  // BCT_X86_SIMD
