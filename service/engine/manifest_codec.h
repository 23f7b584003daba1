// A session's manifest as stored: its configuration, identity and
// positions. Encoded by the engine (storage keeps opaque, checksummed bytes).
// Thread-safe (pure functions).
#ifndef KVMEM_SERVICE_ENGINE_MANIFEST_CODEC_H_
#define KVMEM_SERVICE_ENGINE_MANIFEST_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "service/engine/session_config.h"

namespace kvmem {

struct SessionManifest {
  SessionConfig config;
  uint64_t seq = 0;  // storage's session number: the prefix of its keys
  int64_t create_time_unix_micros = 0;
  // Per layer, the next position it accepts. [layers]
  std::vector<int64_t> layer_next_positions;
  int64_t durable_position = 0;
};

// The manifest's bytes; format version 1, little-endian, fields in a fixed
// order (see the .cc). Decode(Encode(m)) == m.
std::string EncodeManifest(const SessionManifest& manifest);

// DATA_LOSS when `bytes` is truncated, has trailing bytes, or has an unknown
// format version.
absl::StatusOr<SessionManifest> DecodeManifest(absl::string_view bytes);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_MANIFEST_CODEC_H_
