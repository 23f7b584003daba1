// A prefill chunk through the cascade on the CUDA device (specs/cascade.md
// §3–5, kvmem's choices of §8): the T tokens of a chunk attend densely to
// every resident slot of their stream (sinks and cascades; empty slots are
// masked) and causally to the chunk itself, and the exact probabilities,
// reduced over the query group and weighted by the EMA factors, are summed
// into each slot's score u and each new token's initial score — the
// UpdateScores(T, …) of kernels/cascade_policy.h. The insertion of the T
// tokens that follows is kernels/cuda/chunk_insert.h. The CPU oracles are
// cpu::AttendCausalChunk and CascadeStream::UpdateScores.
//
// Four launches for the whole batch:
// 1. factors: per stream and query q the increment factor f(n+1+q), walking
//    n as UpdateScores does; a renormalisation inside or after the chunk
//    folds into the factors of the queries before it and into one scale
//    of the old u. score_exponent advances here;
// 2. forward: flash attention on tensor cores (fp32 accumulation, online
//    softmax), one block per 128 query rows of a stream, giving out and
//    the natural-log LSE;
// 3. scores: the same blocks recompute QKᵀ, take p = exp(s − lse) with the
//    final LSE, reduce p over the group (max or mean) and sum f·r over
//    their queries into one partial sum per key (no atomics); exact
//    probabilities need the final LSE, hence the second QKᵀ pass
//    (cascade.md §5);
// 4. reduce: per key, u ← u·scale + Σ partials in a fixed order, so the
//    result does not depend on scheduling.
// The sums run in another order than the CPU's sequential one (and the
// tensor-core dot products too), so outputs and scores match the oracle
// within fp32 rounding, not bit for bit; the score exponent is exact.
// Thread-safe (no state); asynchronous on the caller's stream; no
// allocation, no synchronisation.
#ifndef KVMEM_KERNELS_CUDA_CHUNK_ATTENTION_H_
#define KVMEM_KERNELS_CUDA_CHUNK_ATTENTION_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cascade_policy.h"
#include "kernels/cuda/cascade_update.h"
#include "kernels/dtype.h"
#include "kernels/policy_math.h"

namespace kvmem::cuda {

inline constexpr int kChunkHeadDim = 128;  // the only D of the tensor-core path
inline constexpr int kMaxChunkGroup = 8;   // G: 1, 2, 4 or 8

// The tensor-core instructions of the two attention passes:
// - kWarpGroup: Hopper's wgmma (sm_90a), a warpgroup of 64 query rows
//   reading each key and value tile straight from shared memory, where one
//   tile feeds four warps; tiles that every row of the block sees (the
//   usual tile: occupied slots, a full block) skip the masks
//   (chunk_attention_sm90a.cu);
// - kMmaSync: mma.sync m16n8k16, every warp reading its own fragments of
//   the tile out of shared memory (any sm_90 device);
// - kAuto: kWarpGroup on a device of compute capability 9.0, else kMmaSync.
// Both give the same results within fp32 rounding; the choice is for
// benchmarks and tests.
enum class ChunkKernels : int { kAuto = 0, kMmaSync = 1, kWarpGroup = 2 };

// Known on the host before launch.
struct ChunkShape {
  int streams = 0;             // B ≥ 1: one per KV head (of one session)
  int group = 1;               // G = Hq/H: 1, 2, 4 or 8
  int chunk = 0;               // T ≥ 1
  CascadeParams params;        // every stream's policy (sinks, β)
  DType dtype = DType::kBf16;  // bf16 or fp16: queries, rows
  ScoreReduction reduction = ScoreReduction::kMax;
  float softmax_scale = 0.0f;  // finite, > 0 (usually 1/√D)
  ChunkKernels kernels = ChunkKernels::kAuto;
  // Slots per stream, S + C·W (from params).
  int64_t slots() const {
    return int64_t{params.sinks} + int64_t{params.cascades} * params.window;
  }
};

// Device pointers, borrowed until the stream has run the launches. Index
// contents are the caller's contract (slot_rows < pool rows).
struct ChunkInputs {
  // [T, B·G, D]: the wire layout; query row (t, b, g) at (t·B + b)·G + g.
  // Null: a step without attention (APPEND without queries, UpdateScores
  // with no probabilities): n advances, renormalisations rescale u, the new
  // tokens' initial scores are 0; keys, values, the pools, out and lse are
  // not read (may be null), nor are dtype, group and softmax_scale.
  const void* queries = nullptr;
  const void* keys = nullptr;          // [T, B, D]: the chunk's own rows
  const void* values = nullptr;        // [T, B, D]
  const void* key_rows = nullptr;      // [pool_rows, D]: the resident slots
  const void* value_rows = nullptr;    // [pool_rows, D]
  const int32_t* slot_rows = nullptr;  // [B, slots] pool row of each slot
  const int64_t* positions = nullptr;  // [B, slots], −1 = empty (masked)
};

// Read and written in place: the layout of CascadeStream::Export.
struct ChunkScoreState {
  float* scores = nullptr;            // [B, slots] u; sinks and empty unused
  int64_t* score_exponent = nullptr;  // [B] n, advanced by the step
  // Or, instead of scores, score_exponent and the inputs' positions and
  // slot_rows: [B] pointers (device memory) to each stream's own arrays,
  // e.g. streams of several sessions in one launch. Only positions,
  // scores, score_exponent and slot_rows are used.
  const CascadeStreamPointers* streams = nullptr;
};

struct ChunkOutputs {
  float* out = nullptr;             // [T, B·G, D] fp32, rows as the queries
  float* lse = nullptr;             // [T, B·G] fp32, natural log
  float* initial_scores = nullptr;  // [B, T] u of each new token
};

// Device scratch the launches share (256-byte aligned, caller-owned, not
// shared by launches in flight at once): mostly the partial sums, 4 bytes
// × ceil(T·G/128) × B × (slots + T), e.g. 18 MB at T 1024, G 4, B 8 and
// 16K slots. 0 for a shape without streams, tokens or group.
size_t ChunkWorkspaceBytes(const ChunkShape& shape);

// For benchmarks: events recorded on the stream after the factors and
// after the forward launch (null: none).
struct ChunkPhaseEvents {
  cudaEvent_t after_factors = nullptr;
  cudaEvent_t after_forward = nullptr;
};

// INVALID_ARGUMENT naming a bad shape field or a missing pointer; INTERNAL
// with file:line on a launch error. On a shape error nothing is enqueued.
absl::Status AttendChunk(const ChunkShape& shape, const ChunkInputs& inputs,
                         const ChunkScoreState& state,
                         const ChunkOutputs& outputs, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream,
                         const ChunkPhaseEvents& events = {});

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_CHUNK_ATTENTION_H_
