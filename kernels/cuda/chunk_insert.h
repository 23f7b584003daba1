// The insertion of a prefill chunk of T tokens into the cascade policy
// (specs/cascade.md §2) of a batch of streams on the CUDA device:
// CascadeStream::InsertTokens(tokens_seen, T, …) for every stream, on the
// state layout of kernels/cuda/cascade_update.h, equal to the CPU oracle
// bit for bit (positions, u, stored/head, tokens_seen, rows, evicted tokens
// and changed slots). Scores are not updated here: the caller's score pass
// has already done UpdateScores' arithmetic, and score_exponent is left
// alone. Thread-safe (no state); asynchronous on the caller's stream.
#ifndef KVMEM_KERNELS_CUDA_CHUNK_INSERT_H_
#define KVMEM_KERNELS_CUDA_CHUNK_INSERT_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/cascade_update.h"

namespace kvmem::cuda {

struct ChunkInsertShape {
  // B, params (cascades ≤ kMaxUpdateCascades), D (rows of at most 1 MiB)
  // and dtype, as for UpdateCascades.
  CascadeBatchShape batch;
  int chunk_tokens = 0;  // T, 1..W: every stream of the launch takes T
};

// The chunk, borrowed until the stream has run the launch. Token j of
// stream b has position tokens_seen[b] + j and its key/value row (D
// elements of dtype) at element offset b·stream_stride + j·token_stride:
// [T, B, D] is stream_stride D, token_stride B·D; [B, T, D] is T·D and D.
struct ChunkInsertInputs {
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t stream_stride = 0;  // elements, ≥ 0
  int64_t token_stride = 0;   // elements, ≥ 0
  // [B, T] each new token's u, at the scale of the state's u (the
  // initial_scores of the UpdateScores that produced them).
  const float* initial_scores = nullptr;
};

// Every element is written by every launch. E ≤ T per stream: a token
// evicts at most one.
struct ChunkInsertOutputs {
  // [B, T] InsertResult::evicted.positions in eviction order, then −1;
  // evicted_counts [B] E.
  int64_t* evicted_positions = nullptr;
  int32_t* evicted_counts = nullptr;
  void* evicted_keys = nullptr;    // [B, T, D] dtype, zeros past E
  void* evicted_values = nullptr;  // [B, T, D] dtype, zeros past E
  // [B, T·C] InsertResult::changed_slots (ascending, unique), then −1;
  // changed_counts [B] how many. T·C bounds them: a token changes at most
  // one slot per cascade (or one sink), and T·C ≤ C·W ≤ slots.
  int32_t* changed_slots = nullptr;
  int32_t* changed_counts = nullptr;
};

// Device scratch bytes InsertChunks needs for `shape`:
// B·(4·(S + C·W) + 16·T + 8) plus alignment, e.g. 2.2 MB for B 8, S 4,
// C 4, W 16384, T 1024. 0 when the shape's counts are not positive.
size_t ChunkInsertScratchBytes(const ChunkInsertShape& shape);

// Inserts T tokens into every stream of the batch: afterwards stream b is
// CascadeStream::InsertTokens(tokens_seen[b], T, its rows, its
// initial_scores) of its state before, and tokens_seen[b] is T more.
// state: as for UpdateCascades (batch arrays or `streams`), a valid stream
// state each (as Export gives; u finite), slot_rows distinct across the
// batch; score_exponent is neither read nor written and may be null.
// The caller checks that tokens_seen[b] is the session's next position.
// scratch: device memory of at least ChunkInsertScratchBytes(shape) bytes,
// 16-byte aligned (e.g. a DeviceBuffer), any contents, borrowed until the
// stream has run the launch; the launches must not overlap another use of
// it. Two launches, no allocation, no synchronisation.
// INVALID_ARGUMENT names a bad shape field (T outside [1, W] included), a
// negative stride, a missing pointer or too little scratch; then nothing
// is enqueued. INTERNAL with file:line on a launch error (if the second of
// the two launches fails, the first has run and the state is undefined).
absl::Status InsertChunks(const ChunkInsertShape& shape,
                          const CascadeDeviceState& state,
                          const ChunkInsertInputs& inputs,
                          const ChunkInsertOutputs& outputs, void* scratch,
                          size_t scratch_bytes, cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_CHUNK_INSERT_H_
