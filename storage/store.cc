#include "storage/store.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "base/mutex.h"
#include "base/status_macros.h"
#include "rocksdb/cache.h"
#include "rocksdb/convenience.h"
#include "rocksdb/db.h"
#include "rocksdb/statistics.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"
#include "storage/checksum.h"
#include "storage/keys.h"
#include "storage/spill_page.h"

namespace kvmem::storage {
namespace {

constexpr char kNextSessionSeqKey[] = "next_session_seq";

// Column family names, in the order of RocksStore::cf_.
enum Family {
  kDefault,
  kManifests,
  kPages,
  kDigests,
  kCheckpoints,
  kStepLog,
  kNumFamilies
};
constexpr const char* kFamilyNames[kNumFamilies] = {
    "default", "manifests", "pages", "digests", "checkpoints", "steplog"};

// RocksDB's own log goes to stderr, warnings and errors only, instead of a
// LOG file in the data directory: a LOG file that cannot be written (a full
// disk) trips an assertion in Debian's RocksDB 7.8 and aborts the server.
class StderrLogger final : public rocksdb::Logger {
 public:
  StderrLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    char line[1024];
    vsnprintf(line, sizeof(line), format, ap);
    std::fprintf(stderr, "rocksdb: %s\n", line);
  }
};

// The one place RocksDB statuses become absl statuses.
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view op) {
  if (s.ok()) return absl::OkStatus();
  std::string msg = absl::StrCat(op, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsIOError() || s.IsNoSpace() || s.IsBusy() || s.IsTimedOut() ||
      s.IsTryAgain()) {
    return absl::UnavailableError(msg);
  }
  return absl::InternalError(msg);
}

absl::string_view View(const rocksdb::Slice& s) {
  return absl::string_view(s.data(), s.size());
}

// Stages one page and its digest record into `batch`. The page value is
// framed in parts (frame header, head, keys, values, tail) so that the rows
// are copied once, into the batch.
absl::Status StagePage(const SpillBatch::Entry& entry,
                       rocksdb::ColumnFamilyHandle* pages,
                       rocksdb::ColumnFamilyHandle* digests,
                       rocksdb::WriteBatch* batch) {
  const SpillPage& page = *entry.page;
  const PageId& id = entry.id;
  const std::string key =
      PageKey(id.session_seq, id.layer, id.kv_head, id.page_seq);
  SpillPageParts parts = EncodeSpillPageParts(page);
  uint32_t crc = Crc32c(parts.head);
  crc = Crc32c(page.keys, crc);
  crc = Crc32c(page.values, crc);
  crc = Crc32c(parts.tail, crc);
  const std::string header = FrameHeader(crc);
  const rocksdb::Slice value_parts[] = {header, parts.head, page.keys,
                                        page.values, parts.tail};
  const rocksdb::Slice key_slice(key);
  KVMEM_RETURN_IF_ERROR(
      FromRocks(batch->Put(pages, rocksdb::SliceParts(&key_slice, 1),
                           rocksdb::SliceParts(value_parts, 5)),
                absl::StrCat("stage ", DescribePage(id))));
  DigestRecord record;
  record.tokens = uint32_t(page.tokens());
  record.page_bytes = header.size() + parts.head.size() + page.keys.size() +
                      page.values.size() + parts.tail.size();
  record.digest = page.digest;
  return FromRocks(
      batch->Put(digests, key, FrameValue(EncodeDigestRecord(record))),
      absl::StrCat("stage digest of ", DescribePage(id)));
}

class RocksStore final : public Store {
 public:
  RocksStore(std::unique_ptr<rocksdb::DB> db,
             std::vector<rocksdb::ColumnFamilyHandle*> cf, uint64_t next_seq,
             std::shared_ptr<rocksdb::Statistics> statistics)
      : db_(std::move(db)),
        cf_(std::move(cf)),
        statistics_(std::move(statistics)),
        next_seq_(next_seq) {}

  ~RocksStore() override {
    for (rocksdb::ColumnFamilyHandle* h : cf_) {
      db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    }
    // Close flushes nothing we need (the WAL is durable); its status is
    // only informative at shutdown.
    db_->Close().PermitUncheckedError();
  }

