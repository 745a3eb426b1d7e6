// See weight_memory.h.
#include "cpu/weight_memory.h"

#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bct {
namespace cpu {
namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

// From one huge page on, the start is huge-page aligned (a tail under 2 MiB keeps 4 KiB pages).
std::size_t Alignment(std::size_t bytes) { return bytes >= kHugePage ? kHugePage : 64; }

}  // namespace

void* AllocateWeightBytes(std::size_t bytes) {
  void* p = ::operator new(bytes, std::align_val_t(Alignment(bytes)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: without transparent huge pages (or when refused) the memory works as it is.
  if (bytes >= kHugePage) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

void FreeWeightBytes(void* p, std::size_t bytes) noexcept {
  ::operator delete(p, bytes, std::align_val_t(Alignment(bytes)));
}

}  // namespace cpu
}  // namespace bct
