// Decoder of entropy-coded weight codes (canonical Huffman in byte-aligned chunks), run once at
// kernel creation. The stream layout is bct_onnx/code_entropy.py's (the specification; prose in
// docs/block_format.md); the result is the packed layout [rows, row_bytes] the kernels read.
// Host only: CUDA kernels decode on the host at creation, then upload.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bct/block_math.h"

namespace bct {
namespace code_entropy {

constexpr int kMaxCodeLength = 12;
constexpr size_t kHeaderBytes = 32;
constexpr const char* kCoding = "huffman";  // the ops' codes_coding attribute value

inline uint64_t ReadLe(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Rows a stream holds (0 when it is too short to say; DecodeToPacked then names the problem).
inline int64_t StreamRows(const uint8_t* stream, size_t size) {
  if (size < kHeaderBytes) return 0;
  const uint64_t rows = ReadLe(stream + 8, 8);
  return rows < (uint64_t{1} << 40) ? static_cast<int64_t>(rows) : 0;
}

// Decodes `stream` (size bytes) of `bits`-bit codes in rows of `row_length`, expecting `rows` rows,
// into packed [rows, row_bytes(row_length, bits)]. Returns an empty string on success, else what is
// wrong with the stream (the caller names the node and input).
inline std::string DecodeToPacked(const uint8_t* stream, size_t size, int bits, int64_t rows, int64_t row_length,
                                  std::vector<uint8_t>* packed) {
  if (size < kHeaderBytes || std::memcmp(stream, "BCTH", 4) != 0) return "not an entropy-coded code stream (no BCTH header)";
  if (stream[4] != 1) return "stream version " + std::to_string(stream[4]) + " is not supported (only 1)";
  const int stream_bits = stream[5], max_length = stream[6];
  if (stream_bits != bits) {
    return "stream holds " + std::to_string(stream_bits) + "-bit codes, attribute 'bits' is " + std::to_string(bits);
  }
  if (max_length < 1 || max_length > kMaxCodeLength || stream[7] != 0) {
    return "bad stream header: max_length " + std::to_string(max_length);
  }
  const uint64_t stream_rows = ReadLe(stream + 8, 8), stream_row_length = ReadLe(stream + 16, 8);
  if (stream_rows != static_cast<uint64_t>(rows) || stream_row_length != static_cast<uint64_t>(row_length)) {
    return "stream holds " + std::to_string(stream_rows) + " rows of " + std::to_string(stream_row_length) +
           " codes, the op expects " + std::to_string(rows) + " rows of " + std::to_string(row_length);
  }
  const uint64_t chunk_symbols = ReadLe(stream + 24, 4), chunk_count = ReadLe(stream + 28, 4);
  const uint64_t total = static_cast<uint64_t>(rows) * static_cast<uint64_t>(row_length);
  if (chunk_symbols == 0 || chunk_count != (total + chunk_symbols - 1) / chunk_symbols) {
    return "bad stream header: chunk_symbols " + std::to_string(chunk_symbols) + ", chunk_count " +
           std::to_string(chunk_count) + " for " + std::to_string(total) + " codes";
  }
  const size_t symbols = size_t{1} << bits;
  const size_t lengths_at = kHeaderBytes, offsets_at = lengths_at + symbols;
  const size_t payload_at = offsets_at + 4 * (static_cast<size_t>(chunk_count) + 1);
  if (size < payload_at) return "stream of " + std::to_string(size) + " bytes is shorter than its header";
  if (total > 8 * static_cast<uint64_t>(size - payload_at)) {  // every code takes at least one bit
    return "stream claims " + std::to_string(total) + " codes but holds only " + std::to_string(size - payload_at) +
           " payload bytes";
  }
  const uint8_t* lengths = stream + lengths_at;
  // Canonical codes (DEFLATE's rule), then a table over the next max_length bits read LSB first.
  int count[kMaxCodeLength + 1] = {0};
  int longest = 0;
  for (size_t s = 0; s < symbols; ++s) {
    if (lengths[s] > max_length) return "a code length exceeds max_length";
    ++count[lengths[s]];
    if (lengths[s] > longest) longest = lengths[s];
  }
  if (longest != max_length) return "code lengths miss max_length";
  count[0] = 0;
  int64_t kraft = 0;
  for (int n = 1; n <= max_length; ++n) kraft += static_cast<int64_t>(count[n]) << (max_length - n);
  const int used = static_cast<int>(symbols) - [&] { int z = 0; for (size_t s = 0; s < symbols; ++s) z += lengths[s] == 0; return z; }();
  if (kraft > (int64_t{1} << max_length) || (kraft < (int64_t{1} << max_length) && used > 1)) {
    return "code lengths do not form a complete prefix code";
  }
  int next[kMaxCodeLength + 2] = {0};
  for (int n = 1, code = 0; n <= max_length; ++n) {
    code = (code + count[n - 1]) << 1;
    next[n] = code;
  }
  std::vector<uint16_t> table(size_t{1} << max_length, 0);  // symbol << 4 | length; length 0: invalid
  for (size_t s = 0; s < symbols; ++s) {
    const int n = lengths[s];
    if (n == 0) continue;
    const int code = next[n]++;
    int reversed = 0;
    for (int j = 0; j < n; ++j) reversed |= ((code >> j) & 1) << (n - 1 - j);
    for (int fill = reversed; fill < (1 << max_length); fill += 1 << n) {
      table[static_cast<size_t>(fill)] = static_cast<uint16_t>((s << 4) | static_cast<size_t>(n));
    }
  }
  std::vector<uint64_t> offsets(static_cast<size_t>(chunk_count) + 1);
  for (size_t c = 0; c <= chunk_count; ++c) offsets[c] = ReadLe(stream + offsets_at + 4 * c, 4);
  if (offsets[0] != 0 || payload_at + offsets[chunk_count] != size) {
    return "chunk offsets are not increasing from 0 to the payload size";
  }
  for (size_t c = 0; c < chunk_count; ++c) {
    if (offsets[c + 1] < offsets[c]) return "chunk offsets are not increasing from 0 to the payload size";
  }
  const int64_t rb = row_bytes(row_length, bits);
  packed->assign(static_cast<size_t>(rows * rb), 0);
  const uint8_t* payload = stream + payload_at;
  const uint32_t mask = (1u << max_length) - 1;
  uint64_t symbol = 0;
  int64_t row = 0, col = 0;
  for (size_t c = 0; c < chunk_count; ++c) {
    const uint8_t* bytes = payload + offsets[c];
    const uint64_t chunk_bits = 8 * (offsets[c + 1] - offsets[c]);
    const uint64_t end = symbol + chunk_symbols < total ? symbol + chunk_symbols : total;
    uint64_t position = 0;
    uint64_t buffer = 0;  // bits [position, position + filled) of the chunk, LSB first
    int filled = 0;
    size_t next_byte = 0;
    const size_t chunk_bytes = static_cast<size_t>(offsets[c + 1] - offsets[c]);
    for (; symbol < end; ++symbol) {
      while (filled <= 56 && next_byte < chunk_bytes) {
        buffer |= static_cast<uint64_t>(bytes[next_byte++]) << filled;
        filled += 8;
      }
      const uint16_t entry = table[buffer & mask];
      const int n = entry & 15;
      if (n == 0) return "invalid code in chunk " + std::to_string(c);
      position += static_cast<uint64_t>(n);
      if (position > chunk_bits) return "chunk " + std::to_string(c) + " overruns its bytes";
      buffer >>= n;
      filled -= n;
      const uint32_t value = entry >> 4;
      const int64_t bit = col * bits;
      uint8_t* out = packed->data() + row * rb + (bit >> 3);
      const uint32_t shifted = value << (bit & 7);
      out[0] |= static_cast<uint8_t>(shifted);
      if (shifted >> 8) out[1] |= static_cast<uint8_t>(shifted >> 8);
      if (++col == row_length) col = 0, ++row;
    }
  }
  return std::string();
}

}  // namespace code_entropy
}  // namespace bct
