// A stream's checkpoint: the cascade bit for bit, the open spilled page and
// the next page number, as little-endian fields with a format byte.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "service/engine/field_codec.h"
#include "service/engine/stream_state.h"

namespace kvmem {
namespace {

// Little-endian fields of a checkpoint body.
constexpr uint8_t kCheckpointFormat = 1;

}  // namespace

std::string StreamState::EncodeCheckpoint() const {
  FieldWriter w;
  w.Put<uint8_t>(kCheckpointFormat);
  CascadeStream::Snapshot snap = cascade_.Export();
  w.Put(snap.tokens_seen);
  w.Put(snap.score_exponent);
  w.PutVector(snap.positions);
  w.PutVector(snap.scores);
  w.PutVector(snap.keys);
  w.PutVector(snap.values);
  w.PutVector(snap.stored);
  w.PutVector(snap.head);
  w.Put(next_page_seq_);
  w.Put(spilled_tokens_);
  w.PutVector(open_.positions);
  w.PutBytes(open_.keys);
  w.PutBytes(open_.values);
  w.PutVector(open_.digest);
  return w.Take();
}

absl::StatusOr<StreamState> StreamState::Restore(const StreamConfig* config,
                                                 absl::string_view body) {
  FieldReader r(body);
  uint8_t format = 0;
  CascadeStream::Snapshot snap;
  const uint64_t slots =
      config->cascade.sinks +
      uint64_t(config->cascade.cascades) * uint64_t(config->cascade.window);
  const uint64_t row = uint64_t(config->row_bytes());
  uint64_t next_page = 0;
  int64_t spilled = 0;
  std::vector<int64_t> open_positions;
  std::vector<float> open_digest;
  bool ok =
      r.Get(&format) && format == kCheckpointFormat &&
      r.Get(&snap.tokens_seen) && r.Get(&snap.score_exponent) &&
      r.GetVector(&snap.positions, slots) && r.GetVector(&snap.scores, slots) &&
      r.GetVector(&snap.keys, slots * row) &&
      r.GetVector(&snap.values, slots * row) && r.GetVector(&snap.stored, 64) &&
      r.GetVector(&snap.head, 64) && r.Get(&next_page) && r.Get(&spilled) &&
      r.GetVector(&open_positions, uint64_t(config->page_tokens));
  std::string k_bytes, v_bytes;
  ok = ok && r.GetBytes(&k_bytes) && r.GetBytes(&v_bytes) &&
       r.GetVector(&open_digest, uint64_t(kDigestRows) * config->head_dim) &&
       r.Done() && k_bytes.size() == open_positions.size() * row &&
       v_bytes.size() == k_bytes.size();
  if (!ok) {
    return absl::DataLossError(absl::StrCat(
        "stream checkpoint of ", body.size(),
        " bytes is malformed or does not fit the session's policy"));
  }
  absl::StatusOr<CascadeStream> cascade = CascadeStream::Import(
      config->cascade, config->row_bytes(), std::move(snap));
  if (!cascade.ok()) {
    return absl::DataLossError(
        absl::StrCat("stream checkpoint: ", cascade.status().message()));
  }
  StreamState stream(config, std::move(*cascade));
  std::vector<int> all(size_t(stream.cascade_.num_slots()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = int(i);
  stream.RefreshDigests(all);
  stream.next_page_seq_ = next_page;
  stream.spilled_tokens_ = spilled;
  stream.open_.positions = std::move(open_positions);
  stream.open_.keys = std::move(k_bytes);
  stream.open_.values = std::move(v_bytes);
  stream.open_.digest = std::move(open_digest);
  stream.RecountSpillBytes();
  return stream;
}

}  // namespace kvmem
