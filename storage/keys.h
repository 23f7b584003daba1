// Key encodings of the store. Big-endian integers, so that RocksDB's
// bytewise order is numeric order: one session is one key range, and one
// stream's pages are one contiguous sub-range in page order.
#ifndef KVMEM_STORAGE_KEYS_H_
#define KVMEM_STORAGE_KEYS_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace kvmem::storage {

inline void AppendBigEndian64(uint64_t v, std::string* out) {
  for (int i = 7; i >= 0; --i) out->push_back(char((v >> (8 * i)) & 0xff));
}

inline void AppendBigEndian32(uint32_t v, std::string* out) {
  for (int i = 3; i >= 0; --i) out->push_back(char((v >> (8 * i)) & 0xff));
}

// Reads 8 big-endian bytes at `at`; the caller checks the length.
inline uint64_t ReadBigEndian64(absl::string_view bytes, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | uint8_t(bytes[at + i]);
  return v;
}

// Reads 4 big-endian bytes at `at`; the caller checks the length.
inline uint32_t ReadBigEndian32(absl::string_view bytes, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | uint8_t(bytes[at + i]);
  return v;
}

// [seq]: the prefix of every key of one session.
inline std::string SessionKey(uint64_t seq) {
  std::string key;
  AppendBigEndian64(seq, &key);
  return key;
}

// [seq][layer][kv_head][page_seq]: one spilled page of one stream.
inline std::string PageKey(uint64_t seq, uint32_t layer, uint32_t kv_head,
                           uint64_t page_seq) {
  std::string key = SessionKey(seq);
  AppendBigEndian32(layer, &key);
  AppendBigEndian32(kv_head, &key);
  AppendBigEndian64(page_seq, &key);
  return key;
}

inline constexpr size_t kPageKeyBytes = 24;

// [seq][layer][position]: one logged step. Positions are ≥ 0, so their
// big-endian bytes sort numerically.
inline std::string LogKey(uint64_t seq, uint32_t layer, int64_t position) {
  std::string key = SessionKey(seq);
  AppendBigEndian32(layer, &key);
  AppendBigEndian64(uint64_t(position), &key);
  return key;
}
inline constexpr size_t kLogKeyBytes = 20;

// [seq][layer][kv_head]: one stream's checkpoint.
inline std::string CheckpointKey(uint64_t seq, uint32_t layer,
                                 uint32_t kv_head) {
  std::string key = SessionKey(seq);
  AppendBigEndian32(layer, &key);
  AppendBigEndian32(kv_head, &key);
  return key;
}
inline constexpr size_t kCheckpointKeyBytes = 16;

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_KEYS_H_
