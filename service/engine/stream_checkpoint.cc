// A stream's checkpoint: the cascade bit for bit, the open spilled page and
// the next page number, as little-endian fields with a format byte.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "service/engine/stream_state.h"

namespace kvmem {
namespace {

// Little-endian fields of a checkpoint body.
constexpr uint8_t kCheckpointFormat = 1;

template <typename T>
void Put(std::string* out, const T& v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename T>
void PutVector(std::string* out, const std::vector<T>& v) {
  Put<uint64_t>(out, v.size());
  out->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}
  template <typename T>
  bool Get(T* v) {
    if (in_.size() - at_ < sizeof(T)) return false;
    memcpy(v, in_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return true;
  }
  template <typename T>
  bool GetVector(std::vector<T>* v, uint64_t max_elems) {
    uint64_t n;
    if (!Get(&n) || n > max_elems || (in_.size() - at_) / sizeof(T) < n) {
      return false;
    }
    v->resize(n);
    if (n > 0) memcpy(v->data(), in_.data() + at_, n * sizeof(T));
    at_ += n * sizeof(T);
    return true;
  }
  bool Done() const { return at_ == in_.size(); }

 private:
  absl::string_view in_;
  size_t at_ = 0;
};

}  // namespace

std::string StreamState::EncodeCheckpoint() const {
  std::string out;
  Put<uint8_t>(&out, kCheckpointFormat);
  CascadeStream::Snapshot snap = cascade_.Export();
  Put(&out, snap.tokens_seen);
  Put(&out, snap.score_exponent);
  PutVector(&out, snap.positions);
  PutVector(&out, snap.scores);
  PutVector(&out, snap.keys);
  PutVector(&out, snap.values);
  PutVector(&out, snap.stored);
  PutVector(&out, snap.head);
  Put(&out, next_page_seq_);
  Put(&out, spilled_tokens_);
  PutVector(&out, open_.positions);
  Put<uint64_t>(&out, open_.keys.size());
  out.append(open_.keys);
  Put<uint64_t>(&out, open_.values.size());
  out.append(open_.values);
  PutVector(&out, open_.digest);
  return out;
}

absl::StatusOr<StreamState> StreamState::Restore(const StreamConfig* config,
                                                 absl::string_view body) {
  Reader r(body);
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
  std::vector<uint8_t> k_bytes, v_bytes;
  ok = ok && r.GetVector(&k_bytes, open_positions.size() * row) &&
       r.GetVector(&v_bytes, open_positions.size() * row) &&
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
  stream.open_.keys.assign(k_bytes.begin(), k_bytes.end());
  stream.open_.values.assign(v_bytes.begin(), v_bytes.end());
  stream.open_.digest = std::move(open_digest);
  stream.RecountSpillBytes();
  return stream;
}

}  // namespace kvmem
