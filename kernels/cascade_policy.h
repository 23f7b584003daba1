// The cascade policy of one stream on the host (specs/cascade.md): which
// tokens stay resident, their EMA scores, and the key/value rows of every
// slot. The CPU oracle for the CUDA policy; the arithmetic is shared through
// kernels/policy_math.h. Not thread-safe: one owner per stream.
//
// Slot layout: slot s in [0, S + C·W): sinks at [0, S), cascade i at
// [S + i·W, S + (i+1)·W), a ring with `stored(i)` tokens and its oldest at
// slot S + i·W + head(i) once full. Rows are opaque bytes (row_bytes each,
// e.g. D elements of the session dtype): the policy moves them, never reads.
#ifndef KVMEM_KERNELS_CASCADE_POLICY_H_
#define KVMEM_KERNELS_CASCADE_POLICY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/policy_math.h"

namespace kvmem {

struct CascadeParams {
  int sinks = 64;           // S ≥ 0: the first S tokens, never evicted
  int cascades = 4;         // C ≥ 1: cascade i keeps 1 token in 2^i
  int window = 512;         // W ≥ 1: slots per cascade (budget S + C·W)
  bool eager_fill = true;   // all cascades accept while t − S ≤ C·W
  double beta = 0.9999999;  // EMA decay per query token, in (0, 1)
  // INVALID_ARGUMENT naming the field (e.g. "window: 0, want >= 1");
  // S + C·W must stay below 2^30 slots.
  absl::Status Validate() const;
};

// Tokens that left the resident set in one call, in eviction order.
struct EvictedTokens {
  std::vector<int64_t> positions;  // [E]
  std::vector<uint8_t> keys;       // [E, row_bytes]
  std::vector<uint8_t> values;     // [E, row_bytes]
};

// What one InsertTokens call did.
struct InsertResult {
  EvictedTokens evicted;
  std::vector<int> changed_slots;  // ascending, unique: rows now differ
};

// r[j] = reduce over g of probs[g·count + j]: probs [group, count] fp32,
// r [count]; MAX, or MEAN summed in g order then divided by group.
// INVALID_ARGUMENT on a size mismatch or group < 1.
absl::Status ReduceGroup(ScoreReduction reduction, int group,
                         absl::Span<const float> probs, absl::Span<float> r);

class CascadeStream {
 public:
  // An empty stream. INVALID_ARGUMENT names a bad params field or row_bytes.
  static absl::StatusOr<CascadeStream> Create(const CascadeParams& params,
                                              int row_bytes);

  // Step part 1 (cascade.md §3, DESIGN.md u/n form), for a step of T query
  // tokens that attended before insertion. probs [T, num_slots()]: r(q, s),
  // reduced over the group, 0 where slot s was not selected; entries of sinks
  // and empty slots are ignored. self_probs [T, T]: r(q, i) of query q on
  // the step's new token i, read for q ≥ i only. Writes initial_scores [T]:
  // each new token's u, at the scale resident u has after the call.
  // Advances n by T and renormalises (also mid-step when a factor would pass
  // 2^64). Both probs and self_probs empty: a step without attention, the
  // same as all zeros. INVALID_ARGUMENT on sizes or T < 1; then nothing
  // changes.
  absl::Status UpdateScores(int num_tokens, absl::Span<const float> probs,
                            absl::Span<const float> self_probs,
                            absl::Span<float> initial_scores);

  // Step part 2 (cascade.md §2): inserts T tokens at positions
  // first_position … +T−1, in order, with keys/values [T, row_bytes] and
  // initial_scores [T] from the UpdateScores call just before (no other
  // call in between). *result (borrowed, non-null) is overwritten with
  // every token that left the resident set, this call's own tokens included
  // (nothing is silently dropped), and the slots whose rows changed.
  // FAILED_PRECONDITION if first_position != tokens_seen(); INVALID_ARGUMENT
  // on sizes; on error nothing changes.
  absl::Status InsertTokens(int64_t first_position, int num_tokens,
                            absl::Span<const uint8_t> keys,
                            absl::Span<const uint8_t> values,
                            absl::Span<const float> initial_scores,
                            InsertResult* result);

  // The whole state, bit for bit: what a checkpoint stores.
  struct Snapshot {
    int64_t tokens_seen = 0;
    int64_t score_exponent = 0;
    std::vector<int64_t> positions;  // [num_slots]
    std::vector<float> scores;       // [num_slots] u
    std::vector<uint8_t> keys;       // [num_slots, row_bytes]
    std::vector<uint8_t> values;     // [num_slots, row_bytes]
    std::vector<int> stored;         // [C]
    std::vector<int> head;           // [C]
  };
  Snapshot Export() const;
  // The stream `snapshot` describes. INVALID_ARGUMENT (naming the field)
  // when its sizes do not fit `params` and `row_bytes`, or a cascade's
  // stored/head is out of range.
  static absl::StatusOr<CascadeStream> Import(const CascadeParams& params,
                                              int row_bytes, Snapshot snapshot);

  const CascadeParams& params() const { return params_; }
  int row_bytes() const { return row_bytes_; }
  int num_slots() const { return int(positions_.size()); }
  int64_t tokens_seen() const { return tokens_seen_; }
  int ResidentCount() const;  // sinks + cascade tokens held

  // Per slot s in [0, num_slots()): position (−1 = empty), score u, rows.
  int64_t slot_position(int s) const { return positions_[s]; }
  float slot_score(int s) const { return scores_[s]; }
  absl::Span<const uint8_t> key_row(int s) const;
  absl::Span<const uint8_t> value_row(int s) const;
  // Every slot's rows, [num_slots, row_bytes] (empty slots hold zeros).
  absl::Span<const uint8_t> all_keys() const { return keys_; }
  absl::Span<const uint8_t> all_values() const { return values_; }
  // s = u·β^n rounded to fp32 (0 for sinks and empty slots), for reports.
  float ReportedScore(int s) const;
  // n: query tokens since the last renormalisation (DESIGN.md).
  int64_t score_exponent() const { return score_exponent_; }

  int stored(int cascade) const { return stored_[cascade]; }
  int head(int cascade) const { return head_[cascade]; }
  // Cascade i's slots / positions, oldest → newest.
  std::vector<int> CascadeSlots(int cascade) const;
  std::vector<int64_t> CascadePositions(int cascade) const;

  // Occupied slots in the paper's order (cascade.md §4): sinks, then cascade
  // C−1 … 0, oldest → newest within each; this is ascending position.
  std::vector<int> ResidentSlotsInOrder() const;
  // Per slot: its rotary position in CACHE_RANK mode (rank in the order
  // above; sinks 0..S−1), −1 for empty slots. Nothing recalled.
  std::vector<int64_t> CacheRankPositions() const;

 private:
  CascadeStream(const CascadeParams& params, int row_bytes);
  // Multiplies every cascade slot's u and `pending` by β^n; n ← 0.
  void Renormalise(absl::Span<float> pending);

  CascadeParams params_;
  int row_bytes_ = 0;
  int64_t tokens_seen_ = 0;
  int64_t score_exponent_ = 0;
  std::vector<int64_t> positions_;  // [num_slots], −1 = empty
  std::vector<float> scores_;       // [num_slots] u; unused for sinks
  std::vector<uint8_t> keys_;       // [num_slots, row_bytes]
  std::vector<uint8_t> values_;     // [num_slots, row_bytes]
  std::vector<int> stored_;         // [C]
  std::vector<int> head_;           // [C]
};

}  // namespace kvmem

#endif  // KVMEM_KERNELS_CASCADE_POLICY_H_
