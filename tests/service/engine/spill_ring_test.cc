// SpillRing: the host's account of which spilled tokens a device spill
// ring holds, checked against a simulated ring written exactly where the
// device writes (token n at Index(n), after the step's reads), through
// random runs of steps that evict or not and of spills around the ring.
#include "service/engine/spill_ring.h"

#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// Asked about a count it was not synced to, a ring claims nothing.
TEST(SpillRing, UnsyncedItClaimsNoPage) {
  SpillRing ring{64};
  EXPECT_EQ(ring.FirstPage(0, 16), SpillRing::kNoPage);
  ring.Sync(0);
  EXPECT_EQ(ring.FirstPage(0, 16), 0);
  ring.Kept(0, 1);
  EXPECT_EQ(ring.FirstPage(5, 16), SpillRing::kNoPage);
}

TEST(SpillRing, WithoutARingNothingIsHeld) {
  SpillRing ring;
  ring.Sync(40);
  EXPECT_EQ(ring.FirstPage(40, 16), SpillRing::kNoPage);
  EXPECT_EQ(ring.Index(40), -1);
  ring.Kept(40, 1);
  EXPECT_EQ(ring.FirstPage(41, 16), SpillRing::kNoPage);
}

// Every spill through the ring from the stream's start: all pages while
// the stream has spilled at most the ring's size, then the last whole
// pages within it.
TEST(SpillRing, SpillsThroughTheRingKeepTheLastPages) {
  constexpr int kPage = 16, kSize = 64;
  SpillRing ring{kSize};
  for (int64_t spilled = 0; spilled < 5 * kSize; ++spilled) {
    ring.Sync(spilled);
    const int64_t want =
        spilled <= kSize ? 0 : (spilled - kSize + kPage - 1) / kPage;
    ASSERT_EQ(ring.FirstPage(spilled, kPage), want) << spilled;
    ASSERT_EQ(ring.Index(spilled), spilled % kSize);
    ring.Kept(spilled, 1);
  }
}

// A count that moved without the ring (a chunk's spills) empties it: no
// page before the stream's next one is held, and pages fill again after.
TEST(SpillRing, SpillsAroundTheRingEmptyIt) {
  constexpr int kPage = 8;
  SpillRing ring{32};
  for (int64_t n = 0; n < 20; ++n) {
    ring.Sync(n);
    ring.Kept(n, 1);
  }
  ring.Sync(20);
  EXPECT_EQ(ring.FirstPage(20, kPage), 0);
  ring.Sync(23);                            // three tokens spilled by a chunk
  EXPECT_EQ(ring.FirstPage(23, kPage), 3);  // past the open page 2
  for (int64_t n = 23; n < 40; ++n) {
    ring.Sync(n);
    ring.Kept(n, 1);
  }
  ring.Sync(40);
  EXPECT_EQ(ring.FirstPage(40, kPage), 3);  // pages 3 and 4 whole
}

TEST(SpillRing, ThePagesItClaimsAreInASimulatedRing) {
  const uint32_t seed = std::random_device()();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int page : {1, 8, 16}) {
    for (int size : {page, 2 * page, 64 * page}) {
      SpillRing ring{size};
      std::vector<int64_t> slots(size_t(size), -1);  // token held at index
      int64_t spilled = 0;
      for (int step = 0; step < 4000; ++step) {
        ring.Sync(spilled);
        const int32_t first = ring.FirstPage(spilled, page);
        const int64_t pages = (spilled + page - 1) / page;
        for (int64_t p = first; p < pages; ++p) {
          for (int64_t n = p * page; n < std::min(spilled, (p + 1) * page);
               ++n) {
            ASSERT_EQ(slots.at(size_t(ring.Index(n))), n)
                << "seed " << seed << " page " << page << " size " << size
                << " step " << step << ": token " << n << " of page " << p;
          }
        }
        const int what = int(rng() % 20);
        if (what < 12) {  // a step that evicts: kept after its reads
          slots.at(size_t(ring.Index(spilled))) = spilled;
          ring.Kept(spilled, 1);
          ++spilled;
        } else if (what < 14) {  // a chunk: its last `size` tokens kept
          const int64_t evicted = int64_t(rng() % uint32_t(3 * size));
          const int32_t start = ring.Index(spilled);
          for (int64_t e = std::max<int64_t>(0, evicted - size); e < evicted;
               ++e) {
            slots.at(size_t((start + e) % size)) = spilled + e;
          }
          ring.Kept(spilled, evicted);
          spilled += evicted;
        } else if (what < 19) {  // a step that evicts nothing
          ring.Kept(spilled, 0);
        } else {  // tokens spilled around the ring
          spilled += 1 + int64_t(rng() % uint32_t(3 * page));
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvmem
