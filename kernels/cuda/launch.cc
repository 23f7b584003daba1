#include "kernels/cuda/launch.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "kernels/cuda/cuda_status.h"

namespace kvmem::cuda {

absl::Status AllowDynamicSharedMemory(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return absl::OkStatus();
  static std::mutex mu;
  static std::map<const void*, size_t> raised;
  std::lock_guard<std::mutex> lock(mu);
  size_t& limit = raised[kernel];
  if (limit < bytes) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    limit = bytes;
  }
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
