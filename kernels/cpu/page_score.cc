// CPU page scores: the shared per-head bound, reduced over the group.
#include "kernels/page_score.h"

#include "absl/strings/str_cat.h"

namespace kvmem::cpu {
namespace {

// QuestHeadBound's arithmetic in the same order (8 lanes, then pairwise),
// written for the vectoriser: this file is built with -O3 and
// -ffp-contract=off (kernels/CMakeLists.txt), so each lane is one SIMD
// element and no product joins an FMA. Bit for bit QuestHeadBound, which
// the tests check; 4–8× faster than its scalar form, whose products go
// through MulF's optimisation barrier.
float QuestHeadBoundHost(const float* q, const float* digest, int head_dim) {
  const float* low = digest;
  const float* high = digest + head_dim;
  float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int i = 0;
  for (; i + 8 <= head_dim; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const float up = q[i + k] * high[i + k];
      const float down = q[i + k] * low[i + k];
      lane[k] = lane[k] + (up > down ? up : down);
    }
  }
  for (int k = 0; i < head_dim; ++i, ++k) {
    const float up = q[i] * high[i];
    const float down = q[i] * low[i];
    lane[k] = lane[k] + (up > down ? up : down);
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
         ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

}  // namespace

absl::Status ScorePages(absl::Span<const float> queries, int head_dim,
                        absl::Span<const float> digests, const DigestKind& kind,
                        GroupReduction reduction, absl::Span<float> scores) {
  absl::Status valid = kind.Validate(head_dim);
  if (!valid.ok()) return valid;
  if (queries.empty() || queries.size() % head_dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat("queries: ", queries.size(),
                                                   " floats, want G * ",
                                                   head_dim, " with G >= 1"));
  }
  const size_t digest_floats = static_cast<size_t>(kDigestRows) * head_dim;
  if (digests.size() != scores.size() * digest_floats) {
    return absl::InvalidArgumentError(absl::StrCat(
        "digests: ", digests.size(), " floats, want ",
        scores.size() * digest_floats, " (", scores.size(), " pages)"));
  }
  if (reduction != GroupReduction::kMax && reduction != GroupReduction::kSum) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reduction: ", static_cast<int>(reduction), ", want MAX or SUM"));
  }
  const size_t group = queries.size() / head_dim;
  for (size_t p = 0; p < scores.size(); ++p) {
    const float* digest = digests.data() + p * digest_floats;
    float score = 0.0f;
    for (size_t g = 0; g < group; ++g) {
      const float* q = queries.data() + g * head_dim;
      const float bound =
          kind.rotation_invariant
              ? PairNormHeadBound(q, digest, head_dim, kind.rotated_dims,
                                  kind.pairing)
              : QuestHeadBoundHost(q, digest, head_dim);
      if (g == 0) {
        score = bound;
      } else if (reduction == GroupReduction::kMax) {
        score = bound > score ? bound : score;
      } else {
        score += bound;
      }
    }
    scores[p] = score;
  }
  return absl::OkStatus();
}

}  // namespace kvmem::cpu
