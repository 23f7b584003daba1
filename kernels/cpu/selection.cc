// CPU budget fill: sort the candidates once, then one greedy pass.
#include "kernels/selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvmem::cpu {
namespace {

// Everything FillSelection checks before choosing; `dense` says whether the
// scores are needed.
absl::Status CheckFillInputs(int64_t always_in_tokens,
                             const PageCandidates& candidates,
                             int64_t budget_tokens, size_t selected_size,
                             bool dense) {
  const size_t pages = candidates.fresh_tokens.size();
  if (budget_tokens < 0 || always_in_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "budget_tokens: ", budget_tokens,
        ", always_in_tokens: ", always_in_tokens, "; want both >= 0"));
  }
  if (always_in_tokens > budget_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("always_in_tokens: ", always_in_tokens,
                     " exceed budget_tokens ", budget_tokens));
  }
  if (candidates.order_keys.size() != pages || selected_size != pages ||
      (!dense && candidates.scores.size() != pages)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "candidates: ", candidates.scores.size(), " scores, ", pages,
        " fresh_tokens, ", candidates.order_keys.size(), " order_keys, ",
        selected_size, " selected; want equal sizes"));
  }
  for (size_t p = 0; p < pages; ++p) {
    if (candidates.fresh_tokens[p] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("fresh_tokens[", p, "]: ", candidates.fresh_tokens[p],
                       ", want >= 0"));
    }
    if (!dense && std::isnan(candidates.scores[p])) {
      return absl::InvalidArgumentError(absl::StrCat("scores[", p, "]: NaN"));
    }
  }
  std::vector<int64_t> keys(candidates.order_keys.begin(),
                            candidates.order_keys.end());
  std::sort(keys.begin(), keys.end());
  auto repeat = std::adjacent_find(keys.begin(), keys.end());
  if (repeat != keys.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("order_keys: ", *repeat, " appears twice"));
  }
  return absl::OkStatus();
}

}  // namespace

bool FitsEverything(int64_t always_in_tokens,
                    absl::Span<const int64_t> fresh_tokens,
                    int64_t budget_tokens) {
  int64_t total = always_in_tokens;
  for (int64_t tokens : fresh_tokens) total += tokens;
  return total <= budget_tokens;
}

absl::StatusOr<SelectionFill> FillSelection(int64_t always_in_tokens,
                                            const PageCandidates& candidates,
                                            int64_t budget_tokens,
                                            absl::Span<uint8_t> selected) {
  const bool dense =
      FitsEverything(always_in_tokens, candidates.fresh_tokens, budget_tokens);
  absl::Status valid = CheckFillInputs(always_in_tokens, candidates,
                                       budget_tokens, selected.size(), dense);
  if (!valid.ok()) return valid;
  const size_t pages = candidates.fresh_tokens.size();
  SelectionFill fill;
  fill.dense = dense;
  fill.selected_tokens = always_in_tokens;
  if (dense) {
    for (size_t p = 0; p < pages; ++p) {
      selected[p] = 1;
      fill.selected_tokens += candidates.fresh_tokens[p];
    }
    return fill;
  }
  std::vector<size_t> visit(pages);
  std::iota(visit.begin(), visit.end(), size_t{0});
  std::sort(visit.begin(), visit.end(), [&candidates](size_t x, size_t y) {
    const float sx = candidates.scores[x];
    const float sy = candidates.scores[y];
    if (sx != sy) return sx > sy;
    return candidates.order_keys[x] < candidates.order_keys[y];
  });
  std::fill(selected.begin(), selected.end(), 0);
  int64_t left = budget_tokens - always_in_tokens;
  for (size_t p : visit) {
    if (left == 0) break;  // nothing more can fit
    const int64_t tokens = candidates.fresh_tokens[p];
    if (tokens == 0 || tokens > left) continue;
    selected[p] = 1;
    left -= tokens;
    fill.selected_tokens += tokens;
  }
  return fill;
}

}  // namespace kvmem::cpu
