// Randomised tests of the host cascade policy (kernels/cascade_policy.h):
// a list-based slow model of specs/cascade.md §2–3 in double, the u/n score
// form at the paper's β, and bookkeeping properties. Seeds come from
// std::random_device and are printed with every failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cascade_policy.h"
#include "tests/kernels/cascade_policy_test_util.h"

namespace kvmem::cascade_test {
namespace {

// ---- A list-based slow model of cascade.md §2–3, in double s-form ----------

struct SlowToken {
  int64_t position;
  double score;
};

class SlowModel {
 public:
  explicit SlowModel(const CascadeParams& p) : p_(p), cascades_(p.cascades) {}

  void Update(const std::map<int64_t, double>& r) {
    for (auto& c : cascades_) {
      for (SlowToken& tok : c) {
        tok.score = p_.beta * tok.score + (1 - p_.beta) * r.at(tok.position);
      }
    }
  }

  // Appends token t; returns the evicted position or −1. A duel whose
  // relative gap is below 1e-4 (float rounding can flip it) follows
  // `impl_evicted`, the choice the implementation made.
  int64_t Append(int64_t t, double score, int64_t impl_evicted) {
    if (int64_t(sinks_.size()) < p_.sinks) {
      sinks_.push_back(t);
      return -1;
    }
    SlowToken carry{t, score};
    for (int i = 0; i < p_.cascades; ++i) {
      std::deque<SlowToken>& c = cascades_[i];
      bool accepts =
          (p_.eager_fill && t - p_.sinks <= int64_t{p_.cascades} * p_.window) ||
          (t - p_.sinks) % (int64_t{1} << std::min(i, 62)) == 0;
      if (accepts) {
        c.push_back(carry);
        if (int(c.size()) <= p_.window) return -1;
        carry = c.front();
        c.pop_front();
        continue;
      }
      if (c.empty()) {
        c.push_back(carry);
        return -1;
      }
      SlowToken& newest = c.back();
      double m = std::max(std::fabs(carry.score), std::fabs(newest.score));
      bool wins = carry.score >= newest.score;
      if (std::fabs(carry.score - newest.score) < 1e-4 * m) {
        ++near_ties_;
        wins = impl_evicted == newest.position;
      }
      if (wins) std::swap(carry, newest);
      return carry.position;
    }
    return carry.position;
  }

  std::vector<int64_t> Positions(int i) const {
    std::vector<int64_t> out;
    for (const SlowToken& tok : cascades_[i]) out.push_back(tok.position);
    return out;
  }
  double Score(int i, int k) const { return cascades_[i][k].score; }
  int near_ties() const { return near_ties_; }

 private:
  CascadeParams p_;
  std::vector<int64_t> sinks_;
  std::vector<std::deque<SlowToken>> cascades_;
  int near_ties_ = 0;
};

// Steps `stream` and the slow model together, one token at a time; checks
// resident sets, evictions and scores (s within rel 1e-4) at every step.
// Returns how often n went down (renormalisations).
int CompareWithSlowModel(const CascadeParams& params, int steps, int group,
                         ScoreReduction reduction, const WeightFn& weight) {
  CascadeStream stream = MakeStream(params, 3);
  SlowModel slow(params);
  int renormalisations = 0;
  for (int t = 0; t < steps; ++t) {
    SCOPED_TRACE("t = " + std::to_string(t));
    StepProbs p = Attend(stream, 1, group, reduction, weight);
    std::map<int64_t, double> r;
    for (int s = 0; s < stream.num_slots(); ++s) {
      if (stream.slot_position(s) >= 0) r[stream.slot_position(s)] = p.probs[s];
    }
    int64_t n_before = stream.score_exponent();
    std::vector<float> initial(1);
    EXPECT_TRUE(
        stream.UpdateScores(1, p.probs, p.self_probs, absl::MakeSpan(initial))
            .ok());
    if (stream.score_exponent() <= n_before) ++renormalisations;
    std::vector<uint8_t> k = RowOf(3, t, 0), v = RowOf(3, t, 1);
    InsertResult result;
    EXPECT_TRUE(stream.InsertTokens(t, 1, k, v, initial, &result).ok());
    int64_t impl_evicted =
        result.evicted.positions.empty() ? -1 : result.evicted.positions[0];
    EXPECT_LE(result.evicted.positions.size(), 1u);
    slow.Update(r);
    int64_t slow_evicted =
        slow.Append(t, (1 - params.beta) * p.self_probs[0], impl_evicted);
    EXPECT_EQ(impl_evicted, slow_evicted);
    for (int i = 0; i < params.cascades; ++i) {
      if (stream.CascadePositions(i) != slow.Positions(i)) {
        ADD_FAILURE() << "cascade " << i << ": {"
                      << Join(stream.CascadePositions(i)) << "}, slow model {"
                      << Join(slow.Positions(i)) << "}";
        return renormalisations;
      }
      std::vector<int> slots = stream.CascadeSlots(i);
      for (size_t j = 0; j < slots.size(); ++j) {
        double want = slow.Score(i, int(j));
        EXPECT_NEAR(stream.ReportedScore(slots[j]), want, 1e-4 * want)
            << "cascade " << i << " token " << stream.slot_position(slots[j]);
      }
    }
  }
  std::printf("  near-ties followed: %d, renormalisations: %d\n",
              slow.near_ties(), renormalisations);
  return renormalisations;
}

TEST(CascadeSlowModel, RandomConfigsIntegerWeights) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int config = 0; config < 150; ++config) {
    CascadeParams params{int(rng() % 4), 1 + int(rng() % 4), 1 + int(rng() % 5),
                         rng() % 2 == 0, rng() % 2 ? 0.5 : 0.75};
    int group = 1 + int(rng() % 3);
    ScoreReduction red =
        rng() % 2 ? ScoreReduction::kMax : ScoreReduction::kMean;
    SCOPED_TRACE("config " + std::to_string(config));
    CompareWithSlowModel(params, 100, group, red, HashWeights(rng()));
  }
}

