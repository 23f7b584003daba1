// One decode step of the cascade policy (specs/cascade.md §2–3) for a batch
// of streams on the CUDA device: the EMA score update of
// CascadeStream::UpdateScores with T = 1, then the insertion of
// CascadeStream::InsertTokens with T = 1, moving key/value rows with their
// metadata. Same arithmetic (kernels/policy_math.h, unfused, same order), so
// the state after a step equals the CPU oracle's bit for bit.
// Thread-safe (no state); asynchronous on the caller's stream.
//
// Per stream b (slots = S + C·W, laid out as in kernels/cascade_policy.h):
// metadata [B, slots] / [B, C] / [B] arrays with stream b at b·stride, and
// the key/value rows of its slots anywhere in two pools through a row table
// (slot s is pool row slot_rows[b·slots + s]), e.g. a paged layout.
#ifndef KVMEM_KERNELS_CUDA_CASCADE_UPDATE_H_
#define KVMEM_KERNELS_CUDA_CASCADE_UPDATE_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cascade_policy.h"
#include "kernels/dtype.h"

namespace kvmem::cuda {

// C above this is refused (cascade 63 already keeps 1 token in 2^63).
inline constexpr int kMaxUpdateCascades = 64;

struct CascadeBatchShape {
  int streams = 0;             // B, 1..2^31−1: one thread block each
  CascadeParams params;        // every stream's policy; cascades ≤ 64
  int head_dim = 0;            // D, 1..2^18 (rows of at most 1 MiB)
  DType dtype = DType::kBf16;  // of the pools, new rows and evicted rows
};

// INVALID_ARGUMENT naming the first bad field of `shape` (streams, the
// params, cascades above kMaxUpdateCascades, dtype, head_dim past rows of
// 1 MiB); what UpdateCascades and InsertChunks check first.
absl::Status CheckCascadeBatchShape(const CascadeBatchShape& shape);

// One stream's state wherever it lies (CascadeDeviceState::streams): the
// same arrays as below for this stream alone.
struct CascadeStreamPointers {
  int64_t* positions = nullptr;        // [slots]
  float* scores = nullptr;             // [slots]
  int32_t* stored = nullptr;           // [C]
  int32_t* head = nullptr;             // [C]
  int64_t* score_exponent = nullptr;   // [1]
  int64_t* tokens_seen = nullptr;      // [1]
  const int32_t* slot_rows = nullptr;  // [slots]
};

// A batch's state in device memory, read and written in place: the layout
// of CascadeStream::Export (positions −1 = empty, u of sinks and empty
// slots unused, stored/head per cascade). Borrowed until the stream has run
// the launch. The launcher reads none of it, so the contents are the
// caller's contract: a valid stream state (as Export gives), and
// slot_rows distinct across the batch.
struct CascadeDeviceState {
  int64_t* positions = nullptr;        // [B, slots]
  float* scores = nullptr;             // [B, slots] u (DESIGN.md u/n form)
  int32_t* stored = nullptr;           // [B, C] tokens held, 0..W
  int32_t* head = nullptr;             // [B, C] oldest slot once full, 0..W−1
  int64_t* score_exponent = nullptr;   // [B] n
  int64_t* tokens_seen = nullptr;      // [B]: the new token's position
  void* key_rows = nullptr;            // [pool_rows, D] dtype
  void* value_rows = nullptr;          // [pool_rows, D] dtype
  const int32_t* slot_rows = nullptr;  // [B, slots] pool row of each slot
  // Or, instead of the seven arrays above, [B] pointers (device memory) to
  // each stream's own: streams of different sessions in one launch. Rows
  // stay in key_rows/value_rows either way.
  const CascadeStreamPointers* streams = nullptr;
};

// INVALID_ARGUMENT unless the pools and either `streams` or every flat
// array are set (score_exponent only when `with_exponent`).
absl::Status CheckCascadeDeviceState(const CascadeDeviceState& state,
                                     bool with_exponent);

// The most attended rows a stream may pass as CascadeStepInputs::row_slots.
inline constexpr int kMaxSparseStepRows = 4096;

// The step's inputs, borrowed like the state. probs and self_probs must
// be finite and ≥ 0; unlike the CPU oracle the device does not check them.
struct CascadeStepInputs {
  // [B, slots] r(slot) reduced over the group, 0 where not selected;
  // entries of sinks and empty slots are ignored. Null together with
  // self_probs: a step without attention (only n advances).
  const float* probs = nullptr;
  const float* self_probs = nullptr;  // [B] r of the new token on itself
  const void* keys = nullptr;         // [B, D] dtype: the new tokens
  const void* values = nullptr;       // [B, D] dtype
  // Or, instead of probs and self_probs, the attended rows as the decode
  // attention left them: stream b's rows j < row_counts[b] at
  // b·row_capacity + j, each a slot (≥ 0; sinks and empty slots ignored),
  // −2 for the new token itself (its r on itself; 0 when absent) or
  // another negative (ignored), with its r. Every other slot then has
  // r = 0 and is not touched, except at a renormalisation: a step costs
  // O(selected rows), not O(slots) (96K-token windows: 98 µs a step dense).
  // row_capacity ≤ kMaxSparseStepRows.
  const int32_t* row_slots = nullptr;
  const float* row_probs = nullptr;
  const int32_t* row_counts = nullptr;
  int row_capacity = 0;
};

// Every element is written by every launch.
struct CascadeStepOutputs {
  // [B] the token that left the resident set (at most one per decode
  // step), −1 when none; its rows in evicted_keys/values (zeros if none).
  int64_t* evicted_positions = nullptr;
  void* evicted_keys = nullptr;    // [B, D] dtype
  void* evicted_values = nullptr;  // [B, D] dtype
  // [B, C] the slots whose rows changed (InsertResult::changed_slots),
  // ascending, then −1; changed_counts [B] how many (1..C).
  int32_t* changed_slots = nullptr;
  int32_t* changed_counts = nullptr;
};

// Applies one decode token to every stream of the batch: stream b's token
// has position tokens_seen[b] (the caller checks it is the session's next)
// and afterwards tokens_seen[b] is one more, n and scores as UpdateScores,
// slots as InsertTokens. One launch, no allocation, no synchronisation.
// INVALID_ARGUMENT names a bad shape field or a missing pointer (probs
// without self_probs or the reverse included); INTERNAL with file:line on a
// launch error. On error nothing is enqueued.
absl::Status UpdateCascades(const CascadeBatchShape& shape,
                            const CascadeDeviceState& state,
                            const CascadeStepInputs& inputs,
                            const CascadeStepOutputs& outputs,
                            cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_CASCADE_UPDATE_H_
