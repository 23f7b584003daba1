// The decode-step policy of selection.md on the CUDA device, for streams
// whose state lives there (service/engine/device_backend.h § device-owned
// layers): the candidates of each stream (always-in tokens, resident pages
// with their fresh tokens and Quest scores, spilled pages the host lists),
// the mapping of a selection to pool rows, the scatter of the attention's
// probabilities back to slots, and the refresh of the digests of pages
// whose slots changed. Together with select_pages.h, decode_attention.h and
// cascade_update.h they make one decode step of a whole batch in a fixed
// number of launches, with the CPU oracle's arithmetic:
// - scores: page_score.h's QuestHeadBound, the same fixed lanes, MAX over
//   the group (StreamState::Select), so equal to the host's bit for bit;
// - digests: std::min / std::max over the page's occupied rows in slot
//   order, as cpu::ComputePageDigest.
// ABSOLUTE digests (no CACHE_RANK) and pages of at most 64 tokens only.
// Thread-safe (no state); every launch is asynchronous on the caller's
// stream, validates its shape (INVALID_ARGUMENT naming the field) and
// reports launch errors (INTERNAL with file:line).
#ifndef KVMEM_KERNELS_CUDA_DECODE_POLICY_H_
#define KVMEM_KERNELS_CUDA_DECODE_POLICY_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvmem::cuda {

inline constexpr int kMaxPolicyPageTokens = 64;  // a page's fresh mask
inline constexpr int kMaxPolicyGroup = 8;
inline constexpr int kMaxPolicyHeadDim = 256;
// Row ids of a selection (SelectPages compacts ids, not pool rows): stream
// b's resident slot s is b·slots + s (below kSpilledIdBase); token j of
// spilled candidate i (numbered across the batch) is kSpilledIdBase +
// i·64 + j; the step's new token is kNewTokenId.
inline constexpr int32_t kSpilledIdBase = int32_t{1} << 30;
inline constexpr int32_t kNewTokenId = -1;

struct DecodePolicyShape {
  int streams = 0;  // B ≥ 1, with B · slots() < kSpilledIdBase
  int sinks = 0;    // S ≥ 0
  int cascades = 1;
  int window = 1;       // W, a multiple of page_tokens
  int page_tokens = 1;  // P, 1..64
  int recent_tokens = 0;
  int group = 1;               // G, 1..8
  int head_dim = 0;            // D, 1..256
  DType dtype = DType::kBf16;  // of queries and keys

  KVMEM_HD int slots() const { return sinks + cascades * window; }
  KVMEM_HD int sink_pages() const {
    return (sinks + page_tokens - 1) / page_tokens;
  }
  KVMEM_HD int cascade_pages() const {
    return cascades * (window / page_tokens);
  }
  KVMEM_HD int pages() const { return sink_pages() + cascade_pages(); }
  // Always-in ids a stream may have: sinks, recent, the new token.
  KVMEM_HD int always_capacity() const { return sinks + recent_tokens + 1; }
  absl::Status Validate() const;
};

// One stream's device state, as the policy kernels read it (the layout of
// CascadeStream: positions −1 = empty; stored/head per cascade).
struct PolicyStreamPointers {
  const int64_t* positions = nullptr;  // [slots]
  const int32_t* stored = nullptr;     // [C]
  const int32_t* head = nullptr;       // [C]
  const int32_t* slot_rows = nullptr;  // [slots] pool row of each slot
  float* digests = nullptr;            // [pages, 2, D] fp32: sink pages, then
                                       // each cascade's pages in slot order
  // The stream's sealed spilled pages' digests, [sealed, 2, D] fp32 in
  // sequence (uploaded once each: a sealed page never changes).
  const float* sealed_digests = nullptr;
  // The spill ring: the rows of the stream's last `ring_tokens` spilled
  // tokens stay on the device, spilled token n at ring index n mod
  // ring_tokens (a multiple of the page), in pool row ring_rows[index]
  // with its position in ring_positions[index]. 0: no ring.
  int ring_tokens = 0;
  const int32_t* ring_rows = nullptr;  // [ring_tokens]
  int64_t* ring_positions = nullptr;   // [ring_tokens]
};

// Step 1: each stream's candidates, in the order of selection.md step 4's
// ties: its cascade pages in slot order (every one, a page without fresh
// tokens with 0 of them, which the fill never takes), then its spilled
// pages (sealed by sequence, P tokens each; then the open one, if any).
struct PlanCandidatesArgs {
  const PolicyStreamPointers* streams = nullptr;  // [B]
  const void* queries = nullptr;                  // [B, G, D] dtype
  // Spilled candidates of the batch are numbered 0..: stream b's are
  // spilled_begin[b] + [0, sealed_count[b] + (open_tokens[b] > 0)).
  const int32_t* spilled_begin = nullptr;  // [B]
  const int32_t* sealed_count = nullptr;   // [B]
  const int32_t* open_tokens = nullptr;    // [B] 0..P−1
  const float* open_digests = nullptr;     // [B, 2, D] fp32
  // Where stream b's candidates go: candidate_begin[b] + [0,
  // cascade_pages + its spilled candidates) of the four arrays below.
  const int32_t* candidate_begin = nullptr;  // [B]
  float* scores = nullptr;
  int32_t* fresh_tokens = nullptr;
  int32_t* first_id = nullptr;     // id of the page's first slot / token
  uint64_t* fresh_mask = nullptr;  // bit j: id first_id + j is fresh
  // [B, always_capacity] ids, count in always_in_count[b] (the new token
  // last, always).
  int32_t* always_in_ids = nullptr;
  int32_t* always_in_count = nullptr;
  // The most candidates a stream of the batch has (sizes the grid: a block
  // scores 32 of one stream's candidates).
  int max_candidates = 0;
};
absl::Status PlanDecodeCandidates(const DecodePolicyShape& shape,
                                  const PlanCandidatesArgs& args,
                                  cudaStream_t stream);

