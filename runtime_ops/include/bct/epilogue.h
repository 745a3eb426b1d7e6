// BlockMatMul's epilogues (docs/ops.md, attribute `epilogue`): the elementwise step applied to the
// float32 product P [rows, N] (bias included) before Y is stored or requantized, so a MatMul -> GELU
// or gate/up -> SiLU * up chain needs no float round trip between ops. Host/device code: the CPU
// kernel (cpu/matmul_op.cc) runs the same formulas through its row kernels, the CUDA kernel
// (cuda/matmul.cu) one thread per output element through EpilogueOne, and the host-thread test
// (tests/cuda_threads_on_host.cc) runs EpilogueOne against the numpy spec
// (bct_onnx.reference_fused.matmul_epilogue).
#pragma once

#include <cstdint>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"

namespace bct {

enum class Epilogue : int {
  kNone = 0,
  kGelu = 1,      // gelu_erf(p)
  kGeluTanh = 2,  // gelu_tanh(p)
  kSiluGate = 3,  // silu(p[:, j]) * p[:, N/2 + j]: gate rows then up rows of one weight, N/2 outputs
};

// Output columns of an epilogue over N product columns.
BCT_HD BCT_INLINE int64_t epilogue_width(Epilogue e, int64_t n) { return e == Epilogue::kSiluGate ? n / 2 : n; }

// Output element t of [rows, epilogue_width(e, n)] from the product p [rows, n].
BCT_HD BCT_INLINE float EpilogueOne(Epilogue e, const float* p, int64_t n, int64_t t) {
  const int64_t width = epilogue_width(e, n);
  const int64_t row = t / width;
  const int64_t j = t - row * width;
  const float* r = p + row * n;
  switch (e) {
    case Epilogue::kGelu:
      return nl::gelu_erf(r[j]);
    case Epilogue::kGeluTanh:
      return nl::gelu_tanh(r[j]);
    case Epilogue::kSiluGate:
      return fmul(nl::silu(r[j]), r[width + j]);
    default:
      return r[j];
  }
}

}  // namespace bct
