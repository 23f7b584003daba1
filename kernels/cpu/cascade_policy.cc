// The host cascade policy: plain loops over the slots of one stream. The
// arithmetic (factors, accumulation, renormalisation, duels, accepting
// cascades) comes from kernels/policy_math.h so that the CUDA policy takes
// the same decisions bit for bit from the same probabilities.
#include "kernels/cascade_policy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

// Slots above this are refused: int indices and [T, num_slots] probability
// arrays stay far from overflow.
constexpr int64_t kMaxSlots = int64_t{1} << 30;
constexpr int kMaxRowBytes = 1 << 20;

// The token travelling down the cascades during one insertion (the
// "carry" of cascade.md §2); its rows live in the caller's scratch buffers.
struct Carry {
  int64_t position;
  float score;
  uint8_t* key;
  uint8_t* value;
};

}  // namespace

absl::Status CascadeParams::Validate() const {
  if (sinks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sinks: ", sinks, ", want >= 0"));
  }
  if (cascades < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cascades: ", cascades, ", want >= 1"));
  }
  if (window < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("window: ", window, ", want >= 1"));
  }
  // Written so that NaN fails too.
  if (!(beta > 0.0 && beta < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("beta: ", beta, ", want in (0, 1)"));
  }
  int64_t slots = int64_t{sinks} + int64_t{cascades} * window;
  if (slots >= kMaxSlots) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sinks + cascades * window: ", slots, ", want < ", kMaxSlots));
  }
  return absl::OkStatus();
}

absl::Status ReduceGroup(ScoreReduction reduction, int group,
                         absl::Span<const float> probs, absl::Span<float> r) {
  if (group < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("group: ", group, ", want >= 1"));
  }
  if (probs.size() != r.size() * group) {
    return absl::InvalidArgumentError(absl::StrCat(
        "probs: ", probs.size(), " floats, want ", r.size() * group, " (group ",
        group, " x ", r.size(), ")"));
  }
  for (size_t j = 0; j < r.size(); ++j) {
    r[j] = ReduceGroupProbability(probs.data() + j, group, int64_t(r.size()),
                                  reduction);
  }
  return absl::OkStatus();
}

CascadeStream::CascadeStream(const CascadeParams& params, int row_bytes)
    : params_(params),
      row_bytes_(row_bytes),
      positions_(params.sinks + size_t(params.cascades) * params.window, -1),
      scores_(positions_.size(), 0.0f),
      keys_(positions_.size() * row_bytes, 0),
      values_(positions_.size() * row_bytes, 0),
      stored_(params.cascades, 0),
      head_(params.cascades, 0) {}

absl::StatusOr<CascadeStream> CascadeStream::Create(const CascadeParams& params,
                                                    int row_bytes) {
  absl::Status status = params.Validate();
  if (!status.ok()) return status;
  if (row_bytes < 1 || row_bytes > kMaxRowBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "row_bytes: ", row_bytes, ", want in [1, ", kMaxRowBytes, "]"));
  }
  return CascadeStream(params, row_bytes);
}

int CascadeStream::ResidentCount() const {
  int count = std::min<int64_t>(tokens_seen_, params_.sinks);
  for (int stored : stored_) count += stored;
  return count;
}

absl::Span<const uint8_t> CascadeStream::key_row(int s) const {
  return absl::MakeConstSpan(keys_.data() + size_t(s) * row_bytes_, row_bytes_);
}

absl::Span<const uint8_t> CascadeStream::value_row(int s) const {
  return absl::MakeConstSpan(values_.data() + size_t(s) * row_bytes_,
                             row_bytes_);
}

float CascadeStream::ReportedScore(int s) const {
  if (s < params_.sinks || positions_[s] < 0) return 0.0f;
  return RescaleScore(scores_[s], ScoreScale(params_.beta, score_exponent_));
}

std::vector<int> CascadeStream::CascadeSlots(int cascade) const {
  std::vector<int> slots;
  int base = params_.sinks + cascade * params_.window;
  int stored = stored_[cascade];
  // head is the oldest once full and 0 before, so this walks the ring from
  // its oldest token either way.
  for (int k = 0; k < stored; ++k) {
    slots.push_back(base + (head_[cascade] + k) % stored);
  }
  return slots;
}

std::vector<int64_t> CascadeStream::CascadePositions(int cascade) const {
  std::vector<int64_t> positions;
  for (int s : CascadeSlots(cascade)) positions.push_back(positions_[s]);
  return positions;
}

std::vector<int> CascadeStream::ResidentSlotsInOrder() const {
  std::vector<int> order;
  for (int s = 0; s < params_.sinks; ++s) {
    if (positions_[s] >= 0) order.push_back(s);
  }
  for (int i = params_.cascades - 1; i >= 0; --i) {
    for (int s : CascadeSlots(i)) order.push_back(s);
  }
  return order;
}

std::vector<int64_t> CascadeStream::CacheRankPositions() const {
  std::vector<int64_t> rank(positions_.size(), -1);
  std::vector<int> order = ResidentSlotsInOrder();
  for (size_t r = 0; r < order.size(); ++r) rank[order[r]] = int64_t(r);
  return rank;
}

