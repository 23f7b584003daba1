// A fixed set of threads that run the handlers which may block (storage
// writes, the engine's step), so that gRPC's callback threads rarely block.
// A step may also run on the thread that received it (RunHereOrQueue):
// handing a request to a sleeping worker costs a wake-up (~50 µs on the GPU
// machine, a quarter of a batch-1 step's server time), paid 32 times per
// decoded token. At most `inline_limit` tasks run that way at once, so most
// of gRPC's callback threads stay free to poll even while those wait (a
// STEP_SYNC step waits for its log's sync). Thread-safe.
#ifndef KVMEM_SERVICE_GRPC_WORK_POOL_H_
#define KVMEM_SERVICE_GRPC_WORK_POOL_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "base/mutex.h"

namespace kvmem {

class WorkPool {
 public:
  // Starts `threads` (≥ 1) workers; up to `inline_limit` (≥ 0) tasks at
  // once may run on their callers' threads instead (RunHereOrQueue).
  explicit WorkPool(int threads, int inline_limit = 0);
  // Runs every task already queued, then joins the workers.
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Queues `task`; it runs on one of the workers. Returns false, and does not
  // run it, once the destructor has begun.
  bool Run(std::function<void()> task);
  // Runs `task` on the calling thread, and returns when it has run, if
  // fewer than `inline_limit` tasks run that way now and no task waits in
  // the queue; otherwise queues it as Run does (and returns Run's answer).
  // So inline runs are for when the workers have nothing waiting (where a
  // hand-off costs a sleeping worker's wake-up); under load every task
  // queues, in order (on the 2-core VM, 16 streams of batch-1 steps with
  // an inline slot that ignored the queue made 9–13 % fewer steps).
  bool RunHereOrQueue(std::function<void()> task);

 private:
  void Loop();

  Mutex mu_;
  std::condition_variable_any wake_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
  const int inline_limit_;
  std::atomic<int> inline_running_{0};
  std::atomic<int> waiting_{0};  // tasks_.size(), read without mu_
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_WORK_POOL_H_
