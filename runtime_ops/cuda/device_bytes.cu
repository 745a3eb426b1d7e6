// DeviceBytes (device_bytes.h): cudaMalloc + cudaMemcpy once, cudaFree on destruction.
#include <cuda_runtime.h>

#include "device_bytes.h"

namespace bct {
namespace cuda {

DeviceBytes::~DeviceBytes() {
  if (data_ != nullptr) cudaFree(data_);
}

const char* DeviceBytes::Upload(const uint8_t* host, size_t bytes) {
  if (data_ != nullptr) {
    cudaFree(data_);
    data_ = nullptr;
  }
  void* device = nullptr;
  cudaError_t status = cudaMalloc(&device, bytes > 0 ? bytes : 1);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  data_ = static_cast<uint8_t*>(device);
  status = cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice);
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace cuda
}  // namespace bct