void CascadeStream::Renormalise(absl::Span<float> pending) {
  double scale = ScoreScale(params_.beta, score_exponent_);
  for (size_t s = params_.sinks; s < positions_.size(); ++s) {
    if (positions_[s] >= 0) scores_[s] = RescaleScore(scores_[s], scale);
  }
  for (float& u : pending) u = RescaleScore(u, scale);
  score_exponent_ = 0;
}

absl::Status CascadeStream::UpdateScores(int num_tokens,
                                         absl::Span<const float> probs,
                                         absl::Span<const float> self_probs,
                                         absl::Span<float> initial_scores) {
  const int64_t t_count = num_tokens;
  const int64_t slots = num_slots();
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens: ", num_tokens, ", want >= 1"));
  }
  // Empty probs and self_probs: a step without attention (APPEND without a
  // query), as if every probability were 0, without T × slots zeros.
  const bool no_attention = probs.empty() && self_probs.empty();
  if (!no_attention && int64_t(probs.size()) != t_count * slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("probs: ", probs.size(), " floats, want ", t_count * slots,
                     " (", t_count, " x ", slots, ")"));
  }
  if (!no_attention && int64_t(self_probs.size()) != t_count * t_count) {
    return absl::InvalidArgumentError(
        absl::StrCat("self_probs: ", self_probs.size(), " floats, want ",
                     t_count * t_count));
  }
  if (int64_t(initial_scores.size()) != t_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "initial_scores: ", initial_scores.size(), " floats, want ", t_count));
  }
  // Check every value read before changing anything. `!(p >= 0)` catches NaN;
  // +inf would poison the stream's scores for good.
  for (int64_t q = 0; q < t_count && !no_attention; ++q) {
    for (int64_t s = params_.sinks; s < slots; ++s) {
      float p = probs[q * slots + s];
      if (positions_[s] >= 0 && !(p >= 0.0f && std::isfinite(p))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "probs[", q, "][", s, "]: ", p, ", want finite and >= 0"));
      }
    }
    for (int64_t i = 0; i <= q; ++i) {
      float p = self_probs[q * t_count + i];
      if (!(p >= 0.0f && std::isfinite(p))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "self_probs[", q, "][", i, "]: ", p, ", want finite and >= 0"));
      }
    }
  }

  std::fill(initial_scores.begin(), initial_scores.end(), 0.0f);
  for (int64_t q = 0; q < t_count; ++q) {
    if (score_exponent_ > 0 &&
        NeedsMidStepRenormalisation(params_.beta, score_exponent_ + 1)) {
      // Only the first q new tokens have partial sums; the rest are 0.
      Renormalise(initial_scores);
    }
    if (no_attention) {  // u + factor·0 = u: only n advances
      ++score_exponent_;
      continue;
    }
    const float factor = IncrementFactor(params_.beta, score_exponent_ + 1);
    const float* row = probs.data() + q * slots;
    for (int64_t s = params_.sinks; s < slots; ++s) {
      if (positions_[s] < 0) continue;
      scores_[s] = AccumulateScore(scores_[s], factor, row[s]);
    }
    // New token i collects the increments of queries q >= i (causal).
    const float* self_row = self_probs.data() + q * t_count;
    for (int64_t i = 0; i <= q; ++i) {
      initial_scores[i] =
          AccumulateScore(initial_scores[i], factor, self_row[i]);
    }
    ++score_exponent_;
  }
  if (NeedsRenormalisation(params_.beta, score_exponent_)) {
    Renormalise(initial_scores);
  }
  return absl::OkStatus();
}

