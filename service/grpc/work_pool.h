// A fixed set of threads that run the handlers which may block (storage
// writes, later the engine's step), so that gRPC's callback threads never
// block. Thread-safe.
#ifndef KVMEM_SERVICE_GRPC_WORK_POOL_H_
#define KVMEM_SERVICE_GRPC_WORK_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "base/mutex.h"

namespace kvmem {

class WorkPool {
 public:
  // Starts `threads` (≥ 1) workers.
  explicit WorkPool(int threads);
  // Runs every task already queued, then joins the workers.
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Queues `task`; it runs on one of the workers. Returns false, and does not
  // run it, once the destructor has begun.
  bool Run(std::function<void()> task);

 private:
  void Loop();

  Mutex mu_;
  std::condition_variable_any wake_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_WORK_POOL_H_