// ---- 5. The u/n representation at the paper's β ----------------------------

TEST(CascadeScores, PaperBetaMatchesDoubleWithRenormalisation) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  // β = 0.9999999 renormalises only after ~1.4e8 tokens, so this run checks
  // decisions and scores there, and the run at β = 0.99 (renormalising every
  // ~1380 tokens) checks that renormalising changes no decision.
  CompareWithSlowModel({2, 3, 8, true, 0.9999999}, 1500, 2,
                       ScoreReduction::kMax, HashWeights(seed));
  int renormalisations =
      CompareWithSlowModel({2, 3, 8, true, 0.99}, 4200, 2, ScoreReduction::kMax,
                           HashWeights(seed + 1));
  EXPECT_EQ(renormalisations, 3);  // n passes 2^20 at n = 1380: 3 times
}

TEST(CascadeScores, RenormalisationBoundaryAtPaperBeta) {
  const double beta = 0.9999999;
  // β^(−n) = 2^20 ⇔ n = 20·ln 2 / −ln β ≈ 1.386e8.
  const int64_t n = int64_t(20 * std::log(2.0) / -std::log(beta));
  EXPECT_FALSE(NeedsRenormalisation(beta, n - 2));
  EXPECT_TRUE(NeedsRenormalisation(beta, n + 2));
  // Factors carry the exact (1−β)β^(−k) to fp32 precision.
  for (int64_t k : {int64_t{1}, int64_t{1000}, n}) {
    double want = (1 - beta) * std::pow(beta, -double(k));
    EXPECT_NEAR(IncrementFactor(beta, k), want, 1e-7 * want) << k;
  }
}

// A token attended with r(k) at every step, from score 0: the u form tracks
// s in double to fp32 summation error, while fp32 s ← β·s + (1−β)·r
// quantises the 1e-7 decay (β·s moves by 1–2 ulp). Inputs are fixed.
TEST(CascadeScores, UFormKeepsSmallIncrementsAtPaperBeta) {
  const double beta = 0.9999999;
  const float beta_f = float(beta);
  const float one_minus_beta_f = float(1 - beta);
  double s_exact = 0;
  float s_fp32 = 0, u = 0;
  int64_t n = 0;
  for (int64_t k = 0; k < 200000; ++k) {
    const float r = float(Hash(5, k, 0, 0) % 1000) / 1000.0f;
    s_exact = beta * s_exact + (1 - beta) * r;
    s_fp32 = AddF(MulF(beta_f, s_fp32), MulF(one_minus_beta_f, r));
    u = AccumulateScore(u, IncrementFactor(beta, n + 1), r);
    ++n;
    ASSERT_FALSE(NeedsRenormalisation(beta, n));
  }
  const double s_u = double(u) * ScoreScale(beta, n);
  const double err_u = std::fabs(s_u - s_exact) / s_exact;
  const double err_fp32 = std::fabs(double(s_fp32) - s_exact) / s_exact;
  std::printf("  relative error: u form %.2e, fp32 s form %.2e\n", err_u,
              err_fp32);
  EXPECT_LT(err_u, 1e-4);
  EXPECT_GT(err_fp32, 10 * err_u);
}

