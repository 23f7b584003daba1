// Tests of the host cascade policy (kernels/cascade_policy.h): the golden
// tables of specs/cascade.md §7 (printed by cascade_reference.py), ties,
// StreamingLLM (C = 1), chunks vs single steps, and the promised errors.
// Random-input tests are in cascade_policy_random_test.cc.
#include "kernels/cascade_policy.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/cascade_policy_test_util.h"

namespace kvmem::cascade_test {
namespace {

// ---- 1. Golden tables of cascade.md §7 (from cascade_reference.py) -------

struct GoldenRow {
  std::string sinks, c0, c1;
  std::vector<int64_t> evicted;
};

double GoldenWeight(int g, int64_t t, int64_t p) {
  return 1 + (5 * p + 3 * t + 2 * g) % 7;
}

void RunGolden(const CascadeParams& params, const std::vector<GoldenRow>& rows,
               const std::map<int64_t, double>& final_scores,
               const std::map<int64_t, int64_t>& rope) {
  CascadeStream stream = MakeStream(params, 4);
  for (size_t t = 0; t < rows.size(); ++t) {
    SCOPED_TRACE("t = " + std::to_string(t));
    InsertResult r = Step(stream, 1, 2, ScoreReduction::kMax, GoldenWeight);
    EXPECT_EQ(Join(SinkPositions(stream)), rows[t].sinks);
    EXPECT_EQ(Join(stream.CascadePositions(0)), rows[t].c0);
    EXPECT_EQ(Join(stream.CascadePositions(1)), rows[t].c1);
    EXPECT_EQ(r.evicted.positions, rows[t].evicted);
  }
  std::map<int64_t, double> scores;
  std::map<int64_t, int64_t> ranks;
  std::vector<int64_t> rank = stream.CacheRankPositions();
  for (int s = 0; s < stream.num_slots(); ++s) {
    if (stream.slot_position(s) < 0) continue;
    ranks[stream.slot_position(s)] = rank[s];
    if (s >= params.sinks) {
      scores[stream.slot_position(s)] = stream.ReportedScore(s);
    }
  }
  ASSERT_EQ(scores.size(), final_scores.size());
  for (const auto& [pos, want] : final_scores) {
    // Printed to 5 decimals: within half a unit of the last digit.
    EXPECT_NEAR(scores[pos], want, 0.5e-5 + 1e-7) << "token " << pos;
  }
  EXPECT_EQ(ranks, rope);
}

TEST(CascadeGolden, TableAEagerFill) {
  CascadeParams params{2, 2, 4, true, 0.5};
  std::vector<GoldenRow> rows = {{"0", "", "", {}},
                                 {"0 1", "", "", {}},
                                 {"0 1", "2", "", {}},
                                 {"0 1", "2 3", "", {}},
                                 {"0 1", "2 3 4", "", {}},
                                 {"0 1", "2 3 4 5", "", {}},
                                 {"0 1", "3 4 5 6", "2", {}},
                                 {"0 1", "4 5 6 7", "2 3", {}},
                                 {"0 1", "5 6 7 8", "2 3 4", {}},
                                 {"0 1", "6 7 8 9", "2 3 4 5", {}},
                                 {"0 1", "7 8 9 10", "3 4 5 6", {2}},
                                 {"0 1", "8 9 10 11", "3 4 5 7", {6}},
                                 {"0 1", "9 10 11 12", "4 5 7 8", {3}},
                                 {"0 1", "10 11 12 13", "4 5 7 8", {9}},
                                 {"0 1", "11 12 13 14", "5 7 8 10", {4}},
                                 {"0 1", "12 13 14 15", "5 7 8 10", {11}},
                                 {"0 1", "13 14 15 16", "7 8 10 12", {5}},
                                 {"0 1", "14 15 16 17", "7 8 10 12", {13}},
                                 {"0 1", "15 16 17 18", "8 10 12 14", {7}},
                                 {"0 1", "16 17 18 19", "8 10 12 15", {14}},
                                 {"0 1", "17 18 19 20", "10 12 15 16", {8}},
                                 {"0 1", "18 19 20 21", "10 12 15 16", {17}},
                                 {"0 1", "19 20 21 22", "12 15 16 18", {10}},
                                 {"0 1", "20 21 22 23", "12 15 16 18", {19}}};
  RunGolden(params, rows,
            {{20, 0.10395},
             {21, 0.11068},
             {22, 0.08953},
             {23, 0.04808},
             {12, 0.10853},
             {15, 0.12261},
             {16, 0.12639},
             {18, 0.12143}},
            {{0, 0},
             {1, 1},
             {12, 2},
             {15, 3},
             {16, 4},
             {18, 5},
             {20, 6},
             {21, 7},
             {22, 8},
             {23, 9}});
}

// `cascade_reference.py --no-eager-fill --window 3 --steps 16` (rule c).
TEST(CascadeGolden, TableBNoEagerFillWindow3) {
  CascadeParams params{2, 2, 3, false, 0.5};
  std::vector<GoldenRow> rows = {{"0", "", "", {}},
                                 {"0 1", "", "", {}},
                                 {"0 1", "2", "", {}},
                                 {"0 1", "2 3", "", {}},
                                 {"0 1", "2 3 4", "", {}},
                                 {"0 1", "3 4 5", "2", {}},
                                 {"0 1", "4 5 6", "2 3", {}},
                                 {"0 1", "5 6 7", "2 4", {3}},
                                 {"0 1", "6 7 8", "2 4 5", {}},
                                 {"0 1", "7 8 9", "2 4 5", {6}},
                                 {"0 1", "8 9 10", "4 5 7", {2}},
                                 {"0 1", "9 10 11", "4 5 7", {8}},
                                 {"0 1", "10 11 12", "5 7 9", {4}},
                                 {"0 1", "11 12 13", "5 7 10", {9}},
                                 {"0 1", "12 13 14", "7 10 11", {5}},
                                 {"0 1", "13 14 15", "7 10 11", {12}}};
  RunGolden(
      params, rows,
      {{13, 0.15749},
       {14, 0.09286},
       {15, 0.04762},
       {7, 0.13294},
       {10, 0.15208},
       {11, 0.14707}},
      {{0, 0}, {1, 1}, {7, 2}, {10, 3}, {11, 4}, {13, 5}, {14, 6}, {15, 7}});
}

// cascade.md §2 d: a tie goes to the incoming carry. All probabilities 0 ⇒
// every score is 0 and every duel a tie. S = 0, C = 2, W = 1, no eager fill:
// t = 1 puts 0 into c1 (rule c), t = 2 pushes 1 into c1 and drops 0, t = 3
// carries 2 into a duel with c1's newest, 1.
TEST(CascadeGolden, TiesGoToTheCarry) {
  CascadeStream stream = MakeStream({0, 2, 1, false, 0.5}, 1);
  const std::vector<std::vector<int64_t>> want_evicted = {{}, {}, {0}, {1}};
  for (int64_t t = 0; t < 4; ++t) {
    std::vector<float> probs(stream.num_slots(), 0.0f), self(1, 0.0f);
    std::vector<float> initial(1);
    ASSERT_TRUE(
        stream.UpdateScores(1, probs, self, absl::MakeSpan(initial)).ok());
    std::vector<uint8_t> row(1, uint8_t(t));
    InsertResult result;
    ASSERT_TRUE(stream.InsertTokens(t, 1, row, row, initial, &result).ok());
    EXPECT_EQ(result.evicted.positions, want_evicted[t]) << "t = " << t;
  }
  EXPECT_EQ(stream.CascadePositions(1), std::vector<int64_t>{2});
}

// ---- 2. C = 1 is StreamingLLM -----------------------------------------------

TEST(CascadeStreamingLlm, OneCascadeIsSinksPlusSlidingWindow) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int config = 0; config < 20; ++config) {
    CascadeParams params{int(rng() % 5), 1, 1 + int(rng() % 9), rng() % 2 == 0,
                         0.9};
    SCOPED_TRACE("S=" + std::to_string(params.sinks) +
                 " W=" + std::to_string(params.window));
    CascadeStream stream = MakeStream(params, 5);
    WeightFn w = HashWeights(rng());
    for (int64_t t = 0; t < 60; ++t) {
      InsertResult r = Step(stream, 1, 2, ScoreReduction::kMax, w);
      std::vector<int64_t> want_window;
      for (int64_t p = std::max<int64_t>(params.sinks, t - params.window + 1);
           p <= t; ++p) {
        want_window.push_back(p);
      }
      ASSERT_EQ(stream.CascadePositions(0), want_window) << "t = " << t;
      std::vector<int64_t> want_evicted;
      if (t - params.window >= params.sinks) want_evicted = {t - params.window};
      ASSERT_EQ(r.evicted.positions, want_evicted) << "t = " << t;
      EXPECT_EQ(int64_t(SinkPositions(stream).size()),
                std::min<int64_t>(t + 1, params.sinks));
    }
  }
}

