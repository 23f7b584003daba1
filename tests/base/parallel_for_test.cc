// ParallelFor: every index runs exactly once, whatever the number of
// workers and of callers sharing them, and Run returns only after all ran.
#include "base/parallel_for.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// Both ways of waiting: sleeping at once, and spinning first.
const std::chrono::nanoseconds kSpins[] = {std::chrono::nanoseconds(0),
                                           std::chrono::microseconds(200)};

TEST(ParallelFor, EveryIndexRunsOnceBeforeRunReturns) {
  for (int workers : {0, 1, 3, 8}) {
    for (std::chrono::nanoseconds spin : kSpins) {
      ParallelFor pool(workers, spin);
      for (size_t count :
           {size_t{0}, size_t{1}, size_t{2}, size_t{7}, size_t{1000}}) {
        std::vector<std::atomic<int>> hits(count);
        pool.Run(count, [&](size_t i) { hits[i].fetch_add(1); });
        for (size_t i = 0; i < count; ++i) {
          ASSERT_EQ(hits[i].load(), 1)
              << workers << " workers, " << count << ", spin " << spin.count();
        }
      }
    }
  }
}

TEST(ParallelFor, ConcurrentCallersShareTheWorkers) {
  for (std::chrono::nanoseconds spin : kSpins) {
    ParallelFor pool(2, spin);
    constexpr int kCallers = 6, kLoops = 50, kCount = 64;
    std::vector<std::thread> callers;
    std::atomic<int> wrong{0};
    for (int c = 0; c < kCallers; ++c) {
      callers.emplace_back([&] {
        for (int l = 0; l < kLoops; ++l) {
          std::vector<int> hits(kCount, 0);  // each index written by one
          pool.Run(kCount, [&](size_t i) { hits[i] += 1; });
          for (int h : hits) wrong += h != 1;
        }
      });
    }
    for (std::thread& t : callers) t.join();
    EXPECT_EQ(wrong.load(), 0) << "spin " << spin.count();
  }
}

// Workers that spun out and slept are woken by the next loop: loops spaced
// wider than the spin still run on the workers (and finish).
TEST(ParallelFor, LoopsAfterTheSpinWakeSleepingWorkers) {
  ParallelFor pool(3, std::chrono::microseconds(50));
  for (int l = 0; l < 5; ++l) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::atomic<int> ran{0};
    pool.Run(64, [&](size_t) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      ran.fetch_add(1);
    });
    EXPECT_EQ(ran.load(), 64);
  }
}

// A loop not worth waking the workers for runs on the caller, in order;
// told otherwise, the same loop reaches the workers.
TEST(ParallelFor, ALoopNotSideBySideRunsOnTheCallerInOrder) {
  ParallelFor pool(3);
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<size_t> order;
  bool elsewhere = false;
  pool.Run(
      100,
      [&](size_t i) {
        order.push_back(i);  // unsynchronised: one thread, or TSan tells
        elsewhere |= std::this_thread::get_id() != caller;
      },
      /*side_by_side=*/false);
  ASSERT_EQ(order.size(), 100u);
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(order[i], i);
  EXPECT_FALSE(elsewhere);

  std::atomic<int> on_workers{0};
  for (int attempt = 0; attempt < 50 && on_workers.load() == 0; ++attempt) {
    pool.Run(
        64,
        [&](size_t) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));
          if (std::this_thread::get_id() != caller) on_workers.fetch_add(1);
        },
        /*side_by_side=*/true);
  }
  EXPECT_GT(on_workers.load(), 0);
}

}  // namespace
}  // namespace kvmem
