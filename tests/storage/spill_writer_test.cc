#include "storage/spill_writer.h"

#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "storage/store.h"
#include "tests/storage/spill_test_util.h"
#include "tests/temp_dir.h"

namespace kvmem::storage {
namespace {

using test_util::RandomPage;
using test_util::SamePage;
using test_util::Share;
using test_util::TestSeed;

SpillWriter::EnqueueOptions Sync(bool sync) {
  SpillWriter::EnqueueOptions options;
  options.sync = sync;
  return options;
}

SpillWriter::EnqueueOptions WithTimeout(absl::Duration timeout) {
  SpillWriter::EnqueueOptions options;
  options.timeout = timeout;
  return options;
}

// A real store whose next WriteSpillGroup can be made to fail.
class FailingStore final : public Store {
 public:
  explicit FailingStore(std::unique_ptr<Store> base) : base_(std::move(base)) {}
  void FailNextWrite(absl::Status status) { fail_next_ = std::move(status); }

  absl::Status WriteSpillGroup(absl::Span<const SpillBatch* const> batches,
                               bool sync) override {
    if (!fail_next_.ok()) {
      absl::Status st = fail_next_;
      fail_next_ = absl::OkStatus();
      return st;
    }
    return base_->WriteSpillGroup(batches, sync);
  }
  absl::Status WriteSpill(const SpillBatch& b, bool sync) override {
    return base_->WriteSpill(b, sync);
  }
  absl::StatusOr<uint64_t> NewSessionSeq() override {
    return base_->NewSessionSeq();
  }
  absl::Status PutManifest(uint64_t s, absl::string_view b, bool y) override {
    return base_->PutManifest(s, b, y);
  }
  absl::StatusOr<std::string> GetManifest(uint64_t s) override {
    return base_->GetManifest(s);
  }
  absl::Status ForEachManifest(const ManifestVisitor& v) override {
    return base_->ForEachManifest(v);
  }
  absl::Status DeleteSession(uint64_t s, bool y) override {
    return base_->DeleteSession(s, y);
  }
  uint64_t ApproximateBytes() override { return base_->ApproximateBytes(); }
  absl::StatusOr<std::vector<SpillPage>> ReadPages(
      uint64_t s, uint32_t l, uint32_t h,
      absl::Span<const uint64_t> p) override {
    return base_->ReadPages(s, l, h, p);
  }
  absl::Status ForEachDigest(uint64_t s, const DigestVisitor& v) override {
    return base_->ForEachDigest(s, v);
  }
  absl::StatusOr<SpillCounts> CountSpilled(uint64_t s) override {
    return base_->CountSpilled(s);
  }
  absl::Status ForEachLogRecord(uint64_t s, const LogVisitor& v) override {
    return base_->ForEachLogRecord(s, v);
  }
  absl::Status WriteCheckpoint(const CheckpointWrite& c) override {
    return base_->WriteCheckpoint(c);
  }
  absl::Status ForEachCheckpoint(uint64_t s,
                                 const CheckpointVisitor& v) override {
    return base_->ForEachCheckpoint(s, v);
  }
  absl::Status SyncWal() override { return base_->SyncWal(); }
  StorageStats Stats() override { return base_->Stats(); }

 private:
  std::unique_ptr<Store> base_;
  // Written by the test thread only while the writer is idle (after a
  // Flush), read by the writer thread.
  absl::Status fail_next_;
};

class SpillWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    absl::StatusOr<std::unique_ptr<Store>> store =
        Store::Open(Store::Options(), dir_.path());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::make_unique<FailingStore>(std::move(*store));
    rng_.seed(TestSeed());
  }

  void StartWriter(SpillWriter::Options options = SpillWriter::Options()) {
    absl::StatusOr<std::unique_ptr<SpillWriter>> writer =
        SpillWriter::Start(options, store_.get());
    ASSERT_TRUE(writer.ok()) << writer.status();
    writer_ = std::move(*writer);
  }

  // A batch of `n` random pages (all of one size) of session `seq`, layer
  // 0, heads 0..n-1.
  SpillBatch Batch(uint64_t seq, int n, uint64_t page_seq = 0) {
    SpillBatch batch;
    for (int h = 0; h < n; ++h) {
      batch.pages.push_back({PageId{seq, 0, uint32_t(h), page_seq},
                             Share(RandomPage(rng_, 256, 16))});
    }
    return batch;
  }

  // Whether every page of `batch` reads back from the store bit for bit.
  ::testing::AssertionResult Stored(const SpillBatch& batch) {
    for (const SpillBatch::Entry& e : batch.pages) {
      absl::StatusOr<std::vector<SpillPage>> got = store_->ReadPages(
          e.id.session_seq, e.id.layer, e.id.kv_head, {e.id.page_seq});
      if (!got.ok()) return ::testing::AssertionFailure() << got.status();
      ::testing::AssertionResult same = SamePage(got->at(0), *e.page);
      if (!same) return same;
    }
    return ::testing::AssertionSuccess();
  }

