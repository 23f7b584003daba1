// The RocksDB database of one kvmem server: session manifests now; spilled
// pages, digests, checkpoints and the step log as the storage work lands.
// Nothing above storage/ sees RocksDB types.
//
// Layout (column families; every key starts with the session's 64-bit
// sequence number, big-endian, so one session is one ordered range and one
// stream's pages are a contiguous sub-range):
//   default      meta: `next_session_seq`
//   manifests    [seq]                          → engine-encoded manifest
//   pages        [seq][layer][kv_head][page]    → spilled page
//   digests      [seq][layer][kv_head][page]    → page digest record
//                (formats in storage/spill_page.h)
//   checkpoints  [seq][layer][kv_head]          → resident set (later)
//   steplog      [seq][layer][position]         → logged step (later)
// Every value is framed with a version byte and a CRC-32C verified on read
// (storage/checksum.h).
//
// Errors: RocksDB NotFound → NOT_FOUND, Corruption or a failed checksum →
// DATA_LOSS, I/O errors and a full disk → UNAVAILABLE, anything else →
// INTERNAL; each message names the operation and RocksDB's cause. After a
// failed WAL append (disk full, I/O error) RocksDB 7.8 refuses every later
// write with that cause until the store is reopened; what was written
// before stays intact and a failed write leaves nothing behind.
//
// Thread-safe: every method may be called concurrently.
#ifndef KVMEM_STORAGE_STORE_H_
#define KVMEM_STORAGE_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "storage/spill_page.h"

namespace kvmem::storage {

class Store {
 public:
  struct Options {
    // Create the database (and its column families) if missing.
    bool create_if_missing = true;
    // Memtable size per column family, bytes. Large values (KV pages) fill
    // memtables fast; 64 MiB keeps flushes infrequent. Range 1 MiB..4 GiB.
    size_t write_buffer_bytes = size_t{64} << 20;
    // Shared LRU block cache, bytes. ≥ 0.
    size_t block_cache_bytes = size_t{256} << 20;
    // Block size of the page column family, bytes: a 16-token page of 8 KV
    // heads × 128 × bf16 is 64 KiB, so one page is about one block.
    // Range 4 KiB..4 MiB.
    size_t page_block_bytes = size_t{64} << 10;

    // INVALID_ARGUMENT naming the field when out of range.
    absl::Status Validate() const;
  };

  // Opens (or creates) the database in directory `dir`. INVALID_ARGUMENT:
  // bad options. UNAVAILABLE: the directory cannot be used (with RocksDB's
  // cause, e.g. a lock held by another server). DATA_LOSS: corruption.
  static absl::StatusOr<std::unique_ptr<Store>> Open(const Options& options,
                                                     const std::string& dir);
  virtual ~Store() = default;

  // Reserves a fresh session sequence number, never handed out before by
  // this database (persisted; survives restarts).
  virtual absl::StatusOr<uint64_t> NewSessionSeq() = 0;

  // Writes session `seq`'s manifest, replacing any earlier one. With `sync`
  // the write is on disk when this returns. On error nothing is written.
  virtual absl::Status PutManifest(uint64_t seq, absl::string_view body,
                                   bool sync) = 0;

  // Reads session `seq`'s manifest. NOT_FOUND if absent; DATA_LOSS if its
  // checksum fails.
  virtual absl::StatusOr<std::string> GetManifest(uint64_t seq) = 0;

  // Calls `visit(seq, body)` for every manifest in seq order; stops at and
  // returns the first non-OK status `visit` returns. DATA_LOSS names the
  // session whose manifest fails its checksum.
  using ManifestVisitor =
      std::function<absl::Status(uint64_t seq, absl::string_view body)>;
  virtual absl::Status ForEachManifest(const ManifestVisitor& visit) = 0;

  // Removes every key of session `seq` in every column family in one atomic
  // write (range deletions; compaction reclaims the space). Removing an
  // absent session is OK. On error nothing is removed.
  virtual absl::Status DeleteSession(uint64_t seq, bool sync) = 0;

  // Bytes on disk of live SST files and of memtables (approximate).
  virtual uint64_t ApproximateBytes() = 0;

