// CRC-32C (Castagnoli) of stored values, and the frame every stored value
// carries: [version u8][crc32c of body, u32 LE][body]. Thread-safe.
#ifndef KVMEM_STORAGE_CHECKSUM_H_
#define KVMEM_STORAGE_CHECKSUM_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvmem::storage {

inline constexpr uint8_t kFrameVersion = 1;

// CRC-32C of `bytes`, continuing from `crc` (0 to start). Uses the CPU's
// crc32 instruction where there is one (x86-64 with SSE4.2).
uint32_t Crc32c(absl::string_view bytes, uint32_t crc = 0);

// The table-driven CRC-32C that Crc32c falls back to; same results.
uint32_t Crc32cPortable(absl::string_view bytes, uint32_t crc = 0);

// Returns the framed value of `body`.
std::string FrameValue(absl::string_view body);

// The 5-byte frame header of a body whose CRC-32C is `body_crc`: for
// writers that frame a body held in several parts without joining them.
std::string FrameHeader(uint32_t body_crc);

// Returns the body of a framed value. DATA_LOSS naming `what` when the
// value is short, of an unknown version, or fails its checksum. The view
// borrows from `framed`.
absl::StatusOr<absl::string_view> UnframeValue(absl::string_view framed,
                                               absl::string_view what);

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_CHECKSUM_H_
