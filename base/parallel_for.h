// A fixed set of worker threads that run the iterations of a loop side by
// side (the per-KV-head work of a step: selection and the host policy).
// The calling thread takes iterations too, so a loop always finishes even
// when every worker is busy with other callers' loops. Thread-safe.
#ifndef KVMEM_BASE_PARALLEL_FOR_H_
#define KVMEM_BASE_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvmem {

class ParallelFor {
 public:
  // `threads` workers besides the callers; 0 runs every loop inline.
  explicit ParallelFor(int threads) {
    for (int i = 0; i < threads; ++i) {
      workers_.emplace_back([this] { Work(); });
    }
  }
  ~ParallelFor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  ParallelFor(const ParallelFor&) = delete;
  ParallelFor& operator=(const ParallelFor&) = delete;

  // Calls fn(i) once for every i in [0, count), on this thread and the
  // workers; returns when all calls have returned. fn must not throw.
  void Run(size_t count, const std::function<void(size_t)>& fn) {
    if (count == 0) return;
    if (workers_.empty() || count == 1) {
      for (size_t i = 0; i < count; ++i) fn(i);
      return;
    }
    auto loop = std::make_shared<Loop>();
    loop->fn = &fn;
    loop->count = count;
    const size_t helpers = std::min(workers_.size(), count - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < helpers; ++i) queue_.push_back(loop);
    }
    for (size_t i = 0; i < helpers; ++i) wake_.notify_one();
    loop->Drain();
    // Helpers that already took the loop may still be inside fn.
    std::unique_lock<std::mutex> lock(loop->mu);
    loop->idle.wait(lock, [&] { return loop->done == count; });
  }

 private:
  struct Loop {
    const std::function<void(size_t)>* fn = nullptr;
    size_t count = 0;
    std::atomic<size_t> next{0};
    std::mutex mu;
    std::condition_variable idle;
    size_t done = 0;  // guarded by mu

    void Drain() {
      size_t ran = 0;
      for (size_t i = next++; i < count; i = next++) {
        (*fn)(i);
        ++ran;
      }
      if (ran == 0) return;
      std::lock_guard<std::mutex> lock(mu);
      done += ran;
      if (done == count) idle.notify_all();
    }
  };

  void Work() {
    for (;;) {
      std::shared_ptr<Loop> loop;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping
        loop = std::move(queue_.front());
        queue_.pop_front();
      }
      loop->Drain();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Loop>> queue_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace kvmem

#endif  // KVMEM_BASE_PARALLEL_FOR_H_
