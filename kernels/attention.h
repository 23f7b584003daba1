// Exact softmax attention for one KV head's query group, its log-sum-exp,
// and the merge of partial attentions (specs/quest.md §4). Thread-safe
// (pure functions).
//
// For query row q and key rows k_t: s_t = scale · q·k_t (fp32),
// m = max_t s_t, p_t = exp(s_t − m) / Σ_u exp(s_u − m), o = Σ_t p_t · v_t,
// lse = m + ln Σ_t exp(s_t − m) (natural log of the scaled logits).
// All sums are fp32. An empty key set gives o = 0 and lse = −∞, which
// MergeAttention treats as the identity.
#ifndef KVMEM_KERNELS_ATTENTION_H_
#define KVMEM_KERNELS_ATTENTION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"

namespace kvmem {

// Borrowed rows of head vectors: [rows, D] little-endian in `dtype`, with
// rows = bytes.size() / (D · DTypeBytes(dtype)). The bytes must outlive the
// call that reads them.
struct HeadRowsView {
  absl::Span<const uint8_t> bytes;
  DType dtype = DType::kFp32;

  // A view of fp32 rows, e.g. queries already converted.
  static HeadRowsView Fp32(absl::Span<const float> values) {
    return {absl::Span<const uint8_t>(
                reinterpret_cast<const uint8_t*>(values.data()),
                values.size() * sizeof(float)),
            DType::kFp32};
  }
};

namespace cpu {

// Attention of G query rows over N key/value rows (one KV head, decode).
// - queries: [G, D]; keys, values: [N, D] (N may be 0); any dtypes.
// - softmax_scale: finite, > 0 (usually 1/√D).
// - out: [G, D] fp32; lse: [G] fp32 natural log.
// - probs: [G, N] fp32, p_t per query row (the cascade's score input), or
//   empty when not wanted.
// INVALID_ARGUMENT: D < 1, a byte length not a multiple of a row, keys and
// values of different row counts, G = 0, an output of the wrong size, or a
// bad scale. Outputs are written on success only.
absl::Status Attend(const HeadRowsView& queries, const HeadRowsView& keys,
                    const HeadRowsView& values, int head_dim,
                    float softmax_scale, absl::Span<float> out,
                    absl::Span<float> lse, absl::Span<float> probs);

// Causal attention of a prefill chunk of T tokens, G query heads each.
// - queries: [T, G, D] (T·G rows); keys, values: [cache_rows + T, D]: the
//   cache prefix, then the chunk's own T rows in order. Chunk token t
//   attends to every prefix row and to chunk rows 0..t (itself included).
// - out: [T, G, D] fp32; lse: [T, G] fp32.
// - probs: [T, G, cache_rows + T] fp32 (0 where masked), or empty.
// INVALID_ARGUMENT as Attend, plus group_size < 1, cache_rows < 0, or
// query rows not a multiple of group_size, or key rows ≠ cache_rows + T.
absl::Status AttendCausalChunk(const HeadRowsView& queries,
                               const HeadRowsView& keys,
                               const HeadRowsView& values, int head_dim,
                               int group_size, int64_t cache_rows,
                               float softmax_scale, absl::Span<float> out,
                               absl::Span<float> lse, absl::Span<float> probs);

// Merges R rows of two partial attentions over disjoint key sets into the
// attention over their union:
//   M = max(lse1, lse2), lse = M + ln(e^(lse1−M) + e^(lse2−M)),
//   o = e^(lse1−lse)·o1 + e^(lse2−lse)·o2.
// A side with lse = −∞ (an empty set) is the identity; two empty sides give
// o = 0, lse = −∞. out1, out2, out: [R, D] fp32; lse1, lse2, lse: [R].
// `out` may alias `out1` or `out2`, `lse` may alias `lse1` or `lse2`.
// INVALID_ARGUMENT on size mismatch (nothing written).
absl::Status MergeAttention(absl::Span<const float> out1,
                            absl::Span<const float> lse1,
                            absl::Span<const float> out2,
                            absl::Span<const float> lse2, absl::Span<float> out,
                            absl::Span<float> lse);

}  // namespace cpu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_ATTENTION_H_