  absl::StatusOr<uint64_t> NewSessionSeq() override {
    MutexLock lock(&seq_mu_);
    uint64_t seq = next_seq_;
    std::string value;
    AppendBigEndian64(seq + 1, &value);
    rocksdb::WriteOptions wo;
    wo.sync = true;  // a seq must never be handed out twice, even after a crash
    KVMEM_RETURN_IF_ERROR(FromRocks(
        db_->Put(wo, cf_[kDefault], kNextSessionSeqKey, FrameValue(value)),
        "store next_session_seq"));
    next_seq_ = seq + 1;
    return seq;
  }

  absl::Status PutManifest(uint64_t seq, absl::string_view body,
                           bool sync) override {
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    return FromRocks(
        db_->Put(wo, cf_[kManifests], SessionKey(seq), FrameValue(body)),
        absl::StrCat("write manifest of session #", seq));
  }

  absl::StatusOr<std::string> GetManifest(uint64_t seq) override {
    std::string framed;
    std::string what = absl::StrCat("manifest of session #", seq);
    KVMEM_RETURN_IF_ERROR(
        FromRocks(db_->Get(rocksdb::ReadOptions(), cf_[kManifests],
                           SessionKey(seq), &framed),
                  absl::StrCat("read ", what)));
    KVMEM_ASSIGN_OR_RETURN(absl::string_view body, UnframeValue(framed, what));
    return std::string(body);
  }

