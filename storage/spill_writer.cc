#include "storage/spill_writer.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "base/mutex.h"
#include "base/status_macros.h"

namespace kvmem::storage {

class SpillWriter::Impl {
 public:
  Impl(const Options& options, Store* store)
      : options_(options), store_(store) {}

  ~Impl() {
    {
      MutexLock lock(&mu_);
      stopping_ = true;
      paused_ = false;
    }
    work_cv_.notify_all();
    space_cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void StartThread() {
    thread_ = std::thread([this] { Run(); });
  }

  absl::Status Enqueue(SpillBatch batch, const EnqueueOptions& options,
                       DoneCallback done) {
    KVMEM_RETURN_IF_ERROR(batch.Validate());
    const size_t bytes = batch.MemoryBytes();
    const bool forever = options.timeout == absl::InfiniteDuration();
    const auto deadline =
        std::chrono::steady_clock::now() +
        (forever ? std::chrono::nanoseconds(0)
                 : absl::ToChronoNanoseconds(
                       std::max(options.timeout, absl::ZeroDuration())));
    MutexLock lock(&mu_);
    bool counted_blocked = false;
    while (!stopping_ && !HasRoom(bytes)) {
      if (!counted_blocked) {
        counted_blocked = true;
        ++blocked_enqueuers_;
        blocked_cv_.notify_all();
      }
      if (forever) {
        space_cv_.wait(mu_);
      } else if (space_cv_.wait_until(mu_, deadline) ==
                     std::cv_status::timeout &&
                 !stopping_ && !HasRoom(bytes)) {
        --blocked_enqueuers_;
        return absl::ResourceExhaustedError(absl::StrCat(
            "spill queue full: batch of ", bytes, " bytes, ", queued_bytes_,
            " of max_queued_bytes ", options_.max_queued_bytes,
            " queued; waited ", absl::FormatDuration(options.timeout)));
      }
    }
    if (counted_blocked) --blocked_enqueuers_;
    if (stopping_) {
      return absl::UnavailableError("spill writer is shutting down");
    }
    for (const SpillBatch::Entry& entry : batch.pages) {
      IndexEntry& slot = index_[entry.id];
      slot.page = entry.page;  // newest copy wins; FIFO writes agree
      ++slot.pending;
    }
    queue_.push_back(Pending{++last_enqueued_, std::move(batch), options.sync,
                             std::move(done), bytes});
    queued_bytes_ += bytes;
    work_cv_.notify_one();
    return absl::OkStatus();
  }

  absl::Status Flush() {
    MutexLock lock(&mu_);
    const uint64_t target = last_enqueued_;
    while (last_completed_ < target) flushed_cv_.wait(mu_);
    absl::Status result = std::move(unreported_failure_);
    unreported_failure_ = absl::OkStatus();
    return result;
  }

  std::shared_ptr<const SpillPage> Lookup(const PageId& id) const {
    MutexLock lock(&mu_);
    auto it = index_.find(id);
    return it == index_.end() ? nullptr : it->second.page;
  }

  Stats stats() const {
    MutexLock lock(&mu_);
    Stats s = stats_;
    s.queued_bytes = queued_bytes_;
    s.queued_batches = last_enqueued_ - last_completed_;
    return s;
  }

  void Pause() {
    MutexLock lock(&mu_);
    paused_ = true;
  }

  void Resume() {
    {
      MutexLock lock(&mu_);
      paused_ = false;
    }
    work_cv_.notify_all();
  }

  void AwaitBlocked(int n) {
    MutexLock lock(&mu_);
    while (blocked_enqueuers_ < n) blocked_cv_.wait(mu_);
  }

 private:
  struct Pending {
    uint64_t id;  // 1, 2, … in enqueue order
    SpillBatch batch;
    bool sync;
    DoneCallback done;
    size_t bytes;
  };
  struct IndexEntry {
    std::shared_ptr<const SpillPage> page;
    int pending = 0;  // queued or in-flight batches holding this id
  };

  bool HasRoom(size_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return queued_bytes_ == 0 ||
           queued_bytes_ + bytes <= options_.max_queued_bytes;
  }

  // Takes the next group off the queue: the first batch, then following
  // ones while the group stays within max_group_bytes. The group's bytes
  // stay counted in queued_bytes_ until its write completes.
  std::vector<Pending> TakeGroup() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<Pending> group;
    size_t group_bytes = 0;
    while (!queue_.empty() &&
           (group.empty() ||
            group_bytes + queue_.front().bytes <= options_.max_group_bytes)) {
      group_bytes += queue_.front().bytes;
      group.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    return group;
  }

  void Run() {
    for (;;) {
      std::vector<Pending> group;
      {
        MutexLock lock(&mu_);
        // The destructor clears paused_ as it sets stopping_.
        while (!stopping_ && (paused_ || queue_.empty())) work_cv_.wait(mu_);
        if (queue_.empty()) return;  // stopping, everything written
        group = TakeGroup();
      }
      Write(group);
    }
  }

  // Writes one group without the lock, then retires it: index entries
  // first (the pages are in RocksDB now), then callbacks, then the
  // completion mark that Flush waits on.
  void Write(std::vector<Pending>& group) {
    std::vector<const SpillBatch*> batches;
    bool sync = false;
    for (const Pending& p : group) {
      batches.push_back(&p.batch);
      sync = sync || p.sync;
    }
    const absl::Status status = store_->WriteSpillGroup(batches, sync);
    size_t bytes = 0;
    {
      MutexLock lock(&mu_);
      for (const Pending& p : group) {
        bytes += p.bytes;
        for (const SpillBatch::Entry& entry : p.batch.pages) {
          auto it = index_.find(entry.id);
          if (it != index_.end() && --it->second.pending == 0) {
            index_.erase(it);
          }
        }
      }
      queued_bytes_ -= bytes;
      ++stats_.writes;
      (status.ok() ? stats_.written_batches : stats_.failed_batches) +=
          group.size();
    }
    space_cv_.notify_all();
    for (Pending& p : group) {
      if (p.done) p.done(status);
    }
    {
      MutexLock lock(&mu_);
      if (!status.ok() && unreported_failure_.ok()) {
        unreported_failure_ = status;
      }
      last_completed_ = group.back().id;
    }
    flushed_cv_.notify_all();
  }

  const Options options_;
  Store* const store_;  // not owned; outlives this
  std::thread thread_;

  mutable Mutex mu_;
  std::condition_variable_any work_cv_;     // queue or state changed
  std::condition_variable_any space_cv_;    // queued_bytes_ went down
  std::condition_variable_any flushed_cv_;  // last_completed_ went up
  std::condition_variable_any blocked_cv_;  // blocked_enqueuers_ went up
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<PageId, IndexEntry> index_ ABSL_GUARDED_BY(mu_);
  size_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_enqueued_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_completed_ ABSL_GUARDED_BY(mu_) = 0;
  // The first write failure that no Flush has returned yet.
  absl::Status unreported_failure_ ABSL_GUARDED_BY(mu_);
  int blocked_enqueuers_ ABSL_GUARDED_BY(mu_) = 0;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

absl::Status SpillWriter::Options::Validate() const {
  if (max_queued_bytes < 1) {
    return absl::InvalidArgumentError("max_queued_bytes must be ≥ 1, got 0");
  }
  if (max_group_bytes < 1) {
    return absl::InvalidArgumentError("max_group_bytes must be ≥ 1, got 0");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SpillWriter>> SpillWriter::Start(
    const Options& options, Store* store) {
  KVMEM_RETURN_IF_ERROR(options.Validate());
  if (store == nullptr) return absl::InvalidArgumentError("store: null");
  auto impl = std::make_unique<Impl>(options, store);
  impl->StartThread();
  return std::unique_ptr<SpillWriter>(new SpillWriter(std::move(impl)));
}

SpillWriter::SpillWriter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpillWriter::~SpillWriter() = default;

absl::Status SpillWriter::Enqueue(SpillBatch batch,
                                  const EnqueueOptions& options,
                                  DoneCallback done) {
  return impl_->Enqueue(std::move(batch), options, std::move(done));
}
absl::Status SpillWriter::Flush() { return impl_->Flush(); }
std::shared_ptr<const SpillPage> SpillWriter::Lookup(const PageId& id) const {
  return impl_->Lookup(id);
}
SpillWriter::Stats SpillWriter::stats() const { return impl_->stats(); }
void SpillWriter::PauseForTesting() { impl_->Pause(); }
void SpillWriter::ResumeForTesting() { impl_->Resume(); }
void SpillWriter::AwaitBlockedEnqueuersForTesting(int n) {
  impl_->AwaitBlocked(n);
}

}  // namespace kvmem::storage
