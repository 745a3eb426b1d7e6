// BlockActMatMul's block dot products with AVX-512 VNNI (vpdpbusd), bit-identical to nl::act_dot
// (used where Kernels(isa).act_dot_vnni says so, cpu/kernel_table.h):
// the integer block sums are exact either way, and the float32 part (y += float(dot) * (sa * sb) in
// block order from 0) runs the same IEEE operations, 16 columns at a time.
//
// vpdpbusd multiplies unsigned by signed bytes, so A's signed codes q are fed as q + 128 and
// 128 * sum(B codes of the block) is subtracted afterwards (exact in int32).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace bct {
namespace nonlinear {
namespace vnni {

// std::allocator on 64-byte boundaries: a strip of 16 columns of PackedB (64 bytes of codes, of sums or
// of scales) from a column that is a multiple of 16 is then one cache line, not parts of two.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept {
    return false;
  }
};
template <class T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

// B's quantized codes of one batch in the VNNI layout: per block, ceil(block/4) groups of 4 k values;
// per group, n_pad columns of 4 bytes (k = 4g .. 4g+3 of the block, zero-padded), n_pad = ceil(N/16)*16.
struct PackedB {
  int64_t n = 0, n_pad = 0, k = 0, block_size = 0, nb = 0, groups = 0;  // groups per full block
  CacheLineVector<int8_t> codes;    // [batches][nb][groups][n_pad][4]
  CacheLineVector<int32_t> sums;    // [batches][nb][n_pad]: sum of the block's codes of each column
  CacheLineVector<float> scales;    // [batches][nb][n_pad]
};

// Sizes packed for `batches` batches of n columns; all of it zero, or with only_padding only the columns
// n..n_pad (for a caller that then stores every column < n, whole groups of 4 in every block: k a
// multiple of block_size, block_size of 4; the rest keeps what a former call left there).
void InitPackedB(PackedB& packed, int64_t batches, int64_t n, int64_t k, int64_t block_size, bool only_padding = false);

// Stores the signed codes q [k] and scales [nb] of column `col` of batch `batch`.
void PackColumn(PackedB& packed, int64_t batch, int64_t col, const int8_t* q, const float* scales);

// Stores `count` columns from col0 on of batch `batch` at once: signed codes q [count, k] (one row per
// column; rows row_step rows of k codes apart) and scales [count, nb] (rows row_step rows of nb apart);
// the same bytes as PackColumn column by column.
void PackRows(PackedB& packed, int64_t batch, int64_t col0, int64_t count, const int8_t* q, const float* scales,
              int64_t row_step = 1);

// PackRows from unsigned 8-bit codes u [count, k] (row stride k), whose signed codes are q = u - 128
// (BlockAttention's 8-bit symmetric KV cache as stored); the same bytes as PackRows of q. With copy, the
// rows u are also stored there as they are ([count, k], not overlapping codes): a decoder step's one
// read of a past K row both copies it to the present cache and packs it. Whole 64-byte lines of the copy
// are stored non-temporally (the present cache is not read again by the step: measured faster, also in a
// generation loop that reads it back as the next step's past).
void PackCodeRows(PackedB& packed, int64_t batch, int64_t col0, int64_t count, const uint8_t* codes,
                  const float* scales, uint8_t* copy = nullptr);

// Stores block `blk` of batch `batch` for all columns at once: signed codes q [len][n] (k-major)
// and scales [n].
void PackBlock(PackedB& packed, int64_t batch, int64_t blk, const int8_t* q, const float* scales);

// One output row y [n] of batch `batch`: A's signed codes qa [k], scales sa [nb]. scratch needs
// nb * groups * 4 bytes.
void DotRow(const PackedB& packed, int64_t batch, const int8_t* qa, const float* sa, uint8_t* scratch, float* y);

// `rows` output rows (A rows qa [rows, k], sa [rows, nb], row_step rows apart; y rows y_stride apart),
// four at a time so that each load of B feeds four dot-product chains. scratch needs 4 * nb * groups * 4
// bytes.
void DotRows(const PackedB& packed, int64_t batch, const int8_t* qa, const float* sa, int64_t rows, uint8_t* scratch,
             float* y, int64_t y_stride, int64_t row_step = 1);

}  // namespace vnni
}  // namespace nonlinear
}  // namespace bct
