// See weight_memory.h.
#include "cpu/weight_memory.h"

#include <algorithm>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Under AddressSanitizer every weight keeps an allocation of its own, so that its bounds are checked.
#if defined(__SANITIZE_ADDRESS__)
#define BCT_POOLED_WEIGHTS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BCT_POOLED_WEIGHTS 0
#endif
#endif
#ifndef BCT_POOLED_WEIGHTS
#define BCT_POOLED_WEIGHTS 1
#endif

namespace bct {
namespace cpu {
namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;
// Smaller weights are carved from shared chunks of this size (a whole number of huge pages).
constexpr std::size_t kChunkBytes = 8 * kHugePage;
constexpr std::size_t kPieceAlignment = 64;

void* AllocateHugePages(std::size_t bytes) {
  void* p = ::operator new(bytes, std::align_val_t(kHugePage));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: without transparent huge pages (or when refused) the memory works as it is.
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

void FreeHugePages(void* p, std::size_t bytes) noexcept { ::operator delete(p, bytes, std::align_val_t(kHugePage)); }

// The shared chunks: pieces are handed out in order from the newest chunk; a chunk is given back
// when its last piece is freed (the newest one is kept and reused from its start instead).
class ChunkPool {
 public:
  void* Allocate(std::size_t bytes) {
    const std::size_t size = (std::max<std::size_t>(bytes, 1) + kPieceAlignment - 1) / kPieceAlignment * kPieceAlignment;
    std::lock_guard<std::mutex> lock(mutex_);
    if (chunks_.empty() || chunks_.back().used + size > kChunkBytes) {
      chunks_.push_back(Chunk{static_cast<unsigned char*>(AllocateHugePages(kChunkBytes)), 0, 0});
    }
    Chunk& chunk = chunks_.back();
    void* p = chunk.base + chunk.used;
    chunk.used += size;
    ++chunk.live;
    return p;
  }

  void Free(void* p) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto* at = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < chunks_.size(); ++i) {
      Chunk& chunk = chunks_[i];
      if (at < chunk.base || at >= chunk.base + kChunkBytes) continue;
      if (--chunk.live > 0) return;
      if (i + 1 == chunks_.size()) {
        chunk.used = 0;  // the newest chunk: reused from its start
      } else {
        FreeHugePages(chunk.base, kChunkBytes);
        chunks_.erase(chunks_.begin() + static_cast<std::ptrdiff_t>(i));
      }
      return;
    }
  }

 private:
  struct Chunk {
    unsigned char* base;
    std::size_t used;  // bytes handed out from the start
    std::size_t live;  // pieces not freed yet
  };
  std::mutex mutex_;
  std::vector<Chunk> chunks_;
};

// Never destroyed: kernels may free their weights during static destruction at exit.
ChunkPool& Pool() {
  static ChunkPool* pool = new ChunkPool;
  return *pool;
}

}  // namespace

void* AllocateWeightBytes(std::size_t bytes) {
  if (bytes >= kHugePage) return AllocateHugePages(bytes);
  if (!BCT_POOLED_WEIGHTS) return ::operator new(bytes, std::align_val_t(kPieceAlignment));
  return Pool().Allocate(bytes);
}

void FreeWeightBytes(void* p, std::size_t bytes) noexcept {
  if (p == nullptr) return;
  if (bytes >= kHugePage) {
    FreeHugePages(p, bytes);
  } else if (!BCT_POOLED_WEIGHTS) {
    ::operator delete(p, bytes, std::align_val_t(kPieceAlignment));
  } else {
    Pool().Free(p);
  }
}

}  // namespace cpu
}  // namespace bct