  absl::StatusCode StoredCode(const PageId& id) {
    return store_
        ->ReadPages(id.session_seq, id.layer, id.kv_head, {id.page_seq})
        .status()
        .code();
  }

  kvmem::testing::TempDir dir_;
  std::unique_ptr<FailingStore> store_;
  std::unique_ptr<SpillWriter> writer_;  // destroyed before store_
  std::mt19937_64 rng_;
};

TEST_F(SpillWriterTest, LookupReadsQueuedPagesUntilTheyAreWritten) {
  StartWriter();
  writer_->PauseForTesting();
  SpillBatch batch = Batch(1, 3);
  std::vector<absl::Status> done;
  ASSERT_TRUE(writer_
                  ->Enqueue(batch, {},
                            [&](const absl::Status& st) { done.push_back(st); })
                  .ok());
  // Held back: RocksDB does not have the pages, the queue does.
  for (const SpillBatch::Entry& e : batch.pages) {
    EXPECT_EQ(writer_->Lookup(e.id), e.page);  // the same shared page
    EXPECT_EQ(StoredCode(e.id), absl::StatusCode::kNotFound);
  }
  EXPECT_EQ(writer_->Lookup(PageId{1, 0, 7, 0}), nullptr);
  EXPECT_EQ(writer_->stats().queued_batches, 1u);
  EXPECT_GT(writer_->stats().queued_bytes, 0u);
  writer_->ResumeForTesting();
  ASSERT_TRUE(writer_->Flush().ok());
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(done[0].ok()) << done[0];
  for (const SpillBatch::Entry& e : batch.pages) {
    EXPECT_EQ(writer_->Lookup(e.id), nullptr);
  }
  EXPECT_TRUE(Stored(batch));
  EXPECT_EQ(writer_->stats().queued_bytes, 0u);
}

TEST_F(SpillWriterTest, LookupReturnsTheNewestQueuedCopy) {
  StartWriter();
  writer_->PauseForTesting();
  SpillBatch older = Batch(2, 1), newer = Batch(2, 1);
  ASSERT_TRUE(writer_->Enqueue(older, {}).ok());
  ASSERT_TRUE(writer_->Enqueue(newer, {}).ok());
  EXPECT_EQ(writer_->Lookup(older.pages[0].id), newer.pages[0].page);
  writer_->ResumeForTesting();
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_EQ(writer_->Lookup(older.pages[0].id), nullptr);
  EXPECT_TRUE(Stored(newer));
}

TEST_F(SpillWriterTest, WaitingBatchesAreGroupedIntoOneWriteInOrder) {
  StartWriter();
  writer_->PauseForTesting();
  std::vector<int> order;
  std::vector<SpillBatch> batches;
  for (int i = 0; i < 5; ++i) {
    batches.push_back(Batch(3, 2, uint64_t(i)));
    ASSERT_TRUE(writer_
                    ->Enqueue(batches.back(), Sync(i == 2),
                              [&order, i](const absl::Status& st) {
                                EXPECT_TRUE(st.ok()) << st;
                                order.push_back(i);
                              })
                    .ok());
  }
  writer_->ResumeForTesting();
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(writer_->stats().writes, 1u);
  EXPECT_EQ(writer_->stats().written_batches, 5u);
  for (const SpillBatch& b : batches) EXPECT_TRUE(Stored(b));
}

TEST_F(SpillWriterTest, GroupsStayWithinMaxGroupBytes) {
  SpillBatch probe = Batch(4, 1);
  SpillWriter::Options options;
  options.max_group_bytes = 2 * probe.MemoryBytes();  // two batches a write
  StartWriter(options);
  writer_->PauseForTesting();
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(writer_->Enqueue(Batch(4, 1, uint64_t(i)), {}).ok());
  }
  writer_->ResumeForTesting();
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_EQ(writer_->stats().writes, 3u);  // 2 + 2 + 1
}

