#include "kernels/block_allocator.h"

#include <algorithm>
#include <set>
#include <thread>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

TEST(BlockAllocator, TakesGivesAndRefusesPastTheEnd) {
  BlockAllocator pool(8);
  EXPECT_EQ(pool.total_blocks(), 8);
  absl::StatusOr<std::vector<int32_t>> a = pool.Take(3);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, (std::vector<int32_t>{0, 1, 2}));
  absl::StatusOr<std::vector<int32_t>> b = pool.Take(5);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(pool.free_blocks(), 0);
  absl::Status full = pool.Take(1).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("0 of 8 free"), absl::string_view::npos)
      << full;
  ASSERT_TRUE(pool.Give(*a).ok());
  EXPECT_EQ(pool.free_blocks(), 3);
  // Freed blocks are handed out again.
  absl::StatusOr<std::vector<int32_t>> c = pool.Take(3);
  ASSERT_TRUE(c.ok());
  std::vector<int32_t> sorted = *c;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, (std::vector<int32_t>{0, 1, 2}));
}

TEST(BlockAllocator, BadReturnsFreeNothing) {
  BlockAllocator pool(4);
  absl::StatusOr<std::vector<int32_t>> a = pool.Take(2);
  ASSERT_TRUE(a.ok());
  const int32_t twice[] = {(*a)[0], (*a)[0]};
  EXPECT_EQ(pool.Give(twice).code(), absl::StatusCode::kInvalidArgument);
  const int32_t never[] = {(*a)[0], 3};  // 3 was not taken
  EXPECT_EQ(pool.Give(never).code(), absl::StatusCode::kInvalidArgument);
  const int32_t outside[] = {9};
  EXPECT_EQ(pool.Give(outside).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool.free_blocks(), 2);  // nothing was freed by the bad calls
  EXPECT_EQ(pool.Take(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BlockAllocator, ConcurrentTakersNeverShareABlock) {
  BlockAllocator pool(4000);
  std::vector<std::vector<int32_t>> got(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        absl::StatusOr<std::vector<int32_t>> blocks = pool.Take(5);
        if (blocks.ok()) {
          got[t].insert(got[t].end(), blocks->begin(), blocks->end());
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::set<int32_t> all;
  size_t count = 0;
  for (const auto& g : got) {
    all.insert(g.begin(), g.end());
    count += g.size();
  }
  EXPECT_EQ(count, 4000u);
  EXPECT_EQ(all.size(), 4000u);  // no block handed out twice
  EXPECT_EQ(pool.free_blocks(), 0);
}

}  // namespace
}  // namespace kvmem
