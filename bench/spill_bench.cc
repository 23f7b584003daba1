// Spill throughput: kvmem's SpillWriter (and Store::WriteSpill) against
// plain RocksDB writes of the same value sizes, measured in the same run on
// the same disk.
//
// A page is one stream's P = 16 tokens of D = 128 bf16 keys and values
// (8 KiB of rows) with its positions and [2, 128] fp32 digest; one layer's
// step over 8 KV heads spills 8 pages (64 KiB of rows). Every row writes
// the same values: per page, the framed page value into the pages family
// and the framed digest record into the digests family. The baseline opens
// a raw RocksDB with the Store's options for those two families (no
// compression and 64 KiB blocks for pages, LZ4 if built in for digests,
// 64 MiB write buffers, pipelined writes) and writes the same number of
// values of the same sizes with the same key layout.
//
// This file is a benchmark, so it uses RocksDB types outside storage/ for
// the baseline only.
//
// Prints Google Benchmark's table, then
//   workload | MB/s | baseline MB/s | ratio
// (MB = 1e6 bytes of stored values, median of the repetitions, wall time
// including the final Flush).
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "rocksdb/convenience.h"
#include "rocksdb/db.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"
#include "storage/checksum.h"
#include "storage/keys.h"
#include "storage/spill_page.h"
#include "storage/spill_writer.h"
#include "storage/store.h"

