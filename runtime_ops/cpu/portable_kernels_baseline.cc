// The portable kernels (cpu/portable_kernels_impl.h) compiled for baseline x86-64 (SSE2) or any other CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bct/attention_math.h"
#include "bct/block_math.h"
#include "bct/nonlinear_math.h"
#include "cpu/act_quantize.h"
#include "cpu/kernel_table.h"

#define BCT_PORTABLE_PATH baseline
#include "cpu/portable_kernels_impl.h"
#undef BCT_PORTABLE_PATH
