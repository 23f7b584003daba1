// The greedy budget fill of one decode step of one stream (selection.md
// steps 4–5). Independent of the cascade's data structures: the caller has
// already counted the always-in tokens (sinks, the `recent` newest tokens,
// the new token) and turned every other page into a candidate with a score
// (page_score.h), a count of its tokens not yet selected, and an ordering
// key. Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_SELECTION_H_
#define KVMEM_KERNELS_SELECTION_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvmem {

// Candidate pages as parallel arrays, [pages] each. Borrowed for the call.
struct PageCandidates {
  // fp32 page scores, higher first. May be empty when the step is dense
  // (everything fits), since then no page needs a score.
  absl::Span<const float> scores;
  // Tokens of each page not already selected (≥ 0). A page partly inside
  // the always-in set counts only its other tokens (selection.md step 2).
  absl::Span<const int64_t> fresh_tokens;
  // Distinct tie-breakers, lower first: resident pages in slot order, then
  // spilled pages in page sequence (e.g. slot page index, then
  // resident_pages + spill sequence).
  absl::Span<const int64_t> order_keys;
};

struct SelectionFill {
  int64_t selected_tokens = 0;  // always-in tokens + fresh tokens of picks
  bool dense = false;           // everything fitted: all pages taken
};

namespace cpu {

// True when the always-in tokens and every candidate's fresh tokens fit in
// `budget_tokens` together: the step attends to everything, unscored.
// Lets the caller skip scoring. Negative counts are the caller's bug.
bool FitsEverything(int64_t always_in_tokens,
                    absl::Span<const int64_t> fresh_tokens,
                    int64_t budget_tokens);

// Fills `budget_tokens` (B) for one step:
// - dense (FitsEverything): selected[p] = 1 for every page; no score read;
// - otherwise visits pages by score descending, ties by lower order key,
//   and takes a page when its fresh tokens fit in what remains of B, else
//   skips it and goes on (a smaller later page may still fit). Pages with
//   no fresh token are never taken: they add nothing.
// selected: [pages], 1 = taken, 0 = not; written on success only.
// INVALID_ARGUMENT: span sizes differ; a negative count or budget;
// always-in tokens above B (CreateSession should have refused the policy);
// a NaN score; repeated order keys.
absl::StatusOr<SelectionFill> FillSelection(int64_t always_in_tokens,
                                            const PageCandidates& candidates,
                                            int64_t budget_tokens,
                                            absl::Span<uint8_t> selected);

}  // namespace cpu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_SELECTION_H_
