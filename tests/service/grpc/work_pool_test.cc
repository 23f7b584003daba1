// WorkPool: every task runs exactly once; RunHereOrQueue runs a task on
// the caller's thread only while fewer than the inline limit run that way.
#include "service/grpc/work_pool.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// A task that keeps its thread until Release().
class Hold {
 public:
  std::function<void()> Task() {
    return [this] {
      running_.set_value();
      released_.wait();
    };
  }
  void WaitUntilHeld() { running_.get_future().wait(); }
  void Release() { release_.set_value(); }

 private:
  std::promise<void> release_;
  std::shared_future<void> released_ = release_.get_future().share();
  std::promise<void> running_;
};

TEST(WorkPoolTest, WithoutInlineSlotsEveryTaskRunsOnAWorker) {
  WorkPool pool(2, /*inline_limit=*/0);
  std::promise<std::thread::id> ran_on;
  ASSERT_TRUE(pool.RunHereOrQueue(
      [&] { ran_on.set_value(std::this_thread::get_id()); }));
  EXPECT_NE(ran_on.get_future().get(), std::this_thread::get_id());
}

TEST(WorkPoolTest, AFreeInlineSlotRunsTheTaskHereBeforeReturning) {
  WorkPool pool(2, /*inline_limit=*/1);
  std::thread::id ran_on;
  ASSERT_TRUE(
      pool.RunHereOrQueue([&] { ran_on = std::this_thread::get_id(); }));
  EXPECT_EQ(ran_on, std::this_thread::get_id());
}

TEST(WorkPoolTest, ABusyInlineSlotQueuesTheNextTask) {
  WorkPool pool(2, /*inline_limit=*/1);
  Hold hold;  // holds the only inline slot until released
  std::thread holder([&] { pool.RunHereOrQueue(hold.Task()); });
  hold.WaitUntilHeld();
  std::promise<std::thread::id> ran_on;
  ASSERT_TRUE(pool.RunHereOrQueue(
      [&] { ran_on.set_value(std::this_thread::get_id()); }));
  std::future<std::thread::id> second = ran_on.get_future();
  // Queued, so it runs on a worker even while the slot stays taken.
  ASSERT_EQ(second.wait_for(std::chrono::seconds(10)),
            std::future_status::ready);
  EXPECT_NE(second.get(), std::this_thread::get_id());
  hold.Release();
  holder.join();
  // The slot is free again.
  std::thread::id third;
  ASSERT_TRUE(pool.RunHereOrQueue([&] { third = std::this_thread::get_id(); }));
  EXPECT_EQ(third, std::this_thread::get_id());
}

TEST(WorkPoolTest, ATaskWaitingInTheQueueIsNotOvertaken) {
  WorkPool pool(1, /*inline_limit=*/1);
  Hold hold;  // the only worker is busy; a second task waits in the queue
  ASSERT_TRUE(pool.Run(hold.Task()));
  hold.WaitUntilHeld();
  std::vector<int> order;
  std::mutex order_mu;
  auto record = [&](int n) {
    std::lock_guard<std::mutex> lock(order_mu);
    order.push_back(n);
  };
  ASSERT_TRUE(pool.Run([&] { record(1); }));
  std::promise<std::thread::id> ran_on;
  ASSERT_TRUE(pool.RunHereOrQueue([&] {
    record(2);
    ran_on.set_value(std::this_thread::get_id());
  }));
  hold.Release();
  std::future<std::thread::id> third = ran_on.get_future();
  ASSERT_EQ(third.wait_for(std::chrono::seconds(10)),
            std::future_status::ready);
  EXPECT_NE(third.get(), std::this_thread::get_id()) << "ran inline";
  std::lock_guard<std::mutex> lock(order_mu);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST(WorkPoolTest, ManyCallersNeverExceedTheInlineLimitAndEveryTaskRunsOnce) {
  constexpr int kLimit = 2, kCallers = 8, kTasks = 500;
  std::atomic<int> inline_now{0}, most_inline{0};
  std::vector<std::atomic<int>> runs(kCallers * kTasks);
  {
    WorkPool pool(3, kLimit);
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c) {
      callers.emplace_back([&, c] {
        const std::thread::id me = std::this_thread::get_id();
        for (int t = 0; t < kTasks; ++t) {
          ASSERT_TRUE(pool.RunHereOrQueue([&, me, c, t] {
            const bool here = std::this_thread::get_id() == me;
            if (here) {
              const int now = inline_now.fetch_add(1) + 1;
              int most = most_inline.load();
              while (now > most &&
                     !most_inline.compare_exchange_weak(most, now)) {
              }
              std::this_thread::yield();
              inline_now.fetch_sub(1);
            }
            runs[size_t(c * kTasks + t)].fetch_add(1);
          }));
        }
      });
    }
    for (std::thread& t : callers) t.join();
  }  // the destructor runs what is still queued
  EXPECT_GE(most_inline.load(), 1);
  EXPECT_LE(most_inline.load(), kLimit);
  for (size_t i = 0; i < runs.size(); ++i) {
    ASSERT_EQ(runs[i].load(), 1) << "task " << i;
  }
}

}  // namespace
}  // namespace kvmem
