// Batched decode attention over gathered rows of a paged K/V pool, split
// across thread blocks with an (output, LSE) merge (specs/quest.md §4), on
// the CUDA device. The CPU oracle is cpu::Attend (kernels/attention.h).
// Thread-safe (no state); the launch is asynchronous on the caller's stream.
//
// One stream of the batch = one KV head's query group (G = Hq/H rows). Its
// keys and values are rows of two pools, [pool_rows, D] each in the batch
// dtype; a pool row is slot `s` of pool block `b` at row b·P + s, so any
// paged layout (sinks, cascades, recalled pages, the new token written to
// a scratch row) is expressed as a list of row indices. Stream s attends
// rows[row_begin[s] + t] for t < row_count[s]; the order of the rows does
// not change the result beyond rounding. fp32 accumulation, natural-log LSE.
#ifndef KVMEM_KERNELS_CUDA_DECODE_ATTENTION_H_
#define KVMEM_KERNELS_CUDA_DECODE_ATTENTION_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"

namespace kvmem::cuda {

inline constexpr int kMaxDecodeGroup = 8;      // G = Hq/H per stream
inline constexpr int kMaxDecodeHeadDim = 256;  // D

// The shape of one batch, known on the host before launch.
struct DecodeAttentionShape {
  int streams = 0;             // ≥ 1
  int group = 1;               // G, 1..kMaxDecodeGroup
  int head_dim = 0;            // D, 1..kMaxDecodeHeadDim
  DType dtype = DType::kBf16;  // queries, keys, values (and `out`)
  // Upper bound of every row_count[s] (e.g. the step budget B, + 1 for the
  // new token). Sizes the split; a larger count is still correct, slower.
  int max_rows_per_stream = 0;  // ≥ 1
  // Size of the `rows` array: every row_begin[s] + row_count[s] ≤ this.
  // Sizes the probability scratch.
  int64_t rows_capacity = 0;
  bool want_probs = false;  // write DecodeAttentionOutputs::reduced_probs
};

// Device pointers, borrowed for the launch: they must stay valid until the
// stream has run it. Nothing is read from the device by the launcher, so
// index contents are the caller's contract (rows < pool rows, counts ≥ 0).
struct DecodeAttentionInputs {
  const void* queries = nullptr;       // [streams, G, D] dtype
  const void* key_rows = nullptr;      // [pool_rows, D] dtype
  const void* value_rows = nullptr;    // [pool_rows, D] dtype
  const int32_t* rows = nullptr;       // [rows_capacity] pool row indices
  const int32_t* row_begin = nullptr;  // [streams] first index into rows
  const int32_t* row_count = nullptr;  // [streams] rows attended, ≥ 0
  float softmax_scale = 0.0f;          // finite, > 0 (usually 1/√D)
  ScoreReduction reduction = ScoreReduction::kMax;  // for reduced_probs
  // CACHE_RANK (row_positions null: no rotation): before their dot
  // products the keys of row index t are rotated (RoPE, as
  // cpu::RotateHeadWithFrequencies) to row_positions[t] and stream s's
  // queries to query_positions[s], inside the kernel; values are not.
  // Shapes must pass DecodeAttentionRotarySupported.
  const int32_t* row_positions = nullptr;    // [rows_capacity], ≥ 0
  const int32_t* query_positions = nullptr;  // [streams], ≥ 0
  const double* inv_freq = nullptr;          // [rotated_dims / 2] rad/pos
  int rotated_dims = 0;                      // R: even, 2..D
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
};

// Whether the rotary fields can rotate a head of `head_dim` in `dtype`
// with R = rotated_dims and `pairing` (the kernel needs each pair's two
// channels in one lane or at one slot of two lanes: every interleaved
// pairing, and half-split pairs where R/2 is a multiple of 8 channels
// (bf16/fp16) or 4 (fp32) at D·e a multiple of 16 bytes, of 32 otherwise).
// Assumes 16-byte aligned queries and pools, as the engine's are.
bool DecodeAttentionRotarySupported(int head_dim, DType dtype, int rotated_dims,
                                    RotaryPairing pairing);

// Outputs; at least one of out_fp32 / out. A stream with no rows gets
// o = 0 and lse = −∞ (the merge identity).
struct DecodeAttentionOutputs {
  float* out_fp32 = nullptr;  // [streams, G, D] fp32, or null
  void* out = nullptr;        // [streams, G, D] dtype (rounded), or null
  float* lse = nullptr;       // [streams, G] fp32, required
  // [rows_capacity] fp32: at index row_begin[s] + t, the group reduction
  // (ReduceGroupProbability) of the softmax probabilities of that row, the
  // cascade's score input. Required iff shape.want_probs; indices outside
  // every stream's range are not written.
  float* reduced_probs = nullptr;
};

// How the launch splits the work, and the scratch it needs.
struct DecodeAttentionPlan {
  int splits = 1;              // thread blocks per stream (split-K)
  size_t workspace_bytes = 0;  // device scratch for partials and logits
};

// A plan for `shape` on a device with `multiprocessors` SMs (from
// cudaDeviceGetAttribute). INVALID_ARGUMENT names a bad shape field.
absl::StatusOr<DecodeAttentionPlan> PlanDecodeAttention(
    const DecodeAttentionShape& shape, int multiprocessors);

// A plan with exactly `splits` (1..64) thread blocks per stream. Results
// then depend only on each stream's rows, not on the batch around it: the
// engine's choice, so that a step gives the same bits whatever it is
// batched with. INVALID_ARGUMENT names a bad field.
absl::StatusOr<DecodeAttentionPlan> PlanDecodeAttentionSplits(
    const DecodeAttentionShape& shape, int splits);

// Enqueues the attention of every stream on `stream`: one split launch and
// one merge launch for the whole batch. `workspace` (plan.workspace_bytes,
// 256-byte aligned, e.g. a DeviceBuffer) is scratch owned by the caller and
// must not be shared by launches in flight at once. Never allocates or
// synchronises. INVALID_ARGUMENT names a bad field (null pointer, shape,
// scale, plan, workspace size); INTERNAL with file:line for a launch error.
// On error nothing is enqueued.
absl::Status DecodeAttention(const DecodeAttentionShape& shape,
                             const DecodeAttentionInputs& inputs,
                             const DecodeAttentionOutputs& outputs,
                             const DecodeAttentionPlan& plan, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DECODE_ATTENTION_H_
