// Grid sizes of the one-thread-per-item CUDA kernels (grid-stride loops cover any count).
#pragma once

#include <cstdint>

namespace bct {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for n items of one thread each, at least 1, at most 65535 * 16 (the loops stride over the rest).
inline unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace cuda
}  // namespace bct