TEST_F(SpillWriterTest, EnqueueBlocksWhileTheQueueIsFull) {
  SpillBatch first = Batch(5, 2), second = Batch(5, 2, 1);
  SpillWriter::Options options;
  options.max_queued_bytes = first.MemoryBytes();  // room for one batch
  StartWriter(options);
  writer_->PauseForTesting();
  ASSERT_TRUE(writer_->Enqueue(first, {}).ok());
  std::atomic<bool> returned{false};
  absl::Status second_status = absl::UnknownError("not run");
  std::thread producer([&] {
    second_status = writer_->Enqueue(second, {});
    returned = true;
  });
  writer_->AwaitBlockedEnqueuersForTesting(1);
  // Blocked: not queued, not visible.
  EXPECT_FALSE(returned.load());
  EXPECT_EQ(writer_->Lookup(second.pages[0].id), nullptr);
  EXPECT_LE(writer_->stats().queued_bytes, options.max_queued_bytes);
  writer_->ResumeForTesting();  // the first write frees the room
  producer.join();
  EXPECT_TRUE(second_status.ok()) << second_status;
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_TRUE(Stored(first));
  EXPECT_TRUE(Stored(second));
}

TEST_F(SpillWriterTest, FullQueueTimesOutWithResourceExhausted) {
  SpillBatch first = Batch(6, 2), second = Batch(6, 2, 1);
  SpillWriter::Options options;
  options.max_queued_bytes = first.MemoryBytes() + 1;
  StartWriter(options);
  writer_->PauseForTesting();
  ASSERT_TRUE(writer_->Enqueue(first, {}).ok());
  bool called = false;
  auto done = [&](const absl::Status&) { called = true; };
  for (absl::Duration timeout : {absl::ZeroDuration(), absl::Milliseconds(5)}) {
    absl::Status st = writer_->Enqueue(second, WithTimeout(timeout), done);
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_NE(st.message().find("max_queued_bytes"), absl::string_view::npos)
        << st;
  }
  EXPECT_EQ(writer_->Lookup(second.pages[0].id), nullptr);
  writer_->ResumeForTesting();
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_FALSE(called);  // a refused batch never completes
  EXPECT_EQ(StoredCode(second.pages[0].id), absl::StatusCode::kNotFound);
  EXPECT_EQ(writer_->stats().written_batches, 1u);
}

TEST_F(SpillWriterTest, BatchLargerThanTheBoundEntersAnEmptyQueue) {
  SpillWriter::Options options;
  options.max_queued_bytes = 1;
  StartWriter(options);
  SpillBatch big = Batch(7, 4);
  ASSERT_TRUE(writer_->Enqueue(big, Sync(true)).ok());
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_TRUE(Stored(big));
}

TEST_F(SpillWriterTest, InvalidBatchIsRefusedWhole) {
  StartWriter();
  SpillBatch batch = Batch(8, 2);
  SpillPage bad = *batch.pages[1].page;
  bad.values.pop_back();
  batch.pages[1].page = Share(bad);
  absl::Status st = writer_->Enqueue(batch, {});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_EQ(writer_->Lookup(batch.pages[0].id), nullptr);
  EXPECT_EQ(writer_->stats().queued_batches, 0u);
}

TEST_F(SpillWriterTest, FailedWriteFailsItsBatchesAndTheWriterGoesOn) {
  StartWriter();
  SpillBatch lost = Batch(9, 2), kept = Batch(9, 2, 1);
  store_->FailNextWrite(absl::UnavailableError("injected: disk on fire"));
  absl::Status lost_status;
  ASSERT_TRUE(
      writer_
          ->Enqueue(lost, {}, [&](const absl::Status& st) { lost_status = st; })
          .ok());
  absl::Status flushed = writer_->Flush();
  EXPECT_EQ(flushed.code(), absl::StatusCode::kUnavailable) << flushed;
  EXPECT_EQ(lost_status, flushed);
  EXPECT_EQ(writer_->Lookup(lost.pages[0].id), nullptr);
  EXPECT_EQ(StoredCode(lost.pages[0].id), absl::StatusCode::kNotFound);
  // Later batches are written; a later Flush does not repeat the old error.
  absl::Status kept_status = absl::UnknownError("not run");
  ASSERT_TRUE(
      writer_
          ->Enqueue(kept, {}, [&](const absl::Status& st) { kept_status = st; })
          .ok());
  EXPECT_TRUE(writer_->Flush().ok());
  EXPECT_TRUE(kept_status.ok()) << kept_status;
  EXPECT_TRUE(Stored(kept));
  EXPECT_EQ(writer_->stats().failed_batches, 1u);
  EXPECT_EQ(writer_->stats().written_batches, 1u);
}

