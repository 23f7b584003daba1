// The device memory pool (DESIGN.md § Memory): one allocation made at
// start, cut into fixed blocks that streams take as they grow and give back
// when they shrink or hibernate. Thread-safe. No CUDA types in this header.
#ifndef KVMEM_KERNELS_CUDA_DEVICE_POOL_H_
#define KVMEM_KERNELS_CUDA_DEVICE_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/block_allocator.h"
#include "kernels/cuda/device_memory.h"

namespace kvmem::cuda {

struct DevicePoolOptions {
  // Bytes per block, a multiple of 256 (alignment for any row type).
  // Default 1 MiB: 16 tokens × 8 KV heads × 128 × bf16, keys and values,
  // is 64 KiB, so a block holds 16 such pages. Range 256 B..1 GiB.
  size_t block_bytes = size_t{1} << 20;
  // The pool's size, all planes; 0 means `free_fraction` of the device's free
  // memory when the pool is made (`--device_memory`).
  size_t pool_bytes = 0;
  // Used when pool_bytes is 0: (0, 1]. Default 0.8, leaving room for the
  // CUDA context, kernels' workspaces and other processes.
  double free_fraction = 0.8;
  // Each block is `planes` equal parts, at the same offset of `planes`
  // equal regions of the pool: one block number then addresses, say, a key
  // row and a value row (planes = 2) at one row index. 1..8.
  int planes = 1;

  // INVALID_ARGUMENT naming the field.
  absl::Status Validate() const;
};

class DevicePool {
 public:
  // Allocates the pool on the current device. INVALID_ARGUMENT: bad
  // options; RESOURCE_EXHAUSTED: the device cannot hold it (the message
  // gives the size asked for and what was free); UNAVAILABLE: no device.
  static absl::StatusOr<std::unique_ptr<DevicePool>> Create(
      const DevicePoolOptions& options);

  // As BlockAllocator::Take and Give.
  absl::StatusOr<std::vector<int32_t>> Take(int32_t count) {
    return blocks_.Take(count);
  }
  absl::Status Give(absl::Span<const int32_t> blocks) {
    return blocks_.Give(blocks);
  }

  // Device address of plane `plane` of block `block` (which the caller
  // has taken); block_bytes() bytes.
  void* block(int32_t block, int plane = 0) const {
    return static_cast<char*>(plane_base(plane)) + size_t(block) * block_bytes_;
  }
  // Where plane `plane` starts: block b's part is at b · block_bytes().
  void* plane_base(int plane) const {
    return static_cast<char*>(memory_.get()) +
           size_t(plane) * size_t(blocks_.total_blocks()) * block_bytes_;
  }
  int planes() const { return planes_; }
  size_t block_bytes() const { return block_bytes_; }
  int32_t total_blocks() const { return blocks_.total_blocks(); }
  int32_t free_blocks() { return blocks_.free_blocks(); }

 private:
  DevicePool(DeviceBuffer memory, size_t block_bytes, int32_t blocks,
             int planes)
      : memory_(std::move(memory)),
        block_bytes_(block_bytes),
        planes_(planes),
        blocks_(blocks) {}

  DeviceBuffer memory_;
  const size_t block_bytes_;
  const int planes_;
  BlockAllocator blocks_;
};

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DEVICE_POOL_H_