  absl::Status ForEachManifest(const ManifestVisitor& visit) override {
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    std::unique_ptr<rocksdb::Iterator> it(
        db_->NewIterator(ro, cf_[kManifests]));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      rocksdb::Slice key = it->key();
      if (key.size() != 8) {
        return absl::DataLossError(
            absl::StrCat("manifest key of ", key.size(), " bytes, want 8"));
      }
      uint64_t seq = ReadBigEndian64(absl::string_view(key.data(), 8), 0);
      KVMEM_ASSIGN_OR_RETURN(
          absl::string_view body,
          UnframeValue(
              absl::string_view(it->value().data(), it->value().size()),
              absl::StrCat("manifest of session #", seq)));
      KVMEM_RETURN_IF_ERROR(visit(seq, body));
    }
    return FromRocks(it->status(), "scan manifests");
  }

  absl::Status DeleteSession(uint64_t seq, bool sync) override {
    rocksdb::WriteBatch batch;
    std::string begin = SessionKey(seq);
    std::string end = SessionKey(seq + 1);
    for (int f = kManifests; f < kNumFamilies; ++f) {
      KVMEM_RETURN_IF_ERROR(FromRocks(batch.DeleteRange(cf_[f], begin, end),
                                      "stage session range deletion"));
    }
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    KVMEM_RETURN_IF_ERROR(
        Written(db_->Write(wo, &batch), absl::StrCat("delete session #", seq)));
    // Reclaim the space now rather than whenever compaction reaches the
    // range: a deleted session's pages can be gigabytes. The deletion is
    // already durable, so a failure here only delays the reclaim.
    rocksdb::Slice from(begin), to(end);
    for (int f = kPages; f < kNumFamilies; ++f) {
      db_->CompactRange(rocksdb::CompactRangeOptions(), cf_[f], &from, &to)
          .PermitUncheckedError();
    }
    return absl::OkStatus();
  }

  StorageStats Stats() override {
    StorageStats stats;
    stats.live_bytes = ApproximateBytes();
    uint64_t v = 0;
    if (db_->GetIntProperty(rocksdb::DB::Properties::kIsWriteStopped, &v)) {
      stats.write_stopped = v != 0;
    }
    if (db_->GetIntProperty(rocksdb::DB::Properties::kActualDelayedWriteRate,
                            &v)) {
      stats.delayed_write_rate = v;
    }
    if (statistics_ != nullptr) {
      stats.bytes_written = statistics_->getTickerCount(rocksdb::BYTES_WRITTEN);
      stats.stall_micros = statistics_->getTickerCount(rocksdb::STALL_MICROS);
    }
    return stats;
  }

  absl::Status WriteSpill(const SpillBatch& batch, bool sync) override {
    const SpillBatch* one[] = {&batch};
    return WriteSpillGroup(one, sync);
  }

  absl::Status WriteSpillGroup(absl::Span<const SpillBatch* const> batches,
                               bool sync) override {
    size_t pages = 0, reserve_bytes = 0;
    for (size_t b = 0; b < batches.size(); ++b) {
      absl::Status st = batches[b]->Validate();
      if (!st.ok()) {
        return batches.size() == 1 ? st
                                   : absl::InvalidArgumentError(absl::StrCat(
                                         "batches[", b, "].", st.message()));
      }
      pages += batches[b]->pages.size();
      // Page bodies, digest records, keys and framing: one allocation.
      reserve_bytes += batches[b]->MemoryBytes() +
                       batches[b]->pages.size() * 2 * (kPageKeyBytes + 32);
    }
    size_t records = 0;
    for (const SpillBatch* batch : batches) records += batch->log.size();
    if (pages == 0 && records == 0) return absl::OkStatus();
    rocksdb::WriteBatch write(reserve_bytes);
    for (const SpillBatch* batch : batches) {
      for (const SpillBatch::Entry& entry : batch->pages) {
        KVMEM_RETURN_IF_ERROR(
            StagePage(entry, cf_[kPages], cf_[kDigests], &write));
      }
      for (const LogRecord& r : batch->log) {
        KVMEM_RETURN_IF_ERROR(FromRocks(
            write.Put(cf_[kStepLog], LogKey(r.session_seq, r.layer, r.position),
                      FrameValue(r.body)),
            "stage a step log record"));
      }
    }
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    return Written(db_->Write(wo, &write),
                   absl::StrCat("write ", pages, " spilled pages"));
  }

  absl::Status ForEachLogRecord(uint64_t seq,
                                const LogVisitor& visit) override {
    return ScanSession(kStepLog, seq, kLogKeyBytes, "step log record",
                       [&](absl::string_view key, absl::string_view body) {
                         return visit(uint32_t(ReadBigEndian32(key, 8)),
                                      int64_t(ReadBigEndian64(key, 12)), body);
                       });
  }

  absl::Status WriteCheckpoint(const CheckpointWrite& c) override {
    rocksdb::WriteBatch write;
    KVMEM_RETURN_IF_ERROR(FromRocks(
        write.Put(cf_[kManifests], SessionKey(c.seq), FrameValue(c.manifest)),
        "stage manifest"));
    for (const StreamRecord& r : c.streams) {
      KVMEM_RETURN_IF_ERROR(FromRocks(
          write.Put(cf_[kCheckpoints], CheckpointKey(c.seq, r.layer, r.kv_head),
                    FrameValue(r.body)),
          "stage checkpoint"));
    }
    KVMEM_RETURN_IF_ERROR(
        FromRocks(write.DeleteRange(cf_[kStepLog], SessionKey(c.seq),
                                    SessionKey(c.seq + 1)),
                  "stage step log truncation"));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return Written(db_->Write(wo, &write),
                   absl::StrCat("checkpoint session #", c.seq));
  }

  absl::Status ForEachCheckpoint(uint64_t seq,
                                 const CheckpointVisitor& visit) override {
    return ScanSession(kCheckpoints, seq, kCheckpointKeyBytes,
                       "checkpoint record",
                       [&](absl::string_view key, absl::string_view body) {
                         return visit(uint32_t(ReadBigEndian32(key, 8)),
                                      uint32_t(ReadBigEndian32(key, 12)), body);
                       });
  }

  absl::Status SyncWal() override {
    {
      MutexLock lock(&failure_mu_);
      // RocksDB 7.8 asserts (and may crash) when the WAL is synced after an
      // append failed; the failure is final until a reopen anyway.
      if (!failure_.ok()) return failure_;
    }
    return Written(db_->SyncWAL(), "sync the write-ahead log");
  }

  absl::StatusOr<std::vector<SpillPage>> ReadPages(
      uint64_t seq, uint32_t layer, uint32_t kv_head,
      absl::Span<const uint64_t> page_seqs) override {
    const size_t n = page_seqs.size();
    std::vector<std::string> keys(n);
    std::vector<rocksdb::Slice> key_slices(n);
    for (size_t i = 0; i < n; ++i) {
      keys[i] = PageKey(seq, layer, kv_head, page_seqs[i]);
      key_slices[i] = keys[i];
    }
    std::vector<rocksdb::PinnableSlice> values(n);
    std::vector<rocksdb::Status> statuses(n);
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    // Recalled pages are kept by the PageCache above; caching their blocks
    // here too would hold them twice.
    ro.fill_cache = false;
    db_->MultiGet(ro, cf_[kPages], n, key_slices.data(), values.data(),
                  statuses.data());
    std::vector<SpillPage> pages;
    pages.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const std::string what =
          DescribePage(PageId{seq, layer, kv_head, page_seqs[i]});
      KVMEM_RETURN_IF_ERROR(
          FromRocks(statuses[i], absl::StrCat("read ", what)));
      KVMEM_ASSIGN_OR_RETURN(absl::string_view body,
                             UnframeValue(View(values[i]), what));
      KVMEM_ASSIGN_OR_RETURN(SpillPage page, DecodeSpillPage(body, what));
      pages.push_back(std::move(page));
    }
    return pages;
  }

  absl::Status ForEachDigest(uint64_t seq,
                             const DigestVisitor& visit) override {
    const std::string begin = SessionKey(seq);
    const std::string end = SessionKey(seq + 1);
    rocksdb::Slice upper(end);
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    ro.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, cf_[kDigests]));
    for (it->Seek(begin); it->Valid(); it->Next()) {
      absl::string_view key = View(it->key());
      if (key.size() != kPageKeyBytes) {
        return absl::DataLossError(
            absl::StrCat("digest key of session #", seq, " is ", key.size(),
                         " bytes, want ", kPageKeyBytes));
      }
      const PageId id{ReadBigEndian64(key, 0), ReadBigEndian32(key, 8),
                      ReadBigEndian32(key, 12), ReadBigEndian64(key, 16)};
      const std::string what = absl::StrCat("digest of ", DescribePage(id));
      KVMEM_ASSIGN_OR_RETURN(absl::string_view body,
                             UnframeValue(View(it->value()), what));
      KVMEM_ASSIGN_OR_RETURN(DigestRecord record,
                             DecodeDigestRecord(body, what));
      KVMEM_RETURN_IF_ERROR(visit(id, record));
    }
    return FromRocks(it->status(),
                     absl::StrCat("scan digests of session #", seq));
  }

  absl::StatusOr<SpillCounts> CountSpilled(uint64_t seq) override {
    SpillCounts counts;
    KVMEM_RETURN_IF_ERROR(
        ForEachDigest(seq, [&](const PageId&, const DigestRecord& record) {
          ++counts.pages;
          counts.tokens += record.tokens;
          counts.page_bytes += record.page_bytes;
          return absl::OkStatus();
        }));
    return counts;
  }

  uint64_t ApproximateBytes() override {
    uint64_t total = 0;
    for (rocksdb::ColumnFamilyHandle* h : cf_) {
      uint64_t v = 0;
      if (db_->GetIntProperty(h, rocksdb::DB::Properties::kLiveSstFilesSize,
                              &v)) {
        total += v;
      }
      if (db_->GetIntProperty(h, rocksdb::DB::Properties::kCurSizeAllMemTables,
                              &v)) {
        total += v;
      }
    }
    return total;
  }

 private:
  // FromRocks of a write's status; an I/O failure is remembered, since
  // RocksDB refuses every later write until the database is reopened.
  absl::Status Written(const rocksdb::Status& s, absl::string_view op) {
    absl::Status st = FromRocks(s, op);
    if (!st.ok() && st.code() == absl::StatusCode::kUnavailable) {
      MutexLock lock(&failure_mu_);
      if (failure_.ok()) {
        failure_ = absl::UnavailableError(absl::StrCat(
            "storage failed earlier and needs a restart: ", st.message()));
      }
    }
    return st;
  }

  // Calls `visit(key, body)` for every key of session `seq` in `family`,
  // each of `key_bytes` bytes, bodies unframed and checked.
  absl::Status ScanSession(
      int family, uint64_t seq, size_t key_bytes, const char* what,
      const std::function<absl::Status(absl::string_view, absl::string_view)>&
          visit) {
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    const std::string end = SessionKey(seq + 1);
    rocksdb::Slice upper(end);
    ro.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, cf_[family]));
    for (it->Seek(SessionKey(seq)); it->Valid(); it->Next()) {
      absl::string_view key(it->key().data(), it->key().size());
      const std::string described = absl::StrCat(what, " of session #", seq);
      if (key.size() != key_bytes) {
        return absl::DataLossError(absl::StrCat(
            described, ": key of ", key.size(), " bytes, want ", key_bytes));
      }
      KVMEM_ASSIGN_OR_RETURN(absl::string_view body,
                             UnframeValue(absl::string_view(it->value().data(),
                                                            it->value().size()),
                                          described));
      KVMEM_RETURN_IF_ERROR(visit(key, body));
    }
    return FromRocks(it->status(), absl::StrCat("scan ", what, "s"));
  }

  const std::unique_ptr<rocksdb::DB> db_;
  const std::vector<rocksdb::ColumnFamilyHandle*> cf_;  // owned; see dtor
  // Shared with RocksDB, which counts into it.
  const std::shared_ptr<rocksdb::Statistics> statistics_;
  Mutex failure_mu_;
  absl::Status failure_ ABSL_GUARDED_BY(failure_mu_);
  Mutex seq_mu_;
  uint64_t next_seq_ ABSL_GUARDED_BY(seq_mu_);
};