// ---- 3. Chunked insertion vs single-token steps ----------------------------

// Runs `chunked` in chunks of `sizes` and `single` one token at a time over
// the same tokens; calls `check` at every chunk boundary with the evictions
// of that chunk and of the matching single steps.
void RunChunkedAndSingle(
    CascadeStream& chunked, CascadeStream& single,
    const std::vector<int>& sizes, const WeightFn& weight,
    const std::function<void(const std::vector<int64_t>&,
                             const std::vector<int64_t>&)>& check) {
  for (int size : sizes) {
    SCOPED_TRACE("chunk at " + std::to_string(chunked.tokens_seen()) +
                 ", size " + std::to_string(size));
    InsertResult c = Step(chunked, size, 2, ScoreReduction::kMax, weight);
    std::vector<int64_t> single_evicted;
    for (int j = 0; j < size; ++j) {
      InsertResult r = Step(single, 1, 2, ScoreReduction::kMax, weight);
      single_evicted.insert(single_evicted.end(), r.evicted.positions.begin(),
                            r.evicted.positions.end());
    }
    check(c.evicted.positions, single_evicted);
  }
}

// cascade.md §3 (kvmem choice): without eviction and duel in a chunk, a chunk
// equals its tokens stepped one by one. In the u form that is bit for bit:
// the same factors are added in the same order (no renormalisation here).
TEST(CascadeChunks, NoEvictionNoDuelEqualsSingleSteps) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (double beta : {0.5, 0.9, 0.9999999}) {
    // Eager fill: the first S + C·W = 14 tokens evict nothing and duel never.
    CascadeParams params{2, 3, 4, true, beta};
    std::vector<int> sizes;
    for (int left = 14; left > 0;) {
      sizes.push_back(std::min<int>(left, 1 + int(rng() % 6)));
      left -= sizes.back();
    }
    CascadeStream chunked = MakeStream(params, 6);
    CascadeStream single = MakeStream(params, 6);
    RunChunkedAndSingle(
        chunked, single, sizes, HashWeights(rng()),
        [&](const std::vector<int64_t>& c, const std::vector<int64_t>& s) {
          EXPECT_TRUE(c.empty());
          EXPECT_TRUE(s.empty());
          ASSERT_EQ(chunked.score_exponent(), single.score_exponent());
          for (int i = 0; i < params.cascades; ++i) {
            EXPECT_EQ(chunked.stored(i), single.stored(i));
            EXPECT_EQ(chunked.head(i), single.head(i));
          }
          for (int slot = 0; slot < chunked.num_slots(); ++slot) {
            EXPECT_EQ(chunked.slot_position(slot), single.slot_position(slot));
            // Bit for bit, not within a tolerance.
            EXPECT_EQ(FloatBits(chunked.slot_score(slot)),
                      FloatBits(single.slot_score(slot)))
                << "slot " << slot;
            EXPECT_TRUE(chunked.key_row(slot) == single.key_row(slot));
          }
        });
  }
}

