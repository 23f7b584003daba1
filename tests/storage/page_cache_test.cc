#include "storage/page_cache.h"

#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/storage/spill_test_util.h"

namespace kvmem::storage {
namespace {

using test_util::RandomPage;
using test_util::Share;

class PageCacheTest : public ::testing::Test {
 protected:
  // Pages of equal size (4 tokens × 64-byte rows).
  std::shared_ptr<const SpillPage> Page() {
    return Share(RandomPage(rng_, 64, 4));
  }
  size_t PageBytes() { return Page()->MemoryBytes(); }
  static PageId Id(uint64_t page_seq, uint64_t seq = 1) {
    return PageId{seq, 0, 0, page_seq};
  }
  std::mt19937_64 rng_{12345};
};

TEST_F(PageCacheTest, EvictsLeastRecentlyUsedFirstWithinTheByteBound) {
  const size_t page_bytes = PageBytes();
  PageCache cache(3 * page_bytes);  // room for three
  std::vector<std::shared_ptr<const SpillPage>> pages;
  for (uint64_t i = 0; i < 3; ++i) {
    pages.push_back(Page());
    cache.Insert(Id(i), pages.back());
  }
  EXPECT_EQ(cache.stats().pages, 3u);
  EXPECT_EQ(cache.stats().bytes, 3 * page_bytes);
  // Use 0: now 1 is the least recently used.
  EXPECT_EQ(cache.Lookup(Id(0)), pages[0]);
  cache.Insert(Id(3), Page());
  EXPECT_EQ(cache.Lookup(Id(1)), nullptr);  // evicted
  EXPECT_NE(cache.Lookup(Id(0)), nullptr);
  EXPECT_NE(cache.Lookup(Id(2)), nullptr);
  EXPECT_NE(cache.Lookup(Id(3)), nullptr);
  // Order now (oldest first): 0, 2, 3. Two more evict 0 then 2.
  cache.Insert(Id(4), Page());
  EXPECT_EQ(cache.Lookup(Id(0)), nullptr);
  cache.Insert(Id(5), Page());
  EXPECT_EQ(cache.Lookup(Id(2)), nullptr);
  EXPECT_NE(cache.Lookup(Id(3)), nullptr);
  PageCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.pages, 3u);
  EXPECT_LE(stats.bytes, 3 * page_bytes);
  EXPECT_EQ(stats.evictions, 3u);
  EXPECT_EQ(stats.misses, 3u);
  // An evicted page a caller still holds stays valid.
  EXPECT_EQ(pages[1]->tokens(), 4u);
}

TEST_F(PageCacheTest, ALargerPageEvictsSeveral) {
  const size_t page_bytes = PageBytes();
  PageCache cache(4 * page_bytes);
  for (uint64_t i = 0; i < 4; ++i) cache.Insert(Id(i), Page());
  std::shared_ptr<const SpillPage> big = Share(RandomPage(rng_, 64, 8));
  ASSERT_LE(big->MemoryBytes(), 2 * page_bytes);
  cache.Insert(Id(9), big);
  EXPECT_EQ(cache.Lookup(Id(0)), nullptr);
  EXPECT_EQ(cache.Lookup(Id(1)), nullptr);
  EXPECT_NE(cache.Lookup(Id(2)), nullptr);
  EXPECT_EQ(cache.Lookup(Id(9)), big);
  EXPECT_LE(cache.stats().bytes, 4 * page_bytes);
}

TEST_F(PageCacheTest, ReplacingAPageKeepsTheCountsRight) {
  PageCache cache(10 * PageBytes());
  cache.Insert(Id(1), Page());
  std::shared_ptr<const SpillPage> newer = Page();
  cache.Insert(Id(1), newer);
  EXPECT_EQ(cache.Lookup(Id(1)), newer);
  EXPECT_EQ(cache.stats().pages, 1u);
  EXPECT_EQ(cache.stats().bytes, newer->MemoryBytes());
}

TEST_F(PageCacheTest, TooLargeOrZeroCapacityCachesNothing) {
  PageCache cache(PageBytes() - 1);
  cache.Insert(Id(1), Page());
  EXPECT_EQ(cache.Lookup(Id(1)), nullptr);
  EXPECT_EQ(cache.stats().bytes, 0u);
  PageCache none(0);
  none.Insert(Id(1), Page());
  EXPECT_EQ(none.stats().pages, 0u);
}

TEST_F(PageCacheTest, EraseAndEraseSession) {
  PageCache cache(10 * PageBytes());
  for (uint64_t seq : {1, 2}) {
    for (uint64_t i = 0; i < 3; ++i) cache.Insert(Id(i, seq), Page());
  }
  cache.Erase(Id(0, 1));
  EXPECT_EQ(cache.Lookup(Id(0, 1)), nullptr);
  cache.Erase(Id(0, 1));  // absent: no-op
  cache.EraseSession(2);
  EXPECT_EQ(cache.stats().pages, 2u);
  EXPECT_EQ(cache.stats().bytes, 2 * PageBytes());
  EXPECT_NE(cache.Lookup(Id(1, 1)), nullptr);
  EXPECT_EQ(cache.Lookup(Id(1, 2)), nullptr);
}

TEST_F(PageCacheTest, ConcurrentUseStaysWithinTheBound) {
  const size_t page_bytes = PageBytes();
  PageCache cache(8 * page_bytes);
  std::vector<std::shared_ptr<const SpillPage>> pages;
  for (int i = 0; i < 32; ++i) pages.push_back(Page());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        const uint64_t p = uint64_t((i * 7 + t * 13) % 32);
        std::shared_ptr<const SpillPage> got = cache.Lookup(Id(p));
        if (got == nullptr) {
          cache.Insert(Id(p), pages[p]);
        } else {
          EXPECT_EQ(got, pages[p]);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LE(cache.stats().bytes, 8 * page_bytes);
  EXPECT_EQ(cache.stats().hits + cache.stats().misses, 4u * 2000);
}

}  // namespace
}  // namespace kvmem::storage
