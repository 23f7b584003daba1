// A fixed set of worker threads that run the iterations of a loop side by
// side (the per-KV-head work of a step: selection and the host policy).
// The calling thread takes iterations too, so a loop always finishes even
// when every worker is busy with other callers' loops. Thread-safe.
//
// A step runs several short loops (tens of µs each) back to back. Waking a
// sleeping thread costs a futex wake and, on a virtual machine, an
// inter-processor interrupt: 10–50 µs, as much as the loop itself. So up to
// half of the idle workers, and a caller waiting for its helpers, can spin
// for `spin` before they sleep (the other half sleep at once, leaving cores
// to the server's other threads). The default is no spin: on the GPU
// machine a 200 µs spin made decode steps slower, not faster (the A/B in
// bench/results/loopback.md), the spinners taking cores from gRPC.
#ifndef KVMEM_BASE_PARALLEL_FOR_H_
#define KVMEM_BASE_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <chrono>
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
  // How long idle threads spin unless told: not at all (see above).
  static std::chrono::nanoseconds DefaultSpin() {
    return std::chrono::nanoseconds(0);
  }

  // `threads` workers besides the callers; 0 runs every loop inline.
  explicit ParallelFor(int threads,
                       std::chrono::nanoseconds spin = DefaultSpin())
      : spin_(spin), max_spinning_(std::max(1, threads / 2)) {
    for (int i = 0; i < threads; ++i) {
      workers_.emplace_back([this] { Work(); });
    }
  }
  ~ParallelFor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      queued_.store(-1, std::memory_order_release);  // ends the spinners
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  ParallelFor(const ParallelFor&) = delete;
  ParallelFor& operator=(const ParallelFor&) = delete;

  // Calls fn(i) once for every i in [0, count), on this thread and the
  // workers; returns when all calls have returned. fn must not throw.
  void Run(size_t count, const std::function<void(size_t)>& fn) {
    Run(count, fn, /*side_by_side=*/true);
  }
  // As above, but on this thread alone, in order, unless `side_by_side`:
  // for loops whose work is worth a wake-up only past some size, which
  // the caller knows (items, bytes, pages).
  void Run(size_t count, const std::function<void(size_t)>& fn,
           bool side_by_side) {
    if (count == 0) return;
    if (workers_.empty() || count == 1 || !side_by_side) {
      for (size_t i = 0; i < count; ++i) fn(i);
      return;
    }
    auto loop = std::make_shared<Loop>();
    loop->fn = &fn;
    loop->count = count;
    const size_t helpers = std::min(workers_.size(), count - 1);
    size_t wake = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < helpers; ++i) queue_.push_back(loop);
      queued_.fetch_add(int64_t(helpers), std::memory_order_release);
      // Spinning workers find the loop themselves; wake sleepers for the
      // rest (a miscount only wakes one too many, or leaves the caller
      // more to drain).
      const size_t spinning = size_t(spinning_.load(std::memory_order_relaxed));
      wake = std::min(helpers - std::min(helpers, spinning), sleeping_);
    }
    for (size_t i = 0; i < wake; ++i) wake_.notify_one();
    loop->Drain();
    // Helpers that already took the loop may still be inside fn.
    if (SpinUntil([&] {
          return loop->done.load(std::memory_order_acquire) == count;
        })) {
      return;
    }
    std::unique_lock<std::mutex> lock(loop->mu);
    loop->idle.wait(lock, [&] {
      return loop->done.load(std::memory_order_acquire) == count;
    });
  }

 private:
  struct Loop {
    const std::function<void(size_t)>* fn = nullptr;
    size_t count = 0;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
    std::mutex mu;  // for `idle` only
    std::condition_variable idle;

    void Drain() {
      size_t ran = 0;
      for (size_t i = next++; i < count; i = next++) {
        (*fn)(i);
        ++ran;
      }
      if (ran == 0) return;
      if (done.fetch_add(ran, std::memory_order_acq_rel) + ran == count) {
        // Under mu: the caller checks `done` and sleeps under it, so this
        // notification cannot fall between its check and its wait.
        std::lock_guard<std::mutex> lock(mu);
        idle.notify_all();
      }
    }
  };

  // Spins until ready() or spin_ has passed; true if ready.
  template <typename Ready>
  bool SpinUntil(const Ready& ready) const {
    if (ready()) return true;
    if (spin_.count() <= 0) return false;
    const auto until = std::chrono::steady_clock::now() + spin_;
    do {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    } while (std::chrono::steady_clock::now() < until);
    return ready();
  }

  void Work() {
    for (;;) {
      if (spinning_.fetch_add(1, std::memory_order_relaxed) < max_spinning_) {
        SpinUntil([&] { return queued_.load(std::memory_order_acquire) != 0; });
      }
      spinning_.fetch_sub(1, std::memory_order_relaxed);
      std::shared_ptr<Loop> loop;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ++sleeping_;
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        --sleeping_;
        if (queue_.empty()) return;  // stopping
        loop = std::move(queue_.front());
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
      loop->Drain();
    }
  }

  const std::chrono::nanoseconds spin_;
  const int max_spinning_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Loop>> queue_;  // guarded by mu_
  // queue_.size() for spinners to read without mu_ (−1 once stopping).
  std::atomic<int64_t> queued_{0};
  std::atomic<int> spinning_{0};  // workers in Work's spin (or about to)
  size_t sleeping_ = 0;           // workers waiting on wake_; guarded by mu_
  bool stopping_ = false;         // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace kvmem

#endif  // KVMEM_BASE_PARALLEL_FOR_H_