rocksdb::ColumnFamilyOptions FamilyOptions(
    Family family, const Store::Options& options,
    const std::shared_ptr<rocksdb::Cache>& cache) {
  rocksdb::ColumnFamilyOptions cfo;
  cfo.write_buffer_size = options.write_buffer_bytes;
  rocksdb::BlockBasedTableOptions table;
  table.block_cache = cache;  // shared by every family: one memory budget
  if (family == kPages || family == kCheckpoints || family == kStepLog) {
    // Keys, values and queries in bf16/fp16 are near-random bytes: LZ4 would
    // spend CPU for almost nothing, so these families are stored raw.
    cfo.compression = rocksdb::kNoCompression;
    table.block_size = options.page_block_bytes;
  } else {
    const std::vector<rocksdb::CompressionType> supported =
        rocksdb::GetSupportedCompressions();
    bool has_lz4 = std::find(supported.begin(), supported.end(),
                             rocksdb::kLZ4Compression) != supported.end();
    cfo.compression =
        has_lz4 ? rocksdb::kLZ4Compression : rocksdb::kNoCompression;
  }
  cfo.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  return cfo;
}

}  // namespace

absl::Status Store::Options::Validate() const {
  if (write_buffer_bytes < (size_t{1} << 20) ||
      write_buffer_bytes > (size_t{4} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("write_buffer_bytes must be in [1 MiB, 4 GiB], got ",
                     write_buffer_bytes));
  }
  if (page_block_bytes < 4096 || page_block_bytes > (size_t{4} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page_block_bytes must be in [4 KiB, 4 MiB], got ", page_block_bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const Options& options,
                                                   const std::string& dir) {
  KVMEM_RETURN_IF_ERROR(options.Validate());
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = options.create_if_missing;
  dbo.create_missing_column_families = options.create_if_missing;
  // Steps of many sessions write concurrently; let RocksDB group them.
  dbo.enable_pipelined_write = true;
  dbo.info_log = std::make_shared<StderrLogger>();
  // Tickers for /metrics (bytes written, stall time); a few atomic adds.
  dbo.statistics = rocksdb::CreateDBStatistics();
  std::shared_ptr<rocksdb::Cache> cache =
      rocksdb::NewLRUCache(options.block_cache_bytes);
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (int f = 0; f < kNumFamilies; ++f) {
    families.emplace_back(kFamilyNames[f],
                          FamilyOptions(Family(f), options, cache));
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(dbo, dir, families, &handles, &raw);
  if (!s.ok()) {
    absl::Status st = FromRocks(s, absl::StrCat("open RocksDB in ", dir));
    // A bad path or options are the operator's to fix: say UNAVAILABLE.
    return st.code() == absl::StatusCode::kInternal
               ? absl::UnavailableError(st.message())
               : st;
  }
  std::unique_ptr<rocksdb::DB> db(raw);
  uint64_t next_seq = 1;
  std::string framed;
  s = db->Get(rocksdb::ReadOptions(), handles[kDefault], kNextSessionSeqKey,
              &framed);
  absl::Status st = absl::OkStatus();
  if (s.ok()) {
    absl::StatusOr<absl::string_view> body =
        UnframeValue(framed, kNextSessionSeqKey);
    if (!body.ok()) {
      st = body.status();
    } else if (body->size() != 8) {
      st = absl::DataLossError("next_session_seq: wrong length");
    } else {
      next_seq = ReadBigEndian64(*body, 0);
    }
  } else if (!s.IsNotFound()) {
    st = FromRocks(s, "read next_session_seq");
  }
  if (!st.ok()) {
    for (rocksdb::ColumnFamilyHandle* h : handles) {
      db->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    }
    return st;
  }
  return std::unique_ptr<Store>(new RocksStore(
      std::move(db), std::move(handles), next_seq, dbo.statistics));
}

}  // namespace kvmem::storage