absl::Status CascadeStream::InsertTokens(int64_t first_position, int num_tokens,
                                         absl::Span<const uint8_t> keys,
                                         absl::Span<const uint8_t> values,
                                         absl::Span<const float> initial_scores,
                                         InsertResult* result) {
  if (first_position != tokens_seen_) {
    return absl::FailedPreconditionError(
        absl::StrCat("first_position: ", first_position, ", want ",
                     tokens_seen_, " (the stream's next position)"));
  }
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens: ", num_tokens, ", want >= 1"));
  }
  const size_t rows_bytes = size_t(num_tokens) * row_bytes_;
  if (keys.size() != rows_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys: ", keys.size(), " bytes, want ", rows_bytes));
  }
  if (values.size() != rows_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("values: ", values.size(), " bytes, want ", rows_bytes));
  }
  if (initial_scores.size() != size_t(num_tokens)) {
    return absl::InvalidArgumentError(
        absl::StrCat("initial_scores: ", initial_scores.size(),
                     " floats, want ", num_tokens));
  }

  *result = InsertResult();
  std::vector<bool> changed(positions_.size(), false);
  std::vector<uint8_t> carry_key(row_bytes_);
  std::vector<uint8_t> carry_value(row_bytes_);
  const CascadeParams& p = params_;

  // Exchanges the carry with slot s (position, score, rows): the carry goes
  // in, the old occupant becomes the carry.
  auto swap_with_slot = [&](Carry& carry, int s) {
    std::swap(carry.position, positions_[s]);
    std::swap(carry.score, scores_[s]);
    std::swap_ranges(carry.key, carry.key + row_bytes_,
                     keys_.data() + size_t(s) * row_bytes_);
    std::swap_ranges(carry.value, carry.value + row_bytes_,
                     values_.data() + size_t(s) * row_bytes_);
    changed[s] = true;
  };
  auto evict = [&](const Carry& carry) {
    result->evicted.positions.push_back(carry.position);
    result->evicted.keys.insert(result->evicted.keys.end(), carry.key,
                                carry.key + row_bytes_);
    result->evicted.values.insert(result->evicted.values.end(), carry.value,
                                  carry.value + row_bytes_);
  };

  for (int j = 0; j < num_tokens; ++j) {
    const int64_t t = first_position + j;
    std::memcpy(carry_key.data(), keys.data() + size_t(j) * row_bytes_,
                row_bytes_);
    std::memcpy(carry_value.data(), values.data() + size_t(j) * row_bytes_,
                row_bytes_);
    Carry carry{t, initial_scores[j], carry_key.data(), carry_value.data()};
    ++tokens_seen_;
    if (t < p.sinks) {  // rule 1: sink slot t (empty until now)
      swap_with_slot(carry, int(t));
      scores_[t] = 0.0f;  // sinks keep no score
      continue;
    }
    const int accepting =
        AcceptingCascades(t, p.sinks, p.cascades, p.window, p.eager_fill);
    bool placed = false;
    for (int i = 0; i < p.cascades && !placed; ++i) {
      const int base = p.sinks + i * p.window;
      if (i < accepting) {
        if (stored_[i] < p.window) {  // a: append as newest, stop
          swap_with_slot(carry, base + stored_[i]);
          ++stored_[i];
          placed = true;
        } else {  // b: overwrite the oldest, which carries on
          swap_with_slot(carry, base + head_[i]);
          head_[i] = (head_[i] + 1) % p.window;
        }
      } else if (stored_[i] == 0) {  // c: empty, not accepting: take it
        swap_with_slot(carry, base);
        stored_[i] = 1;
        placed = true;
      } else {  // d: duel the newest; the loser leaves
        const int newest = base + (head_[i] + stored_[i] - 1) % stored_[i];
        if (CarryWinsDuel(carry.score, scores_[newest])) {
          swap_with_slot(carry, newest);
        }
        evict(carry);
        placed = true;
      }
    }
    if (!placed) evict(carry);  // b at cascade C−1: fell off the end
  }
  for (size_t s = 0; s < changed.size(); ++s) {
    if (changed[s]) result->changed_slots.push_back(int(s));
  }
  return absl::OkStatus();
}

CascadeStream::Snapshot CascadeStream::Export() const {
  Snapshot s;
  s.tokens_seen = tokens_seen_;
  s.score_exponent = score_exponent_;
  s.positions = positions_;
  s.scores = scores_;
  s.keys = keys_;
  s.values = values_;
  s.stored = stored_;
  s.head = head_;
  return s;
}

absl::StatusOr<CascadeStream> CascadeStream::Import(const CascadeParams& params,
                                                    int row_bytes,
                                                    Snapshot snapshot) {
  absl::StatusOr<CascadeStream> made = Create(params, row_bytes);
  if (!made.ok()) return made.status();
  CascadeStream& c = *made;
  const size_t slots = c.positions_.size();
  const size_t cascades = size_t(params.cascades);
  if (snapshot.positions.size() != slots || snapshot.scores.size() != slots ||
      snapshot.keys.size() != slots * size_t(row_bytes) ||
      snapshot.values.size() != slots * size_t(row_bytes) ||
      snapshot.stored.size() != cascades || snapshot.head.size() != cascades) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapshot: sizes do not fit ", slots, " slots of ",
                     row_bytes, " bytes and ", cascades, " cascades"));
  }
  for (size_t i = 0; i < cascades; ++i) {
    if (snapshot.stored[i] < 0 || snapshot.stored[i] > params.window ||
        snapshot.head[i] < 0 || snapshot.head[i] >= params.window) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot: cascade ", i, " stored ", snapshot.stored[i], " head ",
          snapshot.head[i], " out of range for window ", params.window));
    }
  }
  if (snapshot.tokens_seen < 0 || snapshot.score_exponent < 0) {
    return absl::InvalidArgumentError("snapshot: negative counters");
  }
  c.tokens_seen_ = snapshot.tokens_seen;
  c.score_exponent_ = snapshot.score_exponent;
  c.positions_ = std::move(snapshot.positions);
  c.scores_ = std::move(snapshot.scores);
  c.keys_ = std::move(snapshot.keys);
  c.values_ = std::move(snapshot.values);
  c.stored_ = std::move(snapshot.stored);
  c.head_ = std::move(snapshot.head);
  return made;
}

}  // namespace kvmem