// ---- 4. Bookkeeping properties on random configurations --------------------

TEST(CascadeProperties, EveryTokenResidentOrSpilledOnce) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const double betas[] = {0.5, 0.9, 0.9999999};
  for (int config = 0; config < 60; ++config) {
    CascadeParams params{int(rng() % 5), 1 + int(rng() % 4), 1 + int(rng() % 6),
                         rng() % 2 == 0, betas[rng() % 3]};
    const int row_bytes = 1 + int(rng() % 9);
    SCOPED_TRACE("config " + std::to_string(config) +
                 ": S=" + std::to_string(params.sinks) +
                 " C=" + std::to_string(params.cascades) +
                 " W=" + std::to_string(params.window));
    CascadeStream stream = MakeStream(params, row_bytes);
    WeightFn weight = HashWeights(rng());
    std::set<int64_t> spilled;
    while (stream.tokens_seen() < 200) {
      const int size = rng() % 10 == 0 ? 70 : 1 + int(rng() % 8);
      std::vector<int64_t> before(stream.num_slots());
      for (int s = 0; s < stream.num_slots(); ++s) {
        before[s] = stream.slot_position(s);
      }
      InsertResult r = Step(
          stream, size, 1 + int(rng() % 3),
          rng() % 2 ? ScoreReduction::kMax : ScoreReduction::kMean, weight);
      const EvictedTokens& e = r.evicted;
      ASSERT_EQ(e.keys.size(), e.positions.size() * row_bytes);
      ASSERT_EQ(e.values.size(), e.positions.size() * row_bytes);
      for (size_t k = 0; k < e.positions.size(); ++k) {
        const int64_t pos = e.positions[k];
        ASSERT_TRUE(pos >= 0 && pos < stream.tokens_seen()) << pos;
        ASSERT_TRUE(spilled.insert(pos).second) << "spilled twice: " << pos;
        EXPECT_TRUE(std::equal(e.keys.begin() + k * row_bytes,
                               e.keys.begin() + (k + 1) * row_bytes,
                               RowOf(row_bytes, pos, 0).begin()));
        EXPECT_TRUE(std::equal(e.values.begin() + k * row_bytes,
                               e.values.begin() + (k + 1) * row_bytes,
                               RowOf(row_bytes, pos, 1).begin()));
      }
      std::set<int> changed(r.changed_slots.begin(), r.changed_slots.end());
      EXPECT_TRUE(
          std::is_sorted(r.changed_slots.begin(), r.changed_slots.end()));
      EXPECT_EQ(changed.size(), r.changed_slots.size());
      std::set<int64_t> resident;
      for (int s = 0; s < stream.num_slots(); ++s) {
        const int64_t pos = stream.slot_position(s);
        EXPECT_TRUE(pos == before[s] || changed.count(s)) << "slot " << s;
        if (pos < 0) continue;
        EXPECT_TRUE(resident.insert(pos).second) << "twice resident: " << pos;
        EXPECT_FALSE(spilled.count(pos)) << pos;
        EXPECT_TRUE(stream.key_row(s) ==
                    absl::MakeConstSpan(RowOf(row_bytes, pos, 0)));
        EXPECT_TRUE(stream.value_row(s) ==
                    absl::MakeConstSpan(RowOf(row_bytes, pos, 1)));
        EXPECT_TRUE(std::isfinite(stream.ReportedScore(s)));
        EXPECT_GE(stream.ReportedScore(s), 0.0f);
      }
      ASSERT_EQ(int64_t(resident.size() + spilled.size()),
                stream.tokens_seen());
      EXPECT_EQ(int(resident.size()), stream.ResidentCount());
      EXPECT_LE(stream.ResidentCount(),
                params.sinks + params.cascades * params.window);
      // Paper order = ascending position; CACHE_RANK = rank in it.
      std::vector<int> order = stream.ResidentSlotsInOrder();
      std::vector<int64_t> rank = stream.CacheRankPositions();
      ASSERT_EQ(order.size(), resident.size());
      for (size_t k = 0; k < order.size(); ++k) {
        EXPECT_EQ(stream.slot_position(order[k]),
                  *std::next(resident.begin(), k));
        EXPECT_EQ(rank[order[k]], int64_t(k));
      }
    }
  }
}

}  // namespace
}  // namespace kvmem::cascade_test
