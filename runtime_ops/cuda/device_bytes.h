// Device memory holding bytes copied from the host once, at kernel creation (entropy-coded weight
// codes decoded on the host, ops/coded_codes.h), freed with the kernel. Plain C++ for the host side;
// device_bytes.cu holds the CUDA runtime calls.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bct {
namespace cuda {

class DeviceBytes {
 public:
  DeviceBytes() = default;
  ~DeviceBytes();
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;

  // Copies `bytes` host bytes to new device memory (synchronously); nullptr or the CUDA error.
  const char* Upload(const uint8_t* host, size_t bytes);
  const uint8_t* data() const { return data_; }

 private:
  uint8_t* data_ = nullptr;
};

}  // namespace cuda
}  // namespace bct
