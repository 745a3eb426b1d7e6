// Memory for weights repacked at kernel creation and streamed on every call (the decode GEMV reads
// each byte once per token): allocations of 2 MiB or more are 2 MiB aligned and advised as
// transparent huge pages (Linux), so that streaming them takes no TLB miss per 4 KiB page and the
// hardware prefetchers are not stopped at every 4 KiB boundary; smaller ones (most of a small model's
// weights: SmolLM2-135M's 576 x 576 is 0.17 MB) are 64-byte aligned pieces of shared 16 MiB chunks
// advised the same way, each chunk given back when its last piece is freed (not under
// AddressSanitizer, which checks a weight's bounds only in an allocation of its own).
#pragma once

#include <cstddef>
#include <vector>

namespace bct {
namespace cpu {

void* AllocateWeightBytes(std::size_t bytes);
void FreeWeightBytes(void* p, std::size_t bytes) noexcept;

template <class T>
struct WeightAllocator {
  using value_type = T;
  WeightAllocator() = default;
  template <class U>
  WeightAllocator(const WeightAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor): allocator rebind
  T* allocate(std::size_t n) { return static_cast<T*>(AllocateWeightBytes(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) noexcept { FreeWeightBytes(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const WeightAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const WeightAllocator<U>&) const noexcept { return false; }
};

template <class T>
using WeightVector = std::vector<T, WeightAllocator<T>>;

}  // namespace cpu
}  // namespace bct
