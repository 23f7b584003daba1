#include "kernels/cuda/device_pool.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"

namespace kvmem::cuda {

absl::Status DevicePoolOptions::Validate() const {
  if (block_bytes < 256 || block_bytes > (size_t{1} << 30) ||
      block_bytes % 256 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block_bytes must be a multiple of 256 in [256, 1 GiB], got ",
        block_bytes));
  }
  if (pool_bytes == 0 && !(free_fraction > 0 && free_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("free_fraction must be in (0, 1], got ", free_fraction));
  }
  if (planes < 1 || planes > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("planes must be in [1, 8], got ", planes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DevicePool>> DevicePool::Create(
    const DevicePoolOptions& options) {
  if (absl::Status st = options.Validate(); !st.ok()) return st;
  size_t free_bytes = 0, total_bytes = 0;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  size_t bytes = options.pool_bytes;
  if (bytes == 0) bytes = size_t(double(free_bytes) * options.free_fraction);
  const size_t blocks = bytes / (options.block_bytes * options.planes);
  if (blocks == 0 || blocks > size_t{INT32_MAX}) {
    return absl::InvalidArgumentError(
        absl::StrCat("device pool of ", bytes, " bytes holds ", blocks,
                     " blocks of ", options.block_bytes, " bytes × ",
                     options.planes, " planes, want 1 to 2^31-1"));
  }
  const size_t total = blocks * options.block_bytes * options.planes;
  absl::StatusOr<DeviceBuffer> memory = DeviceBuffer::Allocate(total);
  if (!memory.ok()) {
    return absl::Status(memory.status().code(),
                        absl::StrCat("device pool of ", total, " bytes (",
                                     free_bytes, " free of ", total_bytes,
                                     "): ", memory.status().message()));
  }
  return std::unique_ptr<DevicePool>(
      new DevicePool(std::move(*memory), options.block_bytes, int32_t(blocks),
                     options.planes));
}

}  // namespace kvmem::cuda
