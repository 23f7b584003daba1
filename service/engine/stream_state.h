// One stream (session, layer, KV head) on the CPU backend: its cascade
// (kernels/cascade_policy.h), the digests of its resident pages, and its
// spilled pages: the open one in memory, sealed ones in storage with their
// digests here. A step is selection.md end to end, in two parts so that
// everything that can fail (reading recalled pages) happens before anything
// changes: Select (const), then Apply (cannot fail on checked inputs).
//
// Not thread-safe: the session's lock serialises steps of its streams.
#ifndef KVMEM_SERVICE_ENGINE_STREAM_STATE_H_
#define KVMEM_SERVICE_ENGINE_STREAM_STATE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cascade_policy.h"
#include "kernels/page_digest.h"
#include "kernels/rotary.h"
#include "service/engine/session_config.h"
#include "service/engine/step_types.h"
#include "storage/spill_page.h"

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

// A sealed spilled page: in storage, its digest here.
struct SealedPageRef {
  uint64_t page_seq = 0;
  int tokens = 0;
  std::vector<float> digest;  // [2, D]
};

// One step's inputs for this stream: T tokens.
struct StreamStepInput {
  int64_t position = 0;
  int num_tokens = 1;
  absl::Span<const float> queries;   // [T, G, D] fp32; empty: no attention
  absl::Span<const uint8_t> keys;    // [T, D] session dtype
  absl::Span<const uint8_t> values;  // [T, D]
};

// What a decode step attends to, chosen before anything changes.
struct StreamSelection {
  std::vector<int> slots;        // resident slots, ascending
  bool open_page = false;        // the open spilled page
  std::vector<uint64_t> recall;  // sealed pages to read, ascending
};

// One row a step attends to, ascending by original position: resident
// slot `slot` ≥ 0, or row `row` of a spilled page (`page` indexes the
// step's recalled pages; −1 is the open page).
struct AttendedRow {
  int64_t position = 0;
  int slot = -1;
  int page = 0;
  int row = 0;
};

// A decode step's attention computed by another backend (the CUDA one)
// over AttendedRows() then the new token, for Apply to use instead of its
// own (in CACHE_RANK, with keys and queries rotated to RotaryPositions).
// T = 1 with a query only.
struct ExternalAttention {
  std::vector<AttendedRow> rows;  // AttendedRows() of this step
  std::vector<float> out;         // [G, D]
  std::vector<float> lse;         // [G]
  std::vector<float> probs;       // [rows + 1]: each row's group-reduced prob
};

// One step's outputs for this stream.
struct StreamStepOutput {
  std::vector<float> out;  // ATTEND: [T, G, D] fp32
  std::vector<float> lse;  // ATTEND: [T, G]
  FetchedHead fetched;     // FETCH
  // Pages the step's evictions sealed, for the step's write batch.
  std::vector<std::shared_ptr<const storage::SpillPage>> sealed;
  std::vector<uint64_t> sealed_seqs;  // their page numbers
  std::vector<int> changed_slots;     // slots whose rows changed, ascending
};

class StreamState {
 public:
  // `config` must outlive the stream (the session owns both).
  static absl::StatusOr<StreamState> Create(const StreamConfig* config);
  // The stream a checkpoint body describes (EncodeCheckpoint); sealed
  // pages are added by the caller (AddSealedPage). DATA_LOSS when `body`
  // is malformed or does not fit `config`.
  static absl::StatusOr<StreamState> Restore(const StreamConfig* config,
                                             absl::string_view body);

  // The selection of a step (selection.md). T > 1 or no query: every
  // resident token (dense, causal), nothing recalled. INVALID_ARGUMENT on
  // sizes; FAILED_PRECONDITION if input.position is not tokens_seen().
  absl::StatusOr<StreamSelection> Select(bool dense_layer,
                                         const StreamStepInput& input) const;

  // What a step with `selection` attends to (before the new tokens).
  std::vector<AttendedRow> AttendedRows(
      const StreamSelection& selection,
      absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled)
      const;
  // The key and value rows of `row` (of AttendedRows with `recalled`).
  const uint8_t* AttendedKey(
      const AttendedRow& row,
      absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled)
      const {
    return AttendedData(row, recalled, /*value=*/false);
  }
  const uint8_t* AttendedValue(
      const AttendedRow& row,
      absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled)
      const {
    return AttendedData(row, recalled, /*value=*/true);
  }

  // CACHE_RANK: the rotary position of each of `attended` (a step's
  // AttendedRows), its rank by original position among the sinks, every
  // resident token and the step's recalled tokens (selection.md §
  // Positions), and that of the step's first new token (*query_base, the
  // count of those tokens).
  std::vector<int64_t> RotaryPositions(absl::Span<const AttendedRow> attended,
                                       int64_t* query_base) const;