namespace kvmem::storage {
namespace {

constexpr uint32_t kTokens = 16, kHeadDim = 128, kRowBytes = kHeadDim * 2;

// A fresh directory removed with its contents at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    const char* base = getenv("TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/kvmem-bench-XXXXXX";
    if (mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::shared_ptr<const SpillPage> MakePage(std::mt19937_64& rng) {
  SpillPage page;
  page.row_bytes = kRowBytes;
  for (uint32_t t = 0; t < kTokens; ++t) page.positions.push_back(int64_t(t));
  page.keys.resize(kTokens * kRowBytes);
  page.values.resize(kTokens * kRowBytes);
  for (char& c : page.keys) c = char(rng());
  for (char& c : page.values) c = char(rng());
  page.digest.resize(2 * kHeadDim);
  for (float& f : page.digest) f = float(int(rng() % 2000) - 1000) / 256.0f;
  return std::make_shared<const SpillPage>(std::move(page));
}

// The workload: `pages_per_step` pages (sessions × 8 KV heads) per step.
struct Workload {
  int pages_per_step;
  int steps;
  bool sync;
};

// Bytes stored per page: the framed page value and framed digest record.
struct ValueSizes {
  size_t page;
  size_t digest;
};

ValueSizes SizesOf(const SpillPage& page) {
  DigestRecord record;
  record.tokens = uint32_t(page.tokens());
  record.page_bytes = 5 + EncodeSpillPage(page).size();
  record.digest = page.digest;
  return {record.page_bytes, FrameValue(EncodeDigestRecord(record)).size()};
}

PageId IdOf(int step, int i) {
  // 8 KV heads per session; the page sequence advances with the step.
  return PageId{uint64_t(1 + i / 8), 0, uint32_t(i % 8), uint64_t(step)};
}

void Report(benchmark::State& state, const Workload& w, const ValueSizes& v) {
  const double bytes = double(w.steps) * w.pages_per_step * (v.page + v.digest);
  state.counters["bytes_per_run"] = bytes;
  state.SetBytesProcessed(int64_t(bytes) * int64_t(state.iterations()));
}

std::unique_ptr<Store> OpenStore(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Store>> store =
      Store::Open(Store::Options(), dir);
  if (!store.ok()) return nullptr;
  return std::move(*store);
}

void BM_SpillWriter(benchmark::State& state, Workload w) {
  std::mt19937_64 rng(1);
  std::vector<std::shared_ptr<const SpillPage>> pages;
  for (int i = 0; i < w.pages_per_step; ++i) pages.push_back(MakePage(rng));
  for (auto _ : state) {
    state.PauseTiming();
    ScratchDir dir;
    std::unique_ptr<Store> store = OpenStore(dir.path());
    if (store == nullptr) return state.SkipWithError("open store");
    absl::StatusOr<std::unique_ptr<SpillWriter>> writer =
        SpillWriter::Start(SpillWriter::Options(), store.get());
    if (!writer.ok()) return state.SkipWithError("start writer");
    SpillWriter::EnqueueOptions options;
    options.sync = w.sync;
    state.ResumeTiming();
    for (int step = 0; step < w.steps; ++step) {
      SpillBatch batch;
      batch.pages.reserve(pages.size());
      for (int i = 0; i < w.pages_per_step; ++i) {
        batch.pages.push_back({IdOf(step, i), pages[i]});
      }
      if (!(*writer)->Enqueue(batch, options).ok()) {
        return state.SkipWithError("enqueue");
      }
    }
    if (!(*writer)->Flush().ok()) return state.SkipWithError("flush");
    state.PauseTiming();
    writer->reset();
    store.reset();
    state.ResumeTiming();
  }
  Report(state, w, SizesOf(*pages[0]));
}

void BM_StoreWriteSpill(benchmark::State& state, Workload w) {
  std::mt19937_64 rng(1);
  std::vector<std::shared_ptr<const SpillPage>> pages;
  for (int i = 0; i < w.pages_per_step; ++i) pages.push_back(MakePage(rng));
  for (auto _ : state) {
    state.PauseTiming();
    ScratchDir dir;
    std::unique_ptr<Store> store = OpenStore(dir.path());
    if (store == nullptr) return state.SkipWithError("open store");
    state.ResumeTiming();
    for (int step = 0; step < w.steps; ++step) {
      SpillBatch batch;
      for (int i = 0; i < w.pages_per_step; ++i) {
        batch.pages.push_back({IdOf(step, i), pages[i]});
      }
      if (!store->WriteSpill(batch, w.sync).ok()) {
        return state.SkipWithError("write");
      }
    }
    state.PauseTiming();
    store.reset();
    state.ResumeTiming();
  }
  Report(state, w, SizesOf(*pages[0]));
}

// Plain RocksDB with the Store's options for its pages and digests
// families (see storage/store.cc FamilyOptions).
struct PlainDb {
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> cf;  // default, pages, digests
  ~PlainDb() {
    for (rocksdb::ColumnFamilyHandle* h : cf) {
      db->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    }
    if (db != nullptr) db->Close().PermitUncheckedError();
  }
};

std::unique_ptr<PlainDb> OpenPlain(const std::string& dir) {
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  dbo.enable_pipelined_write = true;
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const char* name : {"default", "pages", "digests"}) {
    rocksdb::ColumnFamilyOptions cfo;
    cfo.write_buffer_size = size_t{64} << 20;
    rocksdb::BlockBasedTableOptions table;
    if (std::string(name) == "pages") {
      cfo.compression = rocksdb::kNoCompression;
      table.block_size = size_t{64} << 10;
    } else {
      std::vector<rocksdb::CompressionType> have =
          rocksdb::GetSupportedCompressions();
      cfo.compression = std::find(have.begin(), have.end(),
                                  rocksdb::kLZ4Compression) != have.end()
                            ? rocksdb::kLZ4Compression
                            : rocksdb::kNoCompression;
    }
    cfo.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
    families.emplace_back(name, cfo);
  }
  auto plain = std::make_unique<PlainDb>();
  rocksdb::DB* raw = nullptr;
  if (!rocksdb::DB::Open(dbo, dir, families, &plain->cf, &raw).ok()) {
    return nullptr;
  }
  plain->db.reset(raw);
  return plain;
}

// `batched`: one WriteBatch per step; otherwise one Put per value.
void BM_Plain(benchmark::State& state, Workload w, bool batched) {
  std::mt19937_64 rng(1);
  const ValueSizes sizes = SizesOf(*MakePage(rng));
  std::vector<std::string> page_values, digest_values;
  for (int i = 0; i < w.pages_per_step; ++i) {
    page_values.emplace_back(sizes.page, '\0');
    for (char& c : page_values.back()) c = char(rng());
    digest_values.emplace_back(sizes.digest, '\0');
    for (char& c : digest_values.back()) c = char(rng());
  }
  for (auto _ : state) {
    state.PauseTiming();
    ScratchDir dir;
    std::unique_ptr<PlainDb> plain = OpenPlain(dir.path());
    if (plain == nullptr) return state.SkipWithError("open plain RocksDB");
    rocksdb::WriteOptions wo;
    wo.sync = w.sync;
    state.ResumeTiming();
    for (int step = 0; step < w.steps; ++step) {
      rocksdb::WriteBatch batch;
      for (int i = 0; i < w.pages_per_step; ++i) {
        const PageId id = IdOf(step, i);
        const std::string key =
            PageKey(id.session_seq, id.layer, id.kv_head, id.page_seq);
        if (batched) {
          batch.Put(plain->cf[1], key, page_values[i]).PermitUncheckedError();
          batch.Put(plain->cf[2], key, digest_values[i]).PermitUncheckedError();
        } else if (!plain->db->Put(wo, plain->cf[1], key, page_values[i])
                        .ok() ||
                   !plain->db->Put(wo, plain->cf[2], key, digest_values[i])
                        .ok()) {
          return state.SkipWithError("put");
        }
      }
      if (batched && !plain->db->Write(wo, &batch).ok()) {
        return state.SkipWithError("write");
      }
    }
    state.PauseTiming();
    plain.reset();
    state.ResumeTiming();
  }
  Report(state, w, sizes);
}

// Collects each run's wall-clock MB/s while printing the usual table.
class TableReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration || run.error_occurred) continue;
      auto it = run.counters.find("bytes_per_run");
      if (it == run.counters.end() || run.real_accumulated_time <= 0) continue;
      mbps_[run.run_name.function_name].push_back(
          double(it->second) * double(run.iterations) /
          run.real_accumulated_time / 1e6);
    }
    ConsoleReporter::ReportRuns(runs);
  }

  double Median(const std::string& name) const {
    auto it = mbps_.find(name);
    if (it == mbps_.end() || it->second.empty()) return 0;
    std::vector<double> v = it->second;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }

 private:
  std::map<std::string, std::vector<double>> mbps_;
};

