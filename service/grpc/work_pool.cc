#include "service/grpc/work_pool.h"

#include <algorithm>

namespace kvmem {

WorkPool::WorkPool(int threads, int inline_limit)
    : inline_limit_(std::max(0, inline_limit)) {
  for (int i = 0; i < std::max(1, threads); ++i) {
    threads_.emplace_back([this] { Loop(); });
  }
}

WorkPool::~WorkPool() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_) t.join();
}

bool WorkPool::Run(std::function<void()> task) {
  {
    MutexLock lock(&mu_);
    if (stopping_) return false;
    tasks_.push_back(std::move(task));
    waiting_.store(int(tasks_.size()), std::memory_order_relaxed);
  }
  wake_.notify_one();
  return true;
}

bool WorkPool::RunHereOrQueue(std::function<void()> task) {
  int running = inline_running_.load(std::memory_order_relaxed);
  // Behind tasks already waiting, never ahead of them: then the workers
  // are busy anyway, and the callback thread is better left to gRPC.
  while (running < inline_limit_ &&
         waiting_.load(std::memory_order_relaxed) == 0) {
    if (inline_running_.compare_exchange_weak(running, running + 1,
                                              std::memory_order_acquire)) {
      task();
      inline_running_.fetch_sub(1, std::memory_order_release);
      return true;
    }
  }
  return Run(std::move(task));
}

void WorkPool::Loop() {
  for (;;) {
    mu_.Lock();
    // condition_variable_any unlocks and relocks mu_ itself while waiting.
    while (!stopping_ && tasks_.empty()) wake_.wait(mu_);
    if (tasks_.empty()) {  // stopping, and nothing left to run
      mu_.Unlock();
      return;
    }
    std::function<void()> task = std::move(tasks_.front());
    tasks_.pop_front();
    waiting_.store(int(tasks_.size()), std::memory_order_relaxed);
    mu_.Unlock();
    task();
  }
}

}  // namespace kvmem
