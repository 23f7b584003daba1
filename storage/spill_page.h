// The stored form of one spilled page of one stream (session, layer, KV
// head): up to P tokens that left the resident set, in eviction order, with
// their original positions, key and value rows, and the page digest.
//
// Body layout (all integers and floats little-endian; the store frames the
// body with a CRC-32C, storage/checksum.h):
//   [format u8 = kSpillPageFormat]
//   [tokens u32][row_bytes u32][digest_floats u32]
//   [positions: tokens × i64]
//   [keys:   tokens × row_bytes]   raw bytes in the session's dtype
//   [values: tokens × row_bytes]
//   [digest: digest_floats × f32]  the engine's [2, D]: low row, high row
// Storage treats rows and digest as opaque: decoding returns them bit for
// bit (NaN payloads included).
//
// The digest record (the `digests` column family) repeats the digest with
// the page's token count and stored size, so that the in-memory digests and
// the spill counts can be rebuilt on open without reading any page:
//   [format u8][tokens u32][page_bytes u64][digest_floats u32][digest f32…]
//
// Plain values: thread-compatible.
#ifndef KVMEM_STORAGE_SPILL_PAGE_H_
#define KVMEM_STORAGE_SPILL_PAGE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvmem::storage {

inline constexpr uint8_t kSpillPageFormat = 1;
// Bounds that keep a malformed header from asking for absurd sizes.
inline constexpr uint32_t kMaxPageTokens = 1u << 16;
inline constexpr uint32_t kMaxRowBytes = 1u << 20;
inline constexpr uint32_t kMaxDigestFloats = 1u << 20;

// The address of one spilled page: stream and page sequence number.
struct PageId {
  uint64_t session_seq = 0;
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint64_t page_seq = 0;

  friend bool operator==(const PageId& a, const PageId& b) {
    return a.session_seq == b.session_seq && a.layer == b.layer &&
           a.kv_head == b.kv_head && a.page_seq == b.page_seq;
  }
  friend bool operator!=(const PageId& a, const PageId& b) { return !(a == b); }
  template <typename H>
  friend H AbslHashValue(H h, const PageId& id) {
    return H::combine(std::move(h), id.session_seq, id.layer, id.kv_head,
                      id.page_seq);
  }
};

// "page 3 of session #5 layer 1 kv_head 2", for messages.
std::string DescribePage(const PageId& id);

// One spilled page's contents.
struct SpillPage {
  uint32_t row_bytes = 0;          // bytes of one key (= one value) row
  std::vector<int64_t> positions;  // [tokens] original positions
  std::string keys;                // [tokens, row_bytes]
  std::string values;              // [tokens, row_bytes]
  std::vector<float> digest;       // opaque to storage; engine: [2, D] fp32

  size_t tokens() const { return positions.size(); }
  // Host memory the page holds, bytes (what queues and caches count).
  size_t MemoryBytes() const;
  // OK when the sizes agree: 1 ≤ tokens ≤ kMaxPageTokens, 1 ≤ row_bytes ≤
  // kMaxRowBytes, keys and values tokens × row_bytes bytes each, digest ≤
  // kMaxDigestFloats floats. Otherwise INVALID_ARGUMENT naming the field
  // and the numbers.
  absl::Status Validate() const;
};

// Encodes a page that passed Validate() (the caller checks).
std::string EncodeSpillPage(const SpillPage& page);

// The same body in parts, for writers that avoid copying the rows:
// EncodeSpillPage(page) == head + page.keys + page.values + tail.
struct SpillPageParts {
  std::string head;  // format, sizes, positions
  std::string tail;  // digest
};
SpillPageParts EncodeSpillPageParts(const SpillPage& page);

// Decodes a page body. DATA_LOSS naming `what` (e.g. the page's address)
// when the body is truncated, has trailing bytes, an unknown format or
// sizes out of range. Never reads past `body`.
absl::StatusOr<SpillPage> DecodeSpillPage(absl::string_view body,
                                          absl::string_view what);

// What the digests column family keeps of one page.
struct DigestRecord {
  uint32_t tokens = 0;      // tokens in the page
  uint64_t page_bytes = 0;  // size of the stored (framed) page value
  std::vector<float> digest;
};

std::string EncodeDigestRecord(const DigestRecord& record);

// DATA_LOSS naming `what` when malformed, as DecodeSpillPage.
absl::StatusOr<DigestRecord> DecodeDigestRecord(absl::string_view body,
                                                absl::string_view what);

// The pages one step (or several) spills, of any streams. A page is shared
// (shared_ptr) by the engine that built it, the SpillWriter's queue until
// it is written, callers of SpillWriter::Lookup and the PageCache; it is
// immutable once shared.
// One applied step of one (session, layer) in the step log: opaque bytes
// encoded by the engine, replayed after a crash.
struct LogRecord {
  uint64_t session_seq = 0;
  uint32_t layer = 0;
  int64_t position = 0;  // of the step's first token
  std::string body;
};

// What one step writes in one atomic batch: the pages its evictions sealed
// and its log records.
struct SpillBatch {
  struct Entry {
    PageId id;
    std::shared_ptr<const SpillPage> page;  // never null
  };
  std::vector<Entry> pages;
  std::vector<LogRecord> log;

  // Sum of the pages' MemoryBytes() and the log bodies' sizes.
  size_t MemoryBytes() const;
  // OK when every page is non-null and valid; INVALID_ARGUMENT naming
  // `pages[i]` and the page otherwise.
  absl::Status Validate() const;
};

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_SPILL_PAGE_H_
