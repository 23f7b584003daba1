// Fixed-size blocks of one memory pool, handed out by index: the bookkeeping
// of the device pool (kernels/cuda/device_pool.h), kept free of CUDA so
// that it is tested everywhere. Thread-safe.
#ifndef KVMEM_KERNELS_BLOCK_ALLOCATOR_H_
#define KVMEM_KERNELS_BLOCK_ALLOCATOR_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "base/mutex.h"

namespace kvmem {

class BlockAllocator {
 public:
  // A pool of `blocks` blocks (≥ 0), all free.
  explicit BlockAllocator(int32_t blocks);

  // `count` free blocks (lowest indices first), now taken. RESOURCE_EXHAUSTED
  // naming the pool's size and what is free when fewer are free; then
  // nothing is taken. INVALID_ARGUMENT for count < 0.
  absl::StatusOr<std::vector<int32_t>> Take(int32_t count);

  // Frees `blocks`. INVALID_ARGUMENT naming the first block that is out of
  // range, not taken, or listed twice; then nothing is freed.
  absl::Status Give(absl::Span<const int32_t> blocks);

  int32_t total_blocks() const { return total_; }
  int32_t free_blocks();

 private:
  const int32_t total_;
  Mutex mu_;
  std::vector<uint8_t> taken_ ABSL_GUARDED_BY(mu_);  // [blocks]
  std::vector<int32_t> free_
      ABSL_GUARDED_BY(mu_);  // descending: back is lowest
};

}  // namespace kvmem

#endif  // KVMEM_KERNELS_BLOCK_ALLOCATOR_H_
