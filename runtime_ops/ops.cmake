# Per-file flags of the op families other than the core (included by CMakeLists.txt once the
# bct_onnx_ops target exists). One section per family.

# Nonlinear ops (cpu/gelu.cc, silu.cc, softmax.cc, norm.cc, act_matmul.cc): GCC if-converts the float
# selects of bct/nonlinear_math.h (clamps, NaN checks) and so vectorises the row loops only without
# FP-exception semantics. -fno-trapping-math changes no value (rounding and contraction are as for
# every other file: -ffp-contract=off, no fast-math), so the kernels stay bit-exact with the spec.
set_source_files_properties(cpu/gelu.cc cpu/silu.cc cpu/softmax.cc cpu/norm.cc cpu/act_matmul.cc
                            PROPERTIES COMPILE_OPTIONS -fno-trapping-math)
