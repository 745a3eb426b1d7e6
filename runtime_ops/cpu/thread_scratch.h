// Per-thread scratch buffers of the CPU kernels, so a call allocates nothing once a thread's buffer
// has grown to the sizes it sees (decoder steps run hundreds of small calls; a heap allocation and a
// zero fill per call cost as much as their arithmetic). ONNX Runtime may run Compute of one kernel
// from several threads at once (sessions sharing nothing but the library, or a thread pool's
// workers): each thread has its own buffers, so nothing is shared between calls in flight.
//
// A slot is one buffer per thread. A caller owns the slot from taking the pointer until its last
// use, and must not call anything that takes the same slot meanwhile (the slots below are taken
// only by the loops named, none of which calls another). The contents are unspecified on entry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace bct {
namespace cpu {

enum class ScratchSlot : int {
  kRowGroup = 0,   // the row ops' group of float rows (cpu/nonlinear_row_op.h)
  kAttentionCall,  // BlockAttention's buffers of one call, on the calling thread (cpu/attention.cc)
  kAttentionTask,  // ... and of one task of its parallel loops, on the thread running it
};

// Buffers above this size are given back at the end of the call that needed them (TrimThreadScratch):
// a large encoder call must not pin its buffers for the life of the thread. Below it they are kept.
constexpr std::size_t kKeptScratchBytes = std::size_t{8} << 20;

template <class T, ScratchSlot kSlot>
std::vector<T>& ThreadScratchVector() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// A buffer of at least n elements of T for this thread and slot; valid until the next call with the
// same T and slot on this thread.
template <class T, ScratchSlot kSlot>
T* ThreadScratch(std::size_t n) {
  std::vector<T>& buffer = ThreadScratchVector<T, kSlot>();
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Frees this thread's buffer of the slot when it holds more than kKeptScratchBytes.
template <class T, ScratchSlot kSlot>
void TrimThreadScratch() {
  std::vector<T>& buffer = ThreadScratchVector<T, kSlot>();
  if (buffer.capacity() * sizeof(T) > kKeptScratchBytes) std::vector<T>().swap(buffer);
}

// Several buffers of one call in one slot: their sizes first (Add returns each one's offset), then
// one Carve, then At(base, offset) for each pointer (64-byte aligned offsets).
class ScratchPlan {
 public:
  template <class T>
  std::size_t Add(std::size_t count) {
    const std::size_t at = bytes_;
    bytes_ += (count * sizeof(T) + 63) / 64 * 64;
    return at;
  }
  template <ScratchSlot kSlot>
  uint8_t* Carve() const {
    return ThreadScratch<uint8_t, kSlot>(bytes_ + 64);
  }
  template <ScratchSlot kSlot>
  static void Trim() {
    TrimThreadScratch<uint8_t, kSlot>();
  }
  template <class T>
  static T* At(uint8_t* base, std::size_t offset) {
    const auto aligned = (reinterpret_cast<std::uintptr_t>(base) + 63) / 64 * 64;
    return reinterpret_cast<T*>(aligned + offset);
  }

 private:
  std::size_t bytes_ = 0;
};

}  // namespace cpu
}  // namespace bct