// Where a chunk evicts, the two differ in scores only: the chunk's queries
// attend tokens that single steps would have evicted already (so every
// softmax has other normalisers, and evicted tokens get later queries'
// increments). Occupancy never depends on scores, so without duels (C = 1)
// the resident positions and evictions still agree.
TEST(CascadeChunks, EvictionWithoutDuelsKeepsPositionsNotScores) {
  CascadeParams params{2, 1, 4, true, 0.9};
  CascadeStream chunked = MakeStream(params, 2);
  CascadeStream single = MakeStream(params, 2);
  bool scores_differ = false;
  RunChunkedAndSingle(
      chunked, single, {5, 5, 5, 5, 5, 5}, HashWeights(11),
      [&](const std::vector<int64_t>& c, const std::vector<int64_t>& s) {
        EXPECT_EQ(c, s);
        EXPECT_EQ(chunked.CascadePositions(0), single.CascadePositions(0));
        for (int slot = 0; slot < chunked.num_slots(); ++slot) {
          scores_differ |= chunked.slot_score(slot) != single.slot_score(slot);
        }
      });
  EXPECT_TRUE(scores_differ);
}

// With duels, a duel's winner may differ (scores differ as above), but the
// occupancy (counts, heads, number of evictions) is score-free and agrees.
TEST(CascadeChunks, DuelsKeepOccupancy) {
  CascadeParams params{1, 3, 2, false, 0.9};
  CascadeStream chunked = MakeStream(params, 2);
  CascadeStream single = MakeStream(params, 2);
  RunChunkedAndSingle(
      chunked, single, {4, 4, 4, 4, 4, 4, 4, 4, 4, 4}, HashWeights(12),
      [&](const std::vector<int64_t>& c, const std::vector<int64_t>& s) {
        EXPECT_EQ(c.size(), s.size());
        EXPECT_EQ(chunked.ResidentCount(), single.ResidentCount());
        for (int i = 0; i < params.cascades; ++i) {
          EXPECT_EQ(chunked.stored(i), single.stored(i));
          EXPECT_EQ(chunked.head(i), single.head(i));
        }
      });
}

