// Writes spilled pages to the Store on one background thread, off the step's
// critical path. Each enqueued SpillBatch (one step's pages) is written
// atomically; batches waiting together are group-committed in one
// WriteBatch (Store::WriteSpillGroup). The queue is bounded in bytes: when
// full, Enqueue blocks (or times out), so memory never grows without bound.
//
// Read-your-writes: a page is findable with Lookup from the moment Enqueue
// returns until its write has completed; it is removed only after RocksDB
// has it, so "Lookup missed, then Store::ReadPages" never misses a page
// whose write succeeded. The pages of a failed batch are reported to its
// callback and then forgotten (a later ReadPages says NOT_FOUND).
//
// Thread-safe: every method may be called concurrently, except that the
// destructor must not overlap any other call.
#ifndef KVMEM_STORAGE_SPILL_WRITER_H_
#define KVMEM_STORAGE_SPILL_WRITER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "storage/spill_page.h"
#include "storage/store.h"

namespace kvmem::storage {

class SpillWriter {
 public:
  struct Options {
    // Bound on the pages queued or being written, in bytes of
    // SpillPage::MemoryBytes. Enqueue waits while a batch would pass it; a
    // batch larger than the bound alone is admitted into an empty queue
    // (the caller holds that memory anyway). Default 256 MiB; ≥ 1.
    size_t max_queued_bytes = size_t{256} << 20;
    // Batches waiting together are written in one WriteBatch of up to this
    // many bytes (the first batch always goes, whatever its size): fewer
    // writes and fsyncs. Past a few MiB a group only adds latency; measured
    // (bench/results/spill.md) 1–4 MiB beat 16–64 MiB. Default 1 MiB; ≥ 1.
    size_t max_group_bytes = size_t{1} << 20;

    // INVALID_ARGUMENT naming the field when out of range.
    absl::Status Validate() const;
  };

  // Per Enqueue call.
  struct EnqueueOptions {
    // Sync (fdatasync the WAL) before the batch's completion is signalled:
    // STEP_SYNC sessions. Other batches of the same group are synced too.
    bool sync = false;
    // How long Enqueue may wait for room in the queue. Infinite: wait as
    // long as it takes; zero: never wait.
    absl::Duration timeout = absl::InfiniteDuration();
  };

  // Called once per batch, on the writer thread, after its write has
  // completed (synced if asked) with OK, or failed with the write's status
  // (UNAVAILABLE or DATA_LOSS with RocksDB's cause, INTERNAL otherwise).
  // Must not block and must not call into this SpillWriter.
  using DoneCallback = std::function<void(const absl::Status& status)>;

  // Starts the writer thread. `store` is borrowed and must outlive the
  // SpillWriter. INVALID_ARGUMENT names a bad option.
  static absl::StatusOr<std::unique_ptr<SpillWriter>> Start(
      const Options& options, Store* store);

  // Writes every batch still queued (resuming a paused writer), then stops
  // the thread. Callbacks of those batches run before it returns.
  ~SpillWriter();

  SpillWriter(const SpillWriter&) = delete;
  SpillWriter& operator=(const SpillWriter&) = delete;

  // Queues `batch` (its page pointers are copied; the pages are shared, not
  // copied) and returns; `done`, if set, is later called with the batch's
  // write status. Once it returns OK the pages are visible to Lookup.
  // INVALID_ARGUMENT: a page fails SpillBatch::Validate().
  // RESOURCE_EXHAUSTED: no room within `options.timeout` (names the bytes
  // and the bound). UNAVAILABLE: the writer is shutting down. On error
  // nothing is queued and `done` is never called. An empty batch is OK
  // (`done` still runs, in order).
  // The batch is taken by value: a caller that moves it in saves the copy
  // of its pages' pointers and log bodies (a decode step of 32 entries
  // logs ~400 KB of q, k and v).
  absl::Status Enqueue(SpillBatch batch, const EnqueueOptions& options,
                       DoneCallback done = nullptr);

  // Waits until every batch enqueued before the call has completed and
  // its callback has run. Returns the first write failure (UNAVAILABLE,
  // DATA_LOSS, INTERNAL) that no earlier Flush has returned, else OK: each
  // failure is returned by one Flush; callbacks give per-batch statuses.
  // Blocks forever on a paused writer.
  absl::Status Flush();

  // The newest queued copy of page `id`, or null when no batch holding it
  // is queued or being written (it is then in RocksDB, or was never
  // spilled, or its write failed). The page is shared: it stays valid
  // after the write completes.
  std::shared_ptr<const SpillPage> Lookup(const PageId& id) const;

  struct Stats {
    size_t queued_bytes = 0;    // queued or being written
    size_t queued_batches = 0;  // queued or being written
    uint64_t written_batches = 0;
    uint64_t failed_batches = 0;
    uint64_t writes = 0;  // WriteBatches issued (≤ batches: grouping)
  };
  Stats stats() const;

  // Test hooks. While paused the writer starts no new write (one already
  // under way completes). Await returns once `n` Enqueue calls are waiting
  // for room.
  void PauseForTesting();
  void ResumeForTesting();
  void AwaitBlockedEnqueuersForTesting(int n);

 private:
  class Impl;
  explicit SpillWriter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_SPILL_WRITER_H_
