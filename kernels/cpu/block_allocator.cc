#include "kernels/block_allocator.h"

#include "absl/strings/str_cat.h"

namespace kvmem {

BlockAllocator::BlockAllocator(int32_t blocks)
    : total_(blocks < 0 ? 0 : blocks) {
  const int32_t n = total_;
  MutexLock lock(&mu_);
  taken_.assign(size_t(n), 0);
  free_.reserve(size_t(n));
  for (int32_t b = n - 1; b >= 0; --b) free_.push_back(b);
}

absl::StatusOr<std::vector<int32_t>> BlockAllocator::Take(int32_t count) {
  if (count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("count: ", count, ", want >= 0"));
  }
  MutexLock lock(&mu_);
  if (size_t(count) > free_.size()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device pool: ", count, " blocks wanted, ", free_.size(),
                     " of ", taken_.size(), " free"));
  }
  std::vector<int32_t> blocks;
  blocks.reserve(size_t(count));
  for (int32_t i = 0; i < count; ++i) {
    blocks.push_back(free_.back());
    free_.pop_back();
    taken_[size_t(blocks.back())] = 1;
  }
  return blocks;
}

absl::Status BlockAllocator::Give(absl::Span<const int32_t> blocks) {
  MutexLock lock(&mu_);
  // Check everything first: a bad list frees nothing.
  std::vector<uint8_t> seen;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int32_t b = blocks[i];
    if (b < 0 || size_t(b) >= taken_.size() || !taken_[size_t(b)]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "blocks[", i, "]: ", b, " is not a taken block of this pool"));
    }
    if (seen.empty()) seen.assign(taken_.size(), 0);
    if (seen[size_t(b)]++) {
      return absl::InvalidArgumentError(
          absl::StrCat("blocks[", i, "]: ", b, " is listed twice"));
    }
  }
  for (int32_t b : blocks) {
    taken_[size_t(b)] = 0;
    free_.push_back(b);
  }
  return absl::OkStatus();
}

int32_t BlockAllocator::free_blocks() {
  MutexLock lock(&mu_);
  return int32_t(free_.size());
}

}  // namespace kvmem