// A chunk's scores are cascade.md §3's kvmem formula: resident
// s ← β^T·s + Σ_q (1−β)β^(T−1−q)·r(q,j), new token i gets
// Σ_{q≥i} (1−β)β^(T−1−q)·r(q,i). β = 1/2 and T = 200 also take the
// mid-step renormalisation (factors pass 2^64 at q = 64 and 128; without it
// they would overflow fp32 from q = 128 on).
TEST(CascadeChunks, ChunkScoresFollowFormula) {
  const double beta = 0.5;
  const int kT = 200;
  CascadeStream stream = MakeStream({0, 1, 256, true, beta}, 1);
  WeightFn weight = HashWeights(13);
  for (int t = 0; t < 10; ++t) Step(stream, 1, 2, ScoreReduction::kMax, weight);
  std::map<int64_t, double> want;
  for (int s = 0; s < 10; ++s) {
    want[stream.slot_position(s)] =
        stream.ReportedScore(s) * std::pow(beta, kT);
  }
  StepProbs p = Attend(stream, kT, 2, ScoreReduction::kMax, weight);
  for (int q = 0; q < kT; ++q) {
    const double f = (1 - beta) * std::pow(beta, kT - 1 - q);
    for (int s = 0; s < 10; ++s) {
      want[stream.slot_position(s)] += f * p.probs[size_t(q) * 256 + s];
    }
    for (int i = 0; i <= q; ++i) {
      want[10 + i] += f * p.self_probs[size_t(q) * kT + i];
    }
  }
  std::vector<float> initial(kT);
  ASSERT_TRUE(
      stream.UpdateScores(kT, p.probs, p.self_probs, absl::MakeSpan(initial))
          .ok());
  std::vector<uint8_t> rows(kT, 0);
  InsertResult result;
  ASSERT_TRUE(stream.InsertTokens(10, kT, rows, rows, initial, &result).ok());
  EXPECT_TRUE(result.evicted.positions.empty());
  for (int s = 0; s < 10 + kT; ++s) {
    double w = want[stream.slot_position(s)];
    EXPECT_NEAR(stream.ReportedScore(s), w, 2e-6 * w) << "slot " << s;
  }
}

// ---- Errors: each field named; a failed call changes nothing ---------------

TEST(CascadeErrors, ValidateNamesTheField) {
  const std::pair<CascadeParams, std::string> bad[] = {
      {{-1, 2, 4, true, 0.5}, "sinks"},
      {{2, 0, 4, true, 0.5}, "cascades"},
      {{2, 2, 0, true, 0.5}, "window"},
      {{2, 2, 4, true, 1.0}, "beta"},
      {{2, 2, 4, true, 0.0}, "beta"},
      {{2, 2, 4, true, std::nan("")}, "beta"},
      {{2, 1 << 16, 1 << 16, true, 0.5}, "sinks + cascades * window"}};
  for (const auto& [params, field] : bad) {
    absl::Status status = params.Validate();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_EQ(status.message().find(field + ":"), 0u) << status;
    EXPECT_FALSE(CascadeStream::Create(params, 4).ok());
  }
  EXPECT_TRUE(CascadeParams().Validate().ok());
  absl::StatusOr<CascadeStream> s =
      CascadeStream::Create({2, 2, 4, true, .5}, 0);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("row_bytes"), std::string::npos);
}