// A real RocksDB failure: a file-size limit (RLIMIT_FSIZE) below the WAL's
// next append makes the write fail with EFBIG, deterministically.
TEST_F(SpillWriterTest, RocksDbWriteErrorIsUnavailableAndWritesNothing) {
  StartWriter();
  SpillBatch before = Batch(10, 2);
  ASSERT_TRUE(writer_->Enqueue(before, Sync(true)).ok());
  ASSERT_TRUE(writer_->Flush().ok());
  SpillBatch failing;  // 4 pages of 512 KiB: past a 1 MiB limit
  for (uint32_t h = 0; h < 4; ++h) {
    failing.pages.push_back(
        {PageId{10, 1, h, 0}, Share(RandomPage(rng_, 16384, 16))});
  }
  struct rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct sigaction ignore = {}, old_action;
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &old_action), 0);
  struct rlimit limit = old_limit;
  limit.rlim_cur = 1 << 20;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  absl::Status callback_status;
  absl::Status enqueued = writer_->Enqueue(
      failing, {}, [&](const absl::Status& st) { callback_status = st; });
  absl::Status flushed = writer_->Flush();
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  ASSERT_EQ(sigaction(SIGXFSZ, &old_action, nullptr), 0);
  ASSERT_TRUE(enqueued.ok()) << enqueued;
  EXPECT_EQ(flushed.code(), absl::StatusCode::kUnavailable) << flushed;
  EXPECT_NE(flushed.message().find("File too large"), absl::string_view::npos)
      << flushed;
  EXPECT_EQ(callback_status, flushed);
  // The writer still runs and answers later batches. RocksDB 7.8 treats a
  // failed WAL append as fatal: every later write fails with the same cause
  // (Resume() refuses) until the database is reopened.
  SpillBatch later = Batch(10, 1, 5);
  absl::Status later_status = absl::UnknownError("not run");
  ASSERT_TRUE(writer_
                  ->Enqueue(later, {},
                            [&](const absl::Status& st) { later_status = st; })
                  .ok());
  absl::Status flushed_later = writer_->Flush();
  EXPECT_EQ(flushed_later, later_status);
  EXPECT_EQ(later_status.code(), absl::StatusCode::kUnavailable)
      << later_status;
  EXPECT_EQ(writer_->stats().failed_batches, 2u);
  // After a reopen: what was written before is intact, the failed batch
  // left nothing (pages or digests).
  writer_.reset();
  store_.reset();
  absl::StatusOr<std::unique_ptr<Store>> reopened =
      Store::Open(Store::Options(), dir_.path());
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  store_ = std::make_unique<FailingStore>(std::move(*reopened));
  EXPECT_TRUE(Stored(before));
  EXPECT_EQ(StoredCode(failing.pages[0].id), absl::StatusCode::kNotFound);
  absl::StatusOr<Store::SpillCounts> counts = store_->CountSpilled(10);
  ASSERT_TRUE(counts.ok()) << counts.status();
  EXPECT_EQ(counts->pages, 2u);
  // Reopened, the store takes writes again.
  ASSERT_TRUE(store_->WriteSpill(later, true).ok());
  EXPECT_TRUE(Stored(later));
}

TEST_F(SpillWriterTest, DestructorWritesWhatIsStillQueued) {
  StartWriter();
  writer_->PauseForTesting();
  SpillBatch batch = Batch(11, 3);
  absl::Status status = absl::UnknownError("not run");
  ASSERT_TRUE(writer_
                  ->Enqueue(batch, Sync(true),
                            [&](const absl::Status& st) { status = st; })
                  .ok());
  writer_.reset();
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_TRUE(Stored(batch));
}

TEST_F(SpillWriterTest, ConcurrentProducersUnderATightBound) {
  SpillBatch probe = Batch(12, 2);
  SpillWriter::Options options;
  options.max_queued_bytes = 3 * probe.MemoryBytes();
  StartWriter(options);
  constexpr int kThreads = 4, kBatches = 25;
  std::vector<std::vector<SpillBatch>> batches(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kBatches; ++i) {
      batches[t].push_back(Batch(100 + t, 2, uint64_t(i)));
    }
  }
  std::atomic<int> completed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (const SpillBatch& b : batches[t]) {
        EXPECT_TRUE(writer_
                        ->Enqueue(b, {},
                                  [&](const absl::Status& st) {
                                    EXPECT_TRUE(st.ok()) << st;
                                    ++completed;
                                  })
                        .ok());
        // Read-your-writes from the producer's side, whatever the timing.
        std::shared_ptr<const SpillPage> queued =
            writer_->Lookup(b.pages[0].id);
        if (queued == nullptr) {
          EXPECT_EQ(StoredCode(b.pages[0].id), absl::StatusCode::kOk);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(writer_->Flush().ok());
  EXPECT_EQ(completed.load(), kThreads * kBatches);
  for (const auto& per_thread : batches) {
    for (const SpillBatch& b : per_thread) EXPECT_TRUE(Stored(b));
  }
}

TEST(SpillWriterOptions, BadOptionsNameTheField) {
  SpillWriter::Options options;
  options.max_queued_bytes = 0;
  absl::Status st = options.Validate();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("max_queued_bytes"), absl::string_view::npos);
  EXPECT_EQ(SpillWriter::Start(SpillWriter::Options(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem::storage
