// Batched Quest page scores on the CUDA device (specs/quest.md §2,
// selection.md step 3): for every candidate page of every stream, the
// group reduction of the per-head bound. The per-head bound is page_score.h's
// QuestHeadBound (eight lanes a page and head, added in its own tree) or
// PairNormHeadBound (one thread a page), in the CPU's order either way, so
// scores equal cpu::ScorePages bit for bit.
// Thread-safe (no state); the launch is asynchronous on the caller's stream.
#ifndef KVMEM_KERNELS_CUDA_PAGE_SCORES_H_
#define KVMEM_KERNELS_CUDA_PAGE_SCORES_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/page_digest.h"
#include "kernels/page_score.h"

namespace kvmem::cuda {

inline constexpr int kMaxScoreGroup = 8;
inline constexpr int kMaxScoreHeadDim = 256;

struct PageScoreShape {
  int streams = 0;                   // 1..65535
  int group = 1;                     // G, 1..kMaxScoreGroup
  int head_dim = 0;                  // D, 1..kMaxScoreHeadDim
  DType query_dtype = DType::kBf16;  // queries are converted exactly to fp32
  // Element type of the stored digests. fp32 always; bf16 / fp16 only for
  // ABSOLUTE digests of keys stored in that dtype (min and max pick stored
  // values, so the narrow digest is exact and scores keep their bits).
  DType digest_dtype = DType::kFp32;
  DigestKind kind;  // must be valid for head_dim
  GroupReduction reduction = GroupReduction::kMax;
  int max_candidates_per_stream = 0;  // ≥ 1: sizes the grid only
};

// Device pointers, borrowed until the stream has run the launch.
struct PageScoreInputs {
  const void* queries = nullptr;  // [streams, G, D] query_dtype
  const void* digests = nullptr;  // [digest_pages, 2, D] digest_dtype
  // Stream s scores pages candidate_pages[candidate_begin[s] + i],
  // i < candidate_count[s] (indices into `digests`).
  const int32_t* candidate_pages = nullptr;
  const int32_t* candidate_begin = nullptr;  // [streams]
  const int32_t* candidate_count = nullptr;  // [streams], ≥ 0
};

// Writes scores[candidate_begin[s] + i] (fp32) for every candidate; nothing
// else. One launch for the batch. INVALID_ARGUMENT names a bad field;
// INTERNAL with file:line on a launch error. On error nothing is enqueued.
absl::Status ScorePages(const PageScoreShape& shape,
                        const PageScoreInputs& inputs, float* scores,
                        cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_PAGE_SCORES_H_