  // Figures for /metrics.
  struct StorageStats {
    uint64_t live_bytes = 0;          // as ApproximateBytes()
    uint64_t bytes_written = 0;       // since open, WAL and memtables
    uint64_t stall_micros = 0;        // writes held back by RocksDB, total
    bool write_stopped = false;       // writes are stopped right now
    uint64_t delayed_write_rate = 0;  // bytes/s while writes are delayed
  };
  virtual StorageStats Stats() = 0;

  // Writes every page of `batch` (pages family) and its DigestRecord
  // (digests family, same key) in one atomic write, replacing pages stored
  // under the same ids. With `sync` the write is on disk when this returns.
  // INVALID_ARGUMENT names `pages[i]` failing SpillBatch::Validate();
  // UNAVAILABLE (I/O error, full disk), DATA_LOSS or INTERNAL carry
  // RocksDB's cause. On error nothing is written. An empty batch is OK.
  virtual absl::Status WriteSpill(const SpillBatch& batch, bool sync) = 0;

  // WriteSpill of several batches (none null) in one atomic write: the
  // SpillWriter's group commit. INVALID_ARGUMENT names `batches[b].pages[i]`.
  virtual absl::Status WriteSpillGroup(
      absl::Span<const SpillBatch* const> batches, bool sync) = 0;

  // Reads pages `page_seqs` of stream (seq, layer, kv_head) with one
  // MultiGet, each checksum-verified; result i is page_seqs[i]. NOT_FOUND
  // names the first missing page; DATA_LOSS names a page that fails its
  // checksum or format; UNAVAILABLE / INTERNAL with RocksDB's cause. On
  // error no page is returned.
  virtual absl::StatusOr<std::vector<SpillPage>> ReadPages(
      uint64_t seq, uint32_t layer, uint32_t kv_head,
      absl::Span<const uint64_t> page_seqs) = 0;

  // Calls `visit(id, record)` for every spilled page of session `seq`, in
  // key order (layer, kv_head, page_seq), reading digests only: how the
  // in-memory digests are rebuilt on open. Stops at and returns the first
  // non-OK status of `visit`. DATA_LOSS names a page whose digest record
  // fails its checksum; UNAVAILABLE / INTERNAL for scan errors. `record`
  // lives for the call only.
  using DigestVisitor =
      std::function<absl::Status(const PageId& id, const DigestRecord& record)>;
  virtual absl::Status ForEachDigest(uint64_t seq,
                                     const DigestVisitor& visit) = 0;

  // Spilled pages, tokens and stored page bytes of session `seq`, summed
  // over its digest records (a ForEachDigest scan; no page is read). Errors
  // as ForEachDigest. An absent session has zero counts.
  struct SpillCounts {
    uint64_t pages = 0;
    uint64_t tokens = 0;
    uint64_t page_bytes = 0;
  };
  virtual absl::StatusOr<SpillCounts> CountSpilled(uint64_t seq) = 0;

  // Calls `visit(layer, position, body)` for every logged step of session
  // `seq` (SpillBatch::log), in (layer, position) order. DATA_LOSS names a
  // record failing its checksum; stops at `visit`'s first error.
  using LogVisitor = std::function<absl::Status(
      uint32_t layer, int64_t position, absl::string_view body)>;
  virtual absl::Status ForEachLogRecord(uint64_t seq,
                                        const LogVisitor& visit) = 0;

  // A session's checkpoint: its manifest and every stream's state.
  struct StreamRecord {
    uint32_t layer = 0;
    uint32_t kv_head = 0;
    std::string body;  // engine-encoded
  };
  struct CheckpointWrite {
    uint64_t seq = 0;
    std::string manifest;
    std::vector<StreamRecord> streams;
  };
  // In one synced write: replaces the manifest, writes every stream record,
  // and deletes the session's step log (the checkpoint covers it). On error
  // nothing is written.
  virtual absl::Status WriteCheckpoint(const CheckpointWrite& checkpoint) = 0;

  // Calls `visit(layer, kv_head, body)` for every stream record of session
  // `seq`'s checkpoint, in key order. DATA_LOSS names a record failing its
  // checksum.
  using CheckpointVisitor = std::function<absl::Status(
      uint32_t layer, uint32_t kv_head, absl::string_view body)>;
  virtual absl::Status ForEachCheckpoint(uint64_t seq,
                                         const CheckpointVisitor& visit) = 0;

  // Makes every write so far durable (fsync of the write-ahead log): how
  // ASYNC steps become durable every --wal_sync_ms.
  virtual absl::Status SyncWal() = 0;
};

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_STORE_H_
