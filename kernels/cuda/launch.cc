#include "kernels/cuda/launch.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

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

absl::Status LaunchAfterPrior(const void* kernel, dim3 grid, dim3 block,
                              size_t shared_bytes, cudaStream_t stream,
                              void** args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernelExC(&config, kernel, args));
  return absl::OkStatus();
}

absl::StatusOr<int> ResidentBlocks(const void* kernel, int threads,
                                   size_t bytes) {
  int device = 0;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> known;
  std::lock_guard<std::mutex> lock(mu);
  int& blocks = known[{kernel, threads, bytes, device}];
  if (blocks == 0) {
    int per_sm = 0;
    int sms = 0;
    KVMEM_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kernel, threads, bytes));
    KVMEM_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks = per_sm * sms > 0 ? per_sm * sms : 1;
  }
  return blocks;
}

}  // namespace kvmem::cuda
