// One stream (session, layer, KV head) on the CPU backend: its cascade
// (kernels/cascade_policy.h), the digests of its resident pages, and the
// pages of tokens that left the cascade (spilled; kept in host memory until
// storage takes them). A step here is selection.md end to end: select,
// attend, update scores, insert, spill.
//
// Not thread-safe: the session's lock serialises steps of its streams.
#ifndef KVMEM_SERVICE_ENGINE_STREAM_STATE_H_
#define KVMEM_SERVICE_ENGINE_STREAM_STATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cascade_policy.h"
#include "kernels/page_digest.h"
#include "kernels/rotary.h"
#include "service/engine/session_config.h"
#include "service/engine/step_types.h"

namespace kvmem {

// What every stream of one session shares, derived once from its config.
struct StreamConfig {
  CascadeParams cascade;
  int head_dim = 0;
  int group = 1;  // G = Hq / H
  DType dtype = DType::kBf16;
  int page_tokens = 16;
  int budget_tokens = 2048;
  int recent_tokens = 16;
  float softmax_scale = 1;
  ScoreReduction reduction = ScoreReduction::kMax;
  bool recall = true;
  bool cache_rank = false;
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
  std::vector<double> inv_freq;  // CACHE_RANK: [rotated_dims / 2] rad/pos
  DigestKind digest_kind;

  int row_bytes() const { return head_dim * DTypeBytes(dtype); }
  // INVALID_ARGUMENT when the session's rotary parameters are unusable.
  static absl::StatusOr<StreamConfig> FromSession(const SessionConfig& config);
};

// A page of tokens that left the cascade, in eviction order.
struct SpilledPage {
  std::vector<int64_t> positions;  // [n ≤ P], original positions
  std::string keys;                // [n, D] session dtype
  std::string values;              // [n, D]
  std::vector<float> digest;       // [2, D]
};

// One step's inputs for this stream: T tokens.
struct StreamStepInput {
  int64_t position = 0;
  int num_tokens = 1;
  absl::Span<const float> queries;   // [T, G, D] fp32; empty in APPEND
  absl::Span<const uint8_t> keys;    // [T, D] session dtype
  absl::Span<const uint8_t> values;  // [T, D]
};

// One step's outputs for this stream.
struct StreamStepOutput {
  std::vector<float> out;  // ATTEND: [T, G, D] fp32
  std::vector<float> lse;  // ATTEND: [T, G]
  FetchedHead fetched;     // FETCH
};

class StreamState {
 public:
  // `config` must outlive the stream (the session owns both).
  static absl::StatusOr<StreamState> Create(const StreamConfig* config);

  // Applies one step. `mode` decides what is computed into *output; with
  // queries absent (APPEND without q) the step adds no attention to the
  // scores. Steps of T > 1 attend densely and causally (no budget, no
  // recall). FAILED_PRECONDITION if input.position is not tokens_seen();
  // INVALID_ARGUMENT on sizes. On error nothing changes.
  absl::Status Step(StepMode mode, bool dense_layer,
                    const StreamStepInput& input, StreamStepOutput* output);

  int64_t tokens_seen() const { return cascade_.tokens_seen(); }
  int resident_tokens() const { return cascade_.ResidentCount(); }
  int64_t spilled_tokens() const { return spilled_tokens_; }
  // Host bytes this stream holds: its cascade and digests (fixed at
  // creation) and its spilled pages (growing).
  int64_t memory_bytes() const { return FixedBytes(*config_) + spilled_bytes_; }
  // Bytes a new stream of `config` holds before any token.
  static int64_t FixedBytes(const StreamConfig& config);
  // At most the bytes one step of `tokens` tokens adds to a stream.
  static int64_t StepGrowthBytes(const StreamConfig& config, int tokens);
  const std::vector<SpilledPage>& spilled_pages() const { return spilled_; }
  const CascadeStream& cascade() const { return cascade_; }

 private:
  // A token the step attends to, and where it comes from.
  struct Attended {
    int64_t position;
    int slot;         // resident slot, or −1
    int spill_page;   // spilled page index, or −1
    int spill_index;  // row within that page
  };

  StreamState(const StreamConfig* config, CascadeStream cascade);
  int num_resident_pages() const { return int(page_first_slot_.size()); }
  // Recomputes the digests of the resident pages holding `slots`.
  void RefreshDigests(absl::Span<const int> slots);
  // Appends evicted tokens to the open spilled page, sealing full ones.
  void Spill(const EvictedTokens& evicted);
  // selection.md for one decode query: the attended tokens, ascending.
  std::vector<Attended> SelectForDecode(absl::Span<const float> queries,
                                        bool dense_layer) const;
  std::vector<Attended> AllResident() const;
  // Key and value row bytes of `a`.
  const uint8_t* KeyRow(const Attended& a) const;
  const uint8_t* ValueRow(const Attended& a) const;

  const StreamConfig* config_;  // not owned
  CascadeStream cascade_;
  // Resident pages: sink pages, then each cascade's pages, as slot ranges.
  std::vector<int> page_first_slot_;
  std::vector<int> page_slots_;
  std::vector<int> slot_page_;            // [num_slots] → page
  std::vector<float> page_digests_;       // [pages, 2, D]
  std::vector<uint8_t> page_has_digest_;  // [pages]
  std::vector<SpilledPage> spilled_;      // the last one may be open (< P)
  int64_t spilled_tokens_ = 0;
  int64_t spilled_bytes_ = 0;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_STREAM_STATE_H_