struct Row {
  std::string workload, measured, baseline;
};

}  // namespace
}  // namespace kvmem::storage

int main(int argc, char** argv) {
  using namespace kvmem::storage;
  benchmark::Initialize(&argc, argv);
  const Workload step8{8, 2048, false}, step512{512, 32, false},
      sync8{8, 512, true};
  std::vector<Row> rows;
  auto add = [](const std::string& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)
        ->Iterations(1)
        ->Repetitions(5)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  };
  add("writer/8pages_async", BM_SpillWriter, step8);
  add("store/8pages_async", BM_StoreWriteSpill, step8);
  add("plain_batch/8pages_async", BM_Plain, step8, true);
  add("plain_put/8pages_async", BM_Plain, step8, false);
  add("writer/512pages_async", BM_SpillWriter, step512);
  add("plain_batch/512pages_async", BM_Plain, step512, true);
  add("writer/8pages_sync", BM_SpillWriter, sync8);
  add("plain_batch/8pages_sync", BM_Plain, sync8, true);
  rows.push_back(
      {"8 pages/step (1 layer x 8 KV heads), async: SpillWriter vs "
       "WriteBatch per step",
       "writer/8pages_async", "plain_batch/8pages_async"});
  rows.push_back({"8 pages/step, async: SpillWriter vs Put per value",
                  "writer/8pages_async", "plain_put/8pages_async"});
  rows.push_back(
      {"8 pages/step, async: Store::WriteSpill (caller's thread) "
       "vs WriteBatch per step",
       "store/8pages_async", "plain_batch/8pages_async"});
  rows.push_back(
      {"512 pages/step (64 sessions x 8 KV heads), async: "
       "SpillWriter vs WriteBatch per step",
       "writer/512pages_async", "plain_batch/512pages_async"});
  rows.push_back(
      {"8 pages/step, STEP_SYNC (every step synced): SpillWriter "
       "(group commit) vs synced WriteBatch per step",
       "writer/8pages_sync", "plain_batch/8pages_sync"});
  TableReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\n| workload | MB/s | baseline MB/s | ratio |\n");
  std::printf("| --- | ---: | ---: | ---: |\n");
  for (const Row& row : rows) {
    const double m = reporter.Median(row.measured);
    const double b = reporter.Median(row.baseline);
    std::printf("| %s | %.0f | %.0f | %.2f |\n", row.workload.c_str(), m, b,
                b > 0 ? m / b : 0.0);
  }
  benchmark::Shutdown();
  return 0;
}
