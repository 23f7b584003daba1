// Batched greedy budget fill (selection.md steps 4–5) on the CUDA device:
// the same rule as cpu::FillSelection (kernels/selection.h) for every
// stream of a batch in one launch, plus, optionally, the compaction of each
// stream's attended pool rows for DecodeAttention. Thread-safe (no state);
// asynchronous on the caller's stream.
//
// Ties: cpu::FillSelection breaks equal scores by lower order key. Here the
// candidates of a stream are listed in order-key order, so the lower
// candidate index wins; this is the same selection whenever the caller
// lists candidates by ascending order key (resident pages in slot order,
// then spilled pages in sequence). A NaN score sorts after every number.
#ifndef KVMEM_KERNELS_CUDA_SELECT_PAGES_H_
#define KVMEM_KERNELS_CUDA_SELECT_PAGES_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvmem::cuda {

// Candidates one stream may have (one block sorts them in shared memory).
inline constexpr int kMaxSelectCandidates = 8192;

struct SelectPagesShape {
  int streams = 0;                    // 1..2^31-1
  int max_candidates_per_stream = 0;  // 1..kMaxSelectCandidates, a bound
  bool compact_rows = false;          // also write SelectPagesRows
};

// Device pointers, borrowed until the stream has run the launch. Contents
// are the caller's contract: counts ≥ 0, always_in ≤ budget,
// candidate_count ≤ max_candidates_per_stream.
struct SelectPagesInputs {
  const float* scores = nullptr;              // [candidates] fp32
  const int32_t* fresh_tokens = nullptr;      // [candidates] ≥ 0
  const int32_t* candidate_begin = nullptr;   // [streams]
  const int32_t* candidate_count = nullptr;   // [streams]
  const int32_t* always_in_tokens = nullptr;  // [streams]
  const int32_t* budget_tokens = nullptr;     // [streams] B
};

// Optional compaction: per stream, the always-in rows, then the fresh rows
// of each taken candidate in candidate order, into `rows` from
// rows_begin[s] (room for budget_tokens[s] rows); rows_count[s] = their
// number (= selected_tokens[s]).
struct SelectPagesRows {
  const int32_t* always_in_rows = nullptr;   // [always_in_tokens[s]] from
  const int32_t* always_in_begin = nullptr;  // always_in_begin[s]
  // Candidate c's fresh rows: candidate_first_row[c] + j for every set bit
  // j of candidate_fresh_mask[c]; popcount(mask) must equal
  // fresh_tokens[c] (pages of at most 64 slots).
  const int32_t* candidate_first_row = nullptr;
  const uint64_t* candidate_fresh_mask = nullptr;
  const int32_t* rows_begin = nullptr;  // [streams]
  int32_t* rows = nullptr;
  int32_t* rows_count = nullptr;  // [streams]
};

struct SelectPagesOutputs {
  uint8_t* selected = nullptr;         // [candidates] 1 taken, 0 not
  int32_t* selected_tokens = nullptr;  // [streams] always-in + taken fresh
  uint8_t* dense = nullptr;            // [streams] 1 = everything fit; or null
};

// One launch for the batch (a block per stream). INVALID_ARGUMENT names a
// bad field; INTERNAL with file:line on a launch error; on error nothing is
// enqueued. `rows` is read only when shape.compact_rows.
absl::Status SelectPages(const SelectPagesShape& shape,
                         const SelectPagesInputs& inputs,
                         const SelectPagesOutputs& outputs,
                         const SelectPagesRows& rows, cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_SELECT_PAGES_H_
