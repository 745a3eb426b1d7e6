// BlockMatMul's epilogue rows on CPU (cpu/matmul_epilogue.h).
#include "cpu/matmul_epilogue.h"

#include <cstring>

namespace bct {
namespace cpu {

void ApplyEpilogueRows(const KernelTable& kernels, Epilogue e, const float* p, int64_t count, int64_t n, float* out) {
  const int64_t width = epilogue_width(e, n);
  for (int64_t i = 0; i < count; ++i) {
    const float* row = p + i * n;
    float* y = out + i * width;
    if (y != row) std::memcpy(y, row, static_cast<size_t>(width) * sizeof(float));
    switch (e) {
      case Epilogue::kGelu:
        kernels.gelu_row(y, width, nl::GeluForm::kErf);
        break;
      case Epilogue::kGeluTanh:
        kernels.gelu_row(y, width, nl::GeluForm::kTanh);
        break;
      case Epilogue::kSiluGate: {
        kernels.silu_row(y, width);  // y holds the gate half
        const float* up = row + width;
        for (int64_t j = 0; j < width; ++j) y[j] = y[j] * up[j];  // one rounding, as fmul
        break;
      }
      case Epilogue::kNone:
        break;
    }
  }
}

}  // namespace cpu
}  // namespace bct
