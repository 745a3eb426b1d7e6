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
#include <vector>

namespace bct {
namespace cpu {

enum class ScratchSlot : int {
  kRowGroup = 0,  // the row ops' group of float rows (cpu/nonlinear_row_op.h)
  kAttentionStep, // BlockAttention's decoder step buffers (cpu/attention.cc)
};

// A buffer of at least n elements of T for this thread and slot; valid until the next call with the
// same T and slot on this thread.
template <class T, ScratchSlot kSlot>
T* ThreadScratch(std::size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace cpu
}  // namespace bct
