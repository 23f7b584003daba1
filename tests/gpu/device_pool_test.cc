// The device pool on a real GPU: blocks are distinct, writable memory; the
// pool refuses what the device cannot hold; options are checked everywhere.
#include "kernels/cuda/device_pool.h"

#include <cuda_runtime.h>

#include <cstring>
#include <set>

#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

TEST(DevicePool, BadOptionsAreNamedWithoutADevice) {
  DevicePoolOptions options;
  options.block_bytes = 1000;
  EXPECT_NE(options.Validate().message().find("block_bytes"),
            absl::string_view::npos);
  options.block_bytes = 4096;
  options.free_fraction = 1.5;
  EXPECT_NE(options.Validate().message().find("free_fraction"),
            absl::string_view::npos);
}

TEST(DevicePool, BlocksAreDistinctWritableMemory) {
  KVMEM_REQUIRE_DEVICE();
  DevicePoolOptions options;
  options.block_bytes = 64 << 10;
  options.pool_bytes = 64 << 20;  // 1024 blocks
  absl::StatusOr<std::unique_ptr<DevicePool>> pool =
      DevicePool::Create(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ((*pool)->total_blocks(), 1024);
  absl::StatusOr<std::vector<int32_t>> blocks = (*pool)->Take(1024);
  ASSERT_TRUE(blocks.ok());
  EXPECT_EQ((*pool)->Take(1).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Each block gets its own pattern; reading every block back shows no two
  // blocks overlap and every byte is usable.
  std::vector<uint8_t> pattern(options.block_bytes);
  for (int32_t b : *blocks) {
    std::memset(pattern.data(), b & 0xff, pattern.size());
    ASSERT_EQ(cudaMemcpy((*pool)->block(b), pattern.data(), pattern.size(),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  std::vector<uint8_t> back(options.block_bytes);
  for (int32_t b : *blocks) {
    ASSERT_EQ(cudaMemcpy(back.data(), (*pool)->block(b), back.size(),
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    for (uint8_t byte : back) ASSERT_EQ(byte, uint8_t(b & 0xff)) << b;
  }
  ASSERT_TRUE((*pool)->Give(*blocks).ok());
  EXPECT_EQ((*pool)->free_blocks(), 1024);
}

TEST(DevicePool, DefaultSizeIsAFractionOfFreeMemoryAndTooMuchIsRefused) {
  KVMEM_REQUIRE_DEVICE();
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  DevicePoolOptions options;
  options.block_bytes = 64 << 20;
  options.free_fraction = 0.25;
  {
    absl::StatusOr<std::unique_ptr<DevicePool>> pool =
        DevicePool::Create(options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    const double share = double((*pool)->total_blocks()) *
                         double(options.block_bytes) / double(free_bytes);
    EXPECT_GT(share, 0.2);
    EXPECT_LE(share, 0.25);
  }
  options.pool_bytes = total_bytes * 2;  // more than the device has
  absl::Status st = DevicePool::Create(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find("free of"), absl::string_view::npos) << st;
}

// Two planes: block b of plane 1 is its own memory, block_bytes past the
// end of plane 0's blocks, and the size asked for covers both planes.
TEST(DevicePool, PlanesAreSeparateRegionsOfOnePool) {
  KVMEM_REQUIRE_DEVICE();
  DevicePoolOptions options;
  options.block_bytes = 64 << 10;
  options.pool_bytes = 2 * (16 << 20);  // 256 blocks of two planes
  options.planes = 2;
  absl::StatusOr<std::unique_ptr<DevicePool>> pool =
      DevicePool::Create(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ((*pool)->total_blocks(), 256);
  EXPECT_EQ((*pool)->planes(), 2);
  EXPECT_EQ(static_cast<char*>((*pool)->plane_base(1)) -
                static_cast<char*>((*pool)->plane_base(0)),
            ptrdiff_t{256} * (64 << 10));
  absl::StatusOr<std::vector<int32_t>> blocks = (*pool)->Take(256);
  ASSERT_TRUE(blocks.ok());
  // Each (block, plane) gets its own byte; reading all back shows none
  // overlaps.
  std::vector<uint8_t> pattern(options.block_bytes);
  for (int32_t b : *blocks) {
    for (int plane = 0; plane < 2; ++plane) {
      std::memset(pattern.data(), (b * 2 + plane) & 0xff, pattern.size());
      ASSERT_EQ(cudaMemcpy((*pool)->block(b, plane), pattern.data(),
                           pattern.size(), cudaMemcpyHostToDevice),
                cudaSuccess);
    }
  }
  std::vector<uint8_t> back(options.block_bytes);
  int bad = 0;
  for (int32_t b : *blocks) {
    for (int plane = 0; plane < 2; ++plane) {
      ASSERT_EQ(cudaMemcpy(back.data(), (*pool)->block(b, plane), back.size(),
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      for (uint8_t x : back) bad += x != ((b * 2 + plane) & 0xff);
    }
  }
  EXPECT_EQ(bad, 0);
  options.planes = 9;
  EXPECT_NE(options.Validate().message().find("planes"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace kvmem::cuda