  // Applies the step: attends over `selection` plus the new tokens (or
  // takes `external`'s attention), updates scores, inserts, spills.
  // `recalled[i]` holds page `selection.recall[i]`. `mode` decides what
  // *output gets. INVALID_ARGUMENT if `recalled` or `external` does not
  // match; nothing changes then.
  absl::Status Apply(
      StepMode mode, const StreamStepInput& input,
      const StreamSelection& selection,
      absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled,
      StreamStepOutput* output, const ExternalAttention* external = nullptr);

  // CUDA backend, device-owned layers (device_backend.h): what the device
  // reads of this stream, and what it hands back.
  // The resident pages' digests, [pages, 2, D] fp32 (sink pages, then each
  // cascade's pages in slot order; pages without tokens hold stale values).
  absl::Span<const float> resident_digests() const { return page_digests_; }
  // Spilled pages (sealed ascending, and the open one, which may be empty).
  const std::vector<SealedPageRef>& sealed_pages() const { return sealed_; }
  const storage::SpillPage& open_page() const { return open_; }
  // Replaces the cascade with the device's (rows included) and recomputes
  // every resident digest. INVALID_ARGUMENT when `snapshot` does not fit
  // the config; nothing changes then.
  absl::Status AdoptCascade(CascadeStream::Snapshot snapshot);
  // A token the device evicted from this stream: into the open page,
  // sealing it when full (the sealed page then in *output, for the step's
  // write batch).
  void SpillEvicted(int64_t position, absl::string_view key,
                    absl::string_view value, StreamStepOutput* output);

  // State for a checkpoint: cascade bit for bit, the open spilled page and
  // the next page number. Sealed pages are in storage already.
  std::string EncodeCheckpoint() const;
  // Registers a sealed page found in storage on recovery.
  void AddSealedPage(SealedPageRef page);
  uint64_t next_page_seq() const { return next_page_seq_; }

  int64_t tokens_seen() const { return cascade_.tokens_seen(); }
  int resident_tokens() const { return cascade_.ResidentCount(); }
  int64_t spilled_tokens() const { return spilled_tokens_; }
  int64_t spilled_pages() const { return int64_t(sealed_.size()); }
  const CascadeStream& cascade() const { return cascade_; }
  // Host bytes this stream holds: its cascade and digests (fixed at
  // creation), sealed pages' digests and the open page.
  int64_t memory_bytes() const { return FixedBytes(*config_) + spill_bytes_; }
  // Bytes a new stream of `config` holds before any token.
  static int64_t FixedBytes(const StreamConfig& config);
  // At most the bytes one step of `tokens` tokens adds to a stream.
  static int64_t StepGrowthBytes(const StreamConfig& config, int tokens);

 private:
  StreamState(const StreamConfig* config, CascadeStream cascade);
  int num_resident_pages() const { return int(page_first_slot_.size()); }
  absl::Status CheckInput(const StreamStepInput& input) const;
  // spill_bytes_ from the sealed references and the open page.
  void RecountSpillBytes();
  // Recomputes the digests of the resident pages holding `slots`.
  void RefreshDigests(absl::Span<const int> slots);
  // Appends evicted tokens to the open page, sealing full ones into
  // *output.
  void Spill(const EvictedTokens& evicted, StreamStepOutput* output);
  // One token of Spill, without the recount; `key` is D floats of scratch.
  void SpillRow(int64_t position, const uint8_t* key_row,
                const uint8_t* value_row, absl::Span<float> key,
                StreamStepOutput* output);
  std::vector<int> ResidentSlots() const;
  const uint8_t* AttendedData(
      const AttendedRow& row,
      absl::Span<const std::shared_ptr<const storage::SpillPage>> recalled,
      bool value) const;

  const StreamConfig* config_;  // not owned
  CascadeStream cascade_;
  // Resident pages: sink pages, then each cascade's pages, as slot ranges.
  std::vector<int> page_first_slot_;
  std::vector<int> page_slots_;
  std::vector<int> slot_page_;            // [num_slots] → page
  std::vector<float> page_digests_;       // [pages, 2, D]
  std::vector<uint8_t> page_has_digest_;  // [pages]
  std::vector<SealedPageRef> sealed_;     // ascending page_seq
  storage::SpillPage open_;               // < P tokens; digest valid if any
  uint64_t next_page_seq_ = 0;            // of the open page
  int64_t spilled_tokens_ = 0;
  int64_t spill_bytes_ = 0;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_STREAM_STATE_H_