TEST(CascadeErrors, FailedCallsChangeNothing) {
  CascadeStream stream = MakeStream({1, 2, 2, true, 0.5}, 2);
  WeightFn weight = HashWeights(3);
  for (int t = 0; t < 4; ++t) Step(stream, 1, 1, ScoreReduction::kMax, weight);
  const CascadeStream saved = stream;
  auto unchanged = [&] {
    EXPECT_EQ(stream.tokens_seen(), saved.tokens_seen());
    EXPECT_EQ(stream.score_exponent(), saved.score_exponent());
    for (int s = 0; s < stream.num_slots(); ++s) {
      EXPECT_EQ(stream.slot_position(s), saved.slot_position(s));
      EXPECT_EQ(FloatBits(stream.slot_score(s)),
                FloatBits(saved.slot_score(s)));
    }
  };
  const int n = stream.num_slots();
  std::vector<float> probs(n, 0.1f), self(1, 0.1f), initial(1);
  EXPECT_EQ(stream
                .UpdateScores(1, std::vector<float>(n + 1), self,
                              absl::MakeSpan(initial))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(stream.UpdateScores(0, {}, {}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  probs[1] = -1.0f;  // slot 1: cascade 0, occupied
  absl::Status st =
      stream.UpdateScores(1, probs, self, absl::MakeSpan(initial));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("probs[0]["), std::string::npos) << st;
  unchanged();

  std::vector<uint8_t> row(2, 7);
  InsertResult result;
  st = stream.InsertTokens(3, 1, row, row, initial, &result);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("want 4"), std::string::npos) << st;
  EXPECT_EQ(
      stream.InsertTokens(4, 1, std::vector<uint8_t>(3), row, initial, &result)
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(stream.InsertTokens(4, 1, row, row, {}, &result).code(),
            absl::StatusCode::kInvalidArgument);
  unchanged();
}

TEST(CascadeErrors, ReduceGroup) {
  // [G = 2, 2]: head 0 {0.2, 0.6}, head 1 {0.4, 0.1}.
  const std::vector<float> probs = {0.2f, 0.6f, 0.4f, 0.1f};
  std::vector<float> r(2);
  ASSERT_TRUE(
      ReduceGroup(ScoreReduction::kMax, 2, probs, absl::MakeSpan(r)).ok());
  EXPECT_EQ(r, (std::vector<float>{0.4f, 0.6f}));
  ASSERT_TRUE(
      ReduceGroup(ScoreReduction::kMean, 2, probs, absl::MakeSpan(r)).ok());
  EXPECT_EQ(r, (std::vector<float>{(0.2f + 0.4f) / 2, (0.6f + 0.1f) / 2}));
  EXPECT_EQ(
      ReduceGroup(ScoreReduction::kMax, 3, probs, absl::MakeSpan(r)).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      ReduceGroup(ScoreReduction::kMax, 0, probs, absl::MakeSpan(r)).code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem::cascade_test

namespace kvmem {
namespace {

// A step without attention (empty probabilities) is the same as one whose
// probabilities are all zero: same scores, same exponent, same decisions.
TEST(CascadeNoAttention, EmptyProbsEqualZeros) {
  CascadeParams params;
  params.sinks = 2;
  params.cascades = 2;
  params.window = 4;
  params.beta = 0.5;
  absl::StatusOr<CascadeStream> a = CascadeStream::Create(params, 4);
  absl::StatusOr<CascadeStream> b = CascadeStream::Create(params, 4);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<uint8_t> rows(4 * 3, 7);
  for (int step = 0; step < 20; ++step) {
    const int T = 1 + step % 3;
    // Give the streams some nonzero scores first, identically.
    std::vector<float> probs(size_t(T) * a->num_slots(), 0.25f);
    std::vector<float> self(size_t(T) * T, 0.5f);
    std::vector<float> init_a(static_cast<size_t>(T)),
        init_b(static_cast<size_t>(T));
    if (step % 2 == 0) {
      ASSERT_TRUE(a->UpdateScores(T, probs, self, absl::MakeSpan(init_a)).ok());
      ASSERT_TRUE(b->UpdateScores(T, probs, self, absl::MakeSpan(init_b)).ok());
    } else {
      std::fill(probs.begin(), probs.end(), 0.0f);
      std::fill(self.begin(), self.end(), 0.0f);
      ASSERT_TRUE(a->UpdateScores(T, probs, self, absl::MakeSpan(init_a)).ok());
      ASSERT_TRUE(b->UpdateScores(T, {}, {}, absl::MakeSpan(init_b)).ok());
    }
    EXPECT_EQ(init_a, init_b) << "step " << step;
    InsertResult ra, rb;
    absl::Span<const uint8_t> kv(rows.data(), size_t(T) * 4);
    ASSERT_TRUE(a->InsertTokens(a->tokens_seen(), T, kv, kv, init_a, &ra).ok());
    ASSERT_TRUE(b->InsertTokens(b->tokens_seen(), T, kv, kv, init_b, &rb).ok());
    EXPECT_EQ(a->score_exponent(), b->score_exponent());
    for (int s = 0; s < a->num_slots(); ++s) {
      ASSERT_EQ(a->slot_position(s), b->slot_position(s)) << "step " << step;
      ASSERT_EQ(FloatBits(a->slot_score(s)), FloatBits(b->slot_score(s)));
    }
  }
}

}  // namespace
}  // namespace kvmem
