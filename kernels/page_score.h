// Quest page scores (specs/quest.md §2, selection.md step 3): an upper bound
// of q·k over a page's keys, from the page's digest (page_digest.h), per
// query head, reduced over the query group of one KV head. No softmax scale:
// scores only rank pages. Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_PAGE_SCORE_H_
#define KVMEM_KERNELS_PAGE_SCORE_H_

#include <cmath>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"
#include "kernels/page_digest.h"
#include "kernels/rotary.h"

namespace kvmem {

// How the G query heads of one KV head combine their bounds.
enum class GroupReduction : int {
  // max_g U_g: bounds the largest logit any head of the group can see in the
  // page, so a page vital to one head survives. kvmem's choice (fixed in v1).
  kMax = 0,
  // Σ_g U_g: quest.md §7 shows it picking differently; offered for
  // comparison only.
  kSum = 1,
};

// The two per-head bounds, shared by both backends so that they add in the
// same order (pairs, then channels, ascending). Products and sums are fp32,
// rounded one by one (no FMA), so both backends give the same bits.

// Quest: Σ_i max(q_i·high_i, q_i·low_i) over i < D. `q`: [D] fp32;
// `digest`: [2, D] fp32 (low row, high row). Whatever the sign of q_i, the
// term is the largest q_i·k_i over the page, so the sum bounds q·k.
// Summed in 8 lanes (lane k takes i ≡ k mod 8, in order), then pairwise:
// one fixed order on host and device, and 8 independent chains that the
// host runs side by side (one chain made page scoring a tenth of a step).
KVMEM_HD float QuestHeadBound(const float* q, const float* digest,
                              int head_dim) {
  const float* low = digest;
  const float* high = digest + head_dim;
  float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int i = 0;
  for (; i + 8 <= head_dim; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const float up = MulF(q[i + k], high[i + k]);
      const float down = MulF(q[i + k], low[i + k]);
      lane[k] = AddF(lane[k], up > down ? up : down);
    }
  }
  for (int k = 0; i < head_dim; ++i, ++k) {
    const float up = MulF(q[i], high[i]);
    const float down = MulF(q[i], low[i]);
    lane[k] = AddF(lane[k], up > down ? up : down);
  }
  return AddF(AddF(AddF(lane[0], lane[1]), AddF(lane[2], lane[3])),
              AddF(AddF(lane[4], lane[5]), AddF(lane[6], lane[7])));
}

// Rotation-invariant: Σ_pairs ‖q_pair‖·high_pair + Quest's terms for the
// channels outside the pairs. A rotation keeps norms, so q_pair·k_pair ≤
// ‖q_pair‖·‖k_pair‖ whatever angles the query and key are later turned by.
KVMEM_HD float PairNormHeadBound(const float* q, const float* digest,
                                 int head_dim, int rotated_dims,
                                 RotaryPairing pairing) {
  const float* low = digest;
  const float* high = digest + head_dim;
  float bound = 0.0f;
  for (int i = 0; i < rotated_dims / 2; ++i) {
    int a = 0;
    int b = 0;
    RotaryPairChannels(pairing, rotated_dims, i, &a, &b);
    const float q_norm = sqrtf(AddF(MulF(q[a], q[a]), MulF(q[b], q[b])));
    bound = AddF(bound, MulF(q_norm, high[a]));
  }
  for (int i = rotated_dims; i < head_dim; ++i) {
    const float up = MulF(q[i], high[i]);
    const float down = MulF(q[i], low[i]);
    bound = AddF(bound, up > down ? up : down);
  }
  return bound;
}

namespace cpu {

// Scores `pages` = scores.size() pages for one stream's query group.
// - queries: [G, D] fp32 (G = queries.size() / D ≥ 1). ABSOLUTE: rotated
//   as sent; CACHE_RANK: before rotary (the bound ignores rotation).
// - digests: [pages, 2, D] fp32, built with the same `kind`.
// - scores: [pages] fp32, reduce_g bound_g(page); written on success only.
// INVALID_ARGUMENT: D < 1, a size mismatch, or an invalid `kind`.
absl::Status ScorePages(absl::Span<const float> queries, int head_dim,
                        absl::Span<const float> digests, const DigestKind& kind,
                        GroupReduction reduction, absl::Span<float> scores);

}  // namespace cpu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_PAGE_SCORE_H_