// Step 2: the ids SelectPages compacted, as pool rows for DecodeAttention
// and, per row, the slot it came from (−1: spilled, −2: the new token).
struct MapRowsArgs {
  const PolicyStreamPointers* streams = nullptr;  // [B]
  const int32_t* ids = nullptr;     // [B, capacity] from SelectPages
  const int32_t* counts = nullptr;  // [B]
  int capacity = 0;                 // ids per stream (the budget)
  // Spilled ids: stream b's spilled page p (candidate spilled_begin[b] +
  // p) from page ring_first[b] on is in the stream's ring (null
  // ring_first: none is); the rows of other taken candidates are staged,
  // candidate i's token j at staging index spilled_stage[i] + j, which is
  // pool row staged_rows[that] (entries of candidates not taken, or in
  // the ring, are not read).
  const int32_t* spilled_begin = nullptr;   // [B]
  const int32_t* ring_first = nullptr;      // [B]
  const int32_t* spilled_stage = nullptr;   // [spilled candidates]
  const int32_t* staged_rows = nullptr;     // [staged]
  const int32_t* new_token_rows = nullptr;  // [B]
  int32_t* pool_rows = nullptr;             // [B, capacity]
  int32_t* row_slots = nullptr;             // [B, capacity]
  // FETCH: also each row's original position ([B, capacity]), from the
  // slot's position, staged_positions (indexed like staged_rows) or
  // new_token_positions [B]. Null: not written (then the two inputs may be
  // null too).
  int64_t* row_positions = nullptr;
  const int64_t* staged_positions = nullptr;
  const int64_t* new_token_positions = nullptr;
};
absl::Status MapSelectedRows(const DecodePolicyShape& shape,
                             const MapRowsArgs& args, cudaStream_t stream);

// FETCH: each stream's rows in ascending original position (selection.md
// § FETCH), out of place: `rows`/`positions` [B, capacity] (as
// MapSelectedRows wrote them, `counts` of them) into `sorted_rows` /
// `sorted_positions`. Positions are distinct within a stream. capacity ≤
// kMaxSortRows.
inline constexpr int kMaxSortRows = 2048;
struct SortRowsArgs {
  const int32_t* rows = nullptr;
  const int64_t* positions = nullptr;
  const int32_t* counts = nullptr;  // [B]
  int capacity = 0;
  int32_t* sorted_rows = nullptr;
  int64_t* sorted_positions = nullptr;
};
absl::Status SortRowsByPosition(const DecodePolicyShape& shape,
                                const SortRowsArgs& args, cudaStream_t stream);

// Step 3: the attention's group-reduced probabilities per slot for
// UpdateCascades: slot_probs [B, slots] (every element written: 0 where
// not attended) and self_probs [B] (the new token's).
struct ScatterProbsArgs {
  const int32_t* row_slots = nullptr;  // as MapSelectedRows wrote them
  const int32_t* counts = nullptr;     // [B]
  int capacity = 0;
  const float* reduced_probs = nullptr;  // [B, capacity]
  float* slot_probs = nullptr;
  float* self_probs = nullptr;
};
absl::Status ScatterSlotProbs(const DecodePolicyShape& shape,
                              const ScatterProbsArgs& args,
                              cudaStream_t stream);

// After UpdateCascades (or InsertChunks): each stream's evicted tokens
// into its ring, rows and positions, token e at index (ring_index[b] + e)
// mod ring_tokens (only the last ring_tokens of them); ring_index[b] −1:
// not kept.
struct KeepEvictedArgs {
  const PolicyStreamPointers* streams = nullptr;  // [B]
  // Stream b's evicted tokens are rows b·rows_per_stream + [0, count):
  // count = evicted_counts[b], or, without counts (a decode step), one
  // when evicted_positions[b] ≥ 0.
  int rows_per_stream = 1;
  const int32_t* evicted_counts = nullptr;     // [B] or null
  const int64_t* evicted_positions = nullptr;  // [B, rows_per_stream]
  const void* evicted_keys = nullptr;          // [B, rows_per_stream, D]
  const void* evicted_values = nullptr;        // dtype, as the keys
  const int32_t* ring_index = nullptr;         // [B]
  void* key_rows = nullptr;                    // the pool's planes
  void* value_rows = nullptr;
};
absl::Status KeepEvictedInRings(const DecodePolicyShape& shape,
                                const KeepEvictedArgs& args,
                                cudaStream_t stream);

// Step 4 (after UpdateCascades): the digests of the pages holding the
// changed slots, recomputed from their occupied rows. Pages left with no
// occupied slot keep their old digest (never a candidate with fresh
// tokens, as on the host, where it is marked absent).
struct RefreshDigestsArgs {
  const PolicyStreamPointers* streams = nullptr;  // [B]
  const void* key_rows = nullptr;                 // the pool's key plane
  const int32_t* changed_slots = nullptr;         // [B, C] as UpdateCascades
  const int32_t* changed_counts = nullptr;        // [B]
  // Entries a stream of changed_slots: C (0) after a decode step, T·C
  // after a chunk (kernels/cuda/chunk_insert.h).
  int changed_capacity = 0;
};
absl::Status RefreshChangedDigests(const DecodePolicyShape& shape,
                                   const RefreshDigestsArgs& args,
                                   cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DECODE_POLICY_H_
