// Quest on the CPU reference: the golden example of specs/quest.md §7 taken
// through selection.md's fill, the bound properties the selection relies on
// (ABSOLUTE and CACHE_RANK), rotary embedding, and the fill's rules.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cpu/dtype.h"
#include "kernels/page_digest.h"
#include "kernels/page_score.h"
#include "kernels/rotary.h"
#include "kernels/selection.h"

namespace kvmem {
namespace {

std::vector<uint8_t> Encode(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * DTypeBytes(dtype));
  cpu::StoreFloats(values, dtype, bytes.data());
  return bytes;
}

uint32_t FreshSeed() {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

// ---- the golden example (quest.md §7) ---------------------------------
constexpr int kGoldenD = 4;
constexpr int kGoldenP = 2;
constexpr int kGoldenT = 11;
constexpr int kGoldenG = 2;
constexpr int kGoldenPages = 6;
// Printed to 6 decimals (up to 5e-7 off), plus fp32 arithmetic on values
// of magnitude ≤ 6 over ≤ 11 tokens.
constexpr float kGoldenTol = 2.5e-6f;

float GoldenKey(int t, int i) { return float((t + 2 * i + 1) % 7 - 3); }
float GoldenValue(int t, int i) { return float((3 * t + 2 * i) % 9 - 4); }
float GoldenQuery(int g, int i) { return float((3 * g + 3 * i + 2) % 7 - 3); }

// [n, D] rows of `row(t, i)` for the given tokens.
template <typename Row>
std::vector<float> GoldenRows(const std::vector<int>& tokens, Row row) {
  std::vector<float> rows;
  for (int t : tokens) {
    for (int i = 0; i < kGoldenD; ++i) rows.push_back(row(t, i));
  }
  return rows;
}

std::vector<int> TokensOfPages(const std::vector<int>& pages) {
  std::vector<int> tokens;
  for (int p : pages) {
    for (int t = p * kGoldenP; t < std::min(kGoldenT, (p + 1) * kGoldenP);
         ++t) {
      tokens.push_back(t);
    }
  }
  return tokens;
}

std::vector<int> AllTokens() {
  std::vector<int> tokens(kGoldenT);
  for (int t = 0; t < kGoldenT; ++t) tokens[t] = t;
  return tokens;
}

// quest.md §7's table, transcribed.
const float kMin[kGoldenPages][kGoldenD] = {{-2, 0, 2, -3},  {0, 2, -3, -1},
                                            {2, -3, -1, 1},  {-3, -1, 1, -3},
                                            {-1, 1, -3, -2}, {1, 3, -2, 0}};
const float kMax[kGoldenPages][kGoldenD] = {{-1, 1, 3, -2}, {1, 3, -2, 0},
                                            {3, -2, 0, 2},  {-2, 0, 2, 3},
                                            {0, 2, 3, -1},  {1, 3, -2, 0}};
const float kScore[kGoldenG][kGoldenPages] = {{-2, 12, -2, 4, 10, 9},
                                              {10, -1, 9, 9, 7, -6}};
const float kTrue[kGoldenG][kGoldenPages] = {{-5, 9, -5, 2, 9, 9},
                                             {7, -4, 6, 7, 5, -6}};
const float kGroupMax[kGoldenPages] = {10, 12, 9, 9, 10, 9};
const float kGroupSum[kGoldenPages] = {8, 11, 7, 13, 17, 3};

std::vector<float> GoldenDigests(DType dtype) {
  std::vector<float> digests(kGoldenPages * kDigestRows * kGoldenD, NAN);
  EXPECT_TRUE(cpu::ComputePageDigests(
                  Encode(GoldenRows(AllTokens(), GoldenKey), dtype), dtype,
                  kGoldenD, kGoldenP, DigestKind{}, absl::MakeSpan(digests))
                  .ok());
  return digests;
}

std::vector<float> GoldenQueries(const std::vector<int>& heads) {
  return GoldenRows(heads, GoldenQuery);
}

// Pages chosen by selection.md with S = 0, recent = 0, token 10 the new
// token (always in, so its page 5 has no fresh token), for `scores`.
std::vector<int> GoldenSelect(const std::vector<float>& scores, int budget) {
  const std::vector<int64_t> fresh = {2, 2, 2, 2, 2, 0};
  const std::vector<int64_t> order = {0, 1, 2, 3, 4, 5};
  std::vector<uint8_t> selected(kGoldenPages, 7);
  absl::StatusOr<SelectionFill> fill = cpu::FillSelection(
      1, {scores, fresh, order}, budget, absl::MakeSpan(selected));
  EXPECT_TRUE(fill.ok()) << fill.status();
  std::vector<int> pages;
  for (int p = 0; p < kGoldenPages; ++p) {
    if (selected[p] != 0 || p == 5) pages.push_back(p);
  }
  return pages;
}

TEST(QuestGolden, DigestsMatchTheTableForEveryDtype) {
  for (DType dtype : {DType::kFp32, DType::kBf16, DType::kFp16}) {
    const std::vector<float> digests = GoldenDigests(dtype);
    for (int p = 0; p < kGoldenPages; ++p) {
      for (int i = 0; i < kGoldenD; ++i) {
        const float* d = &digests[p * kDigestRows * kGoldenD];
        EXPECT_EQ(d[i], kMin[p][i]) << "page " << p << " ch " << i;
        EXPECT_EQ(d[kGoldenD + i], kMax[p][i]) << "page " << p << " ch " << i;
      }
    }
  }
}

TEST(QuestGolden, ScoresTrueMaximaAndGroupReductions) {
  EXPECT_EQ(GoldenQueries({0}), (std::vector<float>{-1, 2, -2, 1}));
  EXPECT_EQ(GoldenQueries({1}), (std::vector<float>{2, -2, 1, -3}));
  const std::vector<float> digests = GoldenDigests(DType::kFp32);
  for (int g = 0; g < kGoldenG; ++g) {
    std::vector<float> scores(kGoldenPages, NAN);
    ASSERT_TRUE(cpu::ScorePages(GoldenQueries({g}), kGoldenD, digests,
                                DigestKind{}, GroupReduction::kMax,
                                absl::MakeSpan(scores))
                    .ok());
    for (int p = 0; p < kGoldenPages; ++p) {
      EXPECT_EQ(scores[p], kScore[g][p]) << "q" << g << " page " << p;
      float true_max = -INFINITY;  // the real max q·k in the page
      for (int t : TokensOfPages({p})) {
        float dot = 0;
        for (int i = 0; i < kGoldenD; ++i) {
          dot += GoldenQuery(g, i) * GoldenKey(t, i);
        }
        true_max = std::max(true_max, dot);
      }
      EXPECT_EQ(true_max, kTrue[g][p]) << "q" << g << " page " << p;
      EXPECT_GE(scores[p], true_max);
    }
  }
  std::vector<float> group_max(kGoldenPages, NAN);
  std::vector<float> group_sum(kGoldenPages, NAN);
  ASSERT_TRUE(cpu::ScorePages(GoldenQueries({0, 1}), kGoldenD, digests,
                              DigestKind{}, GroupReduction::kMax,
                              absl::MakeSpan(group_max))
                  .ok());
  ASSERT_TRUE(cpu::ScorePages(GoldenQueries({0, 1}), kGoldenD, digests,
                              DigestKind{}, GroupReduction::kSum,
                              absl::MakeSpan(group_sum))
                  .ok());
  for (int p = 0; p < kGoldenPages; ++p) {
    EXPECT_EQ(group_max[p], kGroupMax[p]) << "page " << p;
    EXPECT_EQ(group_sum[p], kGroupSum[p]) << "page " << p;
  }
}

TEST(QuestGolden, SelectionsThroughTheGreedyFill) {
  const std::vector<float> digests = GoldenDigests(DType::kFp32);
  auto scores_for = [&](const std::vector<int>& heads, GroupReduction r) {
    std::vector<float> scores(kGoldenPages, NAN);
    EXPECT_TRUE(cpu::ScorePages(GoldenQueries(heads), kGoldenD, digests,
                                DigestKind{}, r, absl::MakeSpan(scores))
                    .ok());
    return scores;
  };
  const auto q0 = scores_for({0}, GroupReduction::kMax);
  const auto q1 = scores_for({1}, GroupReduction::kMax);
  const auto max = scores_for({0, 1}, GroupReduction::kMax);
  const auto sum = scores_for({0, 1}, GroupReduction::kSum);
  using Pages = std::vector<int>;
  EXPECT_EQ(GoldenSelect(q0, 4), (Pages{1, 5}));
  EXPECT_EQ(GoldenSelect(q1, 4), (Pages{0, 5}));
  EXPECT_EQ(GoldenSelect(max, 4), (Pages{1, 5}));
  EXPECT_EQ(GoldenSelect(sum, 4), (Pages{4, 5}));
  EXPECT_EQ(GoldenSelect(q0, 6), (Pages{1, 4, 5}));
  EXPECT_EQ(GoldenSelect(q1, 6), (Pages{0, 2, 5}));   // 2 and 3 tie at 9
  EXPECT_EQ(GoldenSelect(max, 6), (Pages{0, 1, 5}));  // 0 and 4 tie at 10
  EXPECT_EQ(GoldenSelect(sum, 6), (Pages{3, 4, 5}));
  for (const auto* s : {&q0, &q1, &max, &sum}) {
    EXPECT_EQ(GoldenSelect(*s, 12), (Pages{0, 1, 2, 3, 4, 5}));
  }
  const std::vector<int64_t> fresh = {2, 2, 2, 2, 2, 0};
  EXPECT_TRUE(cpu::FitsEverything(1, fresh, 12));  // dense: no scoring
  EXPECT_FALSE(cpu::FitsEverything(1, fresh, 10));
}

struct GoldenLine {
  float o[kGoldenD];
  float lse;
};

// Attention of golden query head g over `tokens`, in `dtype` (integers, so
// every dtype holds the inputs exactly).
GoldenLine GoldenAttend(int g, const std::vector<int>& tokens, DType dtype) {
  const std::vector<uint8_t> q = Encode(GoldenQueries({g}), dtype);
  const std::vector<uint8_t> k = Encode(GoldenRows(tokens, GoldenKey), dtype);
  const std::vector<uint8_t> v = Encode(GoldenRows(tokens, GoldenValue), dtype);
  GoldenLine line;
  EXPECT_TRUE(cpu::Attend({q, dtype}, {k, dtype}, {v, dtype}, kGoldenD, 0.5f,
                          absl::MakeSpan(line.o, kGoldenD),
                          absl::MakeSpan(&line.lse, 1), {})
                  .ok());
  return line;
}

void ExpectLine(const GoldenLine& got, const GoldenLine& want,
                const std::string& what) {
  for (int i = 0; i < kGoldenD; ++i) {
    EXPECT_NEAR(got.o[i], want.o[i], kGoldenTol) << what << " o[" << i << "]";
  }
  EXPECT_NEAR(got.lse, want.lse, kGoldenTol) << what << " lse";
}

TEST(QuestGolden, AttentionLinesTopkLastMergedDense) {
  const GoldenLine kWant[kGoldenG][4] = {
      {{{-1.000000f, 1.000000f, -1.500000f, 0.500000f}, 5.193147f},
       {{-1.000000f, 1.000000f, 3.000000f, -4.000000f}, 4.500000f},
       {{-1.000000f, 1.000000f, 0.000000f, -1.000000f}, 5.598612f},
       {{-1.765141f, 0.234859f, 0.000678f, -0.235537f}, 5.895172f}},
      {{{0.386351f, 2.386351f, -2.193176f, -0.193176f}, -1.686738f},
       {{-1.000000f, 1.000000f, 3.000000f, -4.000000f}, -3.000000f},
       {{0.092526f, 2.092526f, -1.092526f, -1.000000f}, -1.448555f},
       {{-1.344372f, 0.655628f, 1.158185f, -1.813813f}, 4.774434f}}};
  // The selection is group-max at B = 4: pages [1, 5], tokens [2, 3, 10].
  std::vector<float> scores(kGoldenPages, NAN);
  ASSERT_TRUE(cpu::ScorePages(GoldenQueries({0, 1}), kGoldenD,
                              GoldenDigests(DType::kFp32), DigestKind{},
                              GroupReduction::kMax, absl::MakeSpan(scores))
                  .ok());
  std::vector<int> pages = GoldenSelect(scores, 4);
  ASSERT_EQ(pages, (std::vector<int>{1, 5}));
  const std::vector<int> topk = TokensOfPages({pages[0]});
  const std::vector<int> last = TokensOfPages({pages[1]});
  for (DType dtype : {DType::kFp32, DType::kBf16, DType::kFp16}) {
    for (int g = 0; g < kGoldenG; ++g) {
      const std::string q = absl::StrCat("q", g, " dtype ", int(dtype), " ");
      const GoldenLine a = GoldenAttend(g, topk, dtype);
      const GoldenLine b = GoldenAttend(g, last, dtype);
      ExpectLine(a, kWant[g][0], q + "topk");
      ExpectLine(b, kWant[g][1], q + "last page");
      GoldenLine merged;
      ASSERT_TRUE(cpu::MergeAttention(
                      absl::MakeConstSpan(a.o), absl::MakeConstSpan(&a.lse, 1),
                      absl::MakeConstSpan(b.o), absl::MakeConstSpan(&b.lse, 1),
                      absl::MakeSpan(merged.o), absl::MakeSpan(&merged.lse, 1))
                      .ok());
      ExpectLine(merged, kWant[g][2], q + "merged");
      ExpectLine(GoldenAttend(g, TokensOfPages(pages), dtype), kWant[g][2],
                 q + "direct over the union");
      ExpectLine(GoldenAttend(g, AllTokens(), dtype), kWant[g][3], q + "dense");
    }
  }
}

// ---- digests --------------------------------------------------------------
TEST(PageDigest, MinMaxOverOccupiedRowsAndIncrementalAgree) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (DType dtype : {DType::kFp32, DType::kBf16, DType::kFp16}) {
    for (int d : {64, 128}) {
      for (int rows : {1, 3, 16}) {
        std::vector<float> keys(rows * d);
        for (float& x : keys) x = normal(rng);
        const std::vector<uint8_t> bytes = Encode(keys, dtype);
        cpu::LoadFloats(bytes.data(), dtype, absl::MakeSpan(keys));
        std::vector<uint8_t> occupied(rows);
        for (auto& o : occupied) o = rng() % 2;
        occupied[rng() % rows] = 1;
        std::vector<float> digest(2 * d, NAN);
        ASSERT_TRUE(cpu::ComputePageDigest(bytes, dtype, d, occupied,
                                           DigestKind{}, absl::MakeSpan(digest))
                        .ok());
        std::vector<float> running(2 * d, NAN);
        bool seeded = false;
        for (int r = 0; r < rows; ++r) {
          if (!occupied[r]) continue;
          auto key = absl::MakeConstSpan(&keys[r * d], d);
          ASSERT_TRUE((seeded ? cpu::ExtendPageDigest(key, DigestKind{},
                                                      absl::MakeSpan(running))
                              : cpu::SeedPageDigest(key, DigestKind{},
                                                    absl::MakeSpan(running)))
                          .ok());
          seeded = true;
        }
        EXPECT_EQ(digest, running);
        for (int i = 0; i < d; ++i) {
          float lo = INFINITY;
          float hi = -INFINITY;
          for (int r = 0; r < rows; ++r) {
            if (!occupied[r]) continue;
            lo = std::min(lo, keys[r * d + i]);
            hi = std::max(hi, keys[r * d + i]);
          }
          ASSERT_EQ(digest[i], lo) << "ch " << i;
          ASSERT_EQ(digest[d + i], hi) << "ch " << i;
        }
      }
    }
  }
}

TEST(PageDigest, EmptyPageHasNoDigest) {
  const std::vector<uint8_t> bytes = Encode({1, 2, 3, 4}, DType::kFp32);
  std::vector<float> digest(4, 5.0f);
  const absl::Status s =
      cpu::ComputePageDigest(bytes, DType::kFp32, 2, std::vector<uint8_t>{0, 0},
                             DigestKind{}, absl::MakeSpan(digest));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(digest, std::vector<float>(4, 5.0f));  // unchanged
  EXPECT_EQ(cpu::ComputePageDigest({}, DType::kFp32, 2, {}, DigestKind{},
                                   absl::MakeSpan(digest))
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- bounds ---------------------------------------------------------------
// Σ_i |q_i|·max(|low_i|, |high_i|): the size of the bound's terms, against
// which fp32 rounding of the bound is measured.
float BoundMagnitude(const float* q, const float* digest, int d) {
  float m = 0;
  for (int i = 0; i < d; ++i) {
    m += std::fabs(q[i]) *
         std::max(std::fabs(digest[i]), std::fabs(digest[d + i]));
  }
  return m;
}

double Dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int i = 0; i < d; ++i) s += double(a[i]) * b[i];
  return s;
}

// The host's vectorised bound (page_score.cc) and the shared one that the
// CUDA kernel runs give the same bits.
TEST(PageScore, HostScoresEqualTheSharedBoundBitForBit) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int d : {8, 13, 64, 128, 256}) {
    const int pages = 64;
    std::vector<float> q(static_cast<size_t>(d));
    std::vector<float> digests(static_cast<size_t>(pages) * 2 * d);
    for (float& x : q) x = normal(rng);
    for (float& x : digests) x = normal(rng);
    std::vector<float> scores(pages, NAN);
    ASSERT_TRUE(cpu::ScorePages(q, d, digests, DigestKind{},
                                GroupReduction::kMax, absl::MakeSpan(scores))
                    .ok());
    for (int p = 0; p < pages; ++p) {
      const float want =
          QuestHeadBound(q.data(), &digests[size_t(p) * 2 * d], d);
      uint32_t a, b;
      memcpy(&a, &scores[p], 4);
      memcpy(&b, &want, 4);
      ASSERT_EQ(a, b) << "D " << d << " page " << p << ": " << scores[p]
                      << " vs " << want;
    }
  }
}

TEST(PageScore, QuestBoundNeverBelowTrueMaxAndExactForOneKey) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int d : {64, 128}) {
    for (int page : {1, 3, 16}) {
      for (int group : {1, 4}) {
        const int pages = 20;
        std::vector<float> keys(pages * page * d), q(group * d);
        for (float& x : keys) x = normal(rng);
        for (float& x : q) x = normal(rng);
        std::vector<float> digests(pages * 2 * d), scores(pages, NAN);
        ASSERT_TRUE(cpu::ComputePageDigests(Encode(keys, DType::kFp32),
                                            DType::kFp32, d, page, DigestKind{},
                                            absl::MakeSpan(digests))
                        .ok());
        ASSERT_TRUE(cpu::ScorePages(q, d, digests, DigestKind{},
                                    GroupReduction::kMax,
                                    absl::MakeSpan(scores))
                        .ok());
        for (int p = 0; p < pages; ++p) {
          double true_max = -INFINITY;
          float tol = 0;
          for (int g = 0; g < group; ++g) {
            tol = std::max(
                tol, 1e-6f * BoundMagnitude(&q[g * d], &digests[p * 2 * d], d));
            for (int t = 0; t < page; ++t) {
              true_max = std::max(true_max,
                                  Dot(&q[g * d], &keys[(p * page + t) * d], d));
            }
          }
          EXPECT_GE(scores[p] + tol, true_max) << "page " << p;
          if (page == 1 && group == 1) {
            // fp32, each product rounded, in QuestHeadBound's order: 8
            // lanes (i mod 8, ascending), then pairwise.
            float lane[8] = {};
            for (int i = 0; i < d; ++i) {
              volatile float product = q[i] * keys[p * d + i];  // no FMA
              lane[i % 8] += product;
            }
            const float dot = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                              ((lane[4] + lane[5]) + (lane[6] + lane[7]));
            EXPECT_EQ(scores[p], dot) << "one-key page bound is exact";
          }
        }
      }
    }
  }
}

// Why CACHE_RANK needs its own digest: min/max of keys before rotation do
// not bound q·k after a relative rotation.
TEST(PageScore, MinMaxOfUnrotatedKeysFailsWhereThePairNormHolds) {
  RotaryParams rotary;  // D = 2: one pair turning 1 rad per position
  const std::vector<float> key = {1, 0};
  std::vector<float> q = {0, 1};
  absl::StatusOr<DigestKind> kind = RotationInvariantDigestKind(rotary, 2);
  ASSERT_TRUE(kind.ok());
  std::vector<float> plain(4), invariant(4);
  ASSERT_TRUE(
      cpu::SeedPageDigest(key, DigestKind{}, absl::MakeSpan(plain)).ok());
  ASSERT_TRUE(cpu::SeedPageDigest(key, *kind, absl::MakeSpan(invariant)).ok());
  float plain_score = NAN, invariant_score = NAN;
  ASSERT_TRUE(cpu::ScorePages(q, 2, plain, DigestKind{}, GroupReduction::kMax,
                              absl::MakeSpan(&plain_score, 1))
                  .ok());
  ASSERT_TRUE(cpu::ScorePages(q, 2, invariant, *kind, GroupReduction::kMax,
                              absl::MakeSpan(&invariant_score, 1))
                  .ok());
  std::vector<float> rotated_key = key;
  const double quarter_turn = std::acos(-1.0) / 2;
  RotatePair(quarter_turn, &rotated_key[0], &rotated_key[1]);
  const double true_dot = Dot(q.data(), rotated_key.data(), 2);
  EXPECT_NEAR(true_dot, 1.0, 1e-6);
  EXPECT_LT(plain_score, true_dot);              // 0 < 1: bound broken
  EXPECT_GE(invariant_score + 1e-6f, true_dot);  // 1 ≥ 1
}

TEST(PageScore, RotationInvariantBoundHoldsUnderRandomRotations) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> position(0, 200000);
  for (int d : {64, 128}) {
    for (int page : {1, 3, 16}) {
      for (int group : {1, 4}) {
        RotaryParams rotary;
        rotary.base = rng() % 2 ? 10000.0 : 500000.0;
        rotary.rotary_dims = rng() % 2 ? 0 : d / 2;
        rotary.pairing =
            rng() % 2 ? RotaryPairing::kInterleaved : RotaryPairing::kHalfSplit;
        rotary.scaling = static_cast<RotaryScaling>(rng() % 3);
        rotary.factor = 8.0;
        SCOPED_TRACE(absl::StrCat("d ", d, " page ", page, " group ", group,
                                  " pairing ", int(rotary.pairing), " scaling ",
                                  int(rotary.scaling)));
        absl::StatusOr<DigestKind> kind =
            RotationInvariantDigestKind(rotary, d);
        ASSERT_TRUE(kind.ok()) << kind.status();
        std::vector<float> keys(page * d), q(group * d);
        for (float& x : keys) x = normal(rng);
        for (float& x : q) x = normal(rng);
        // Some non-rotated channels far from zero, so their min/max matter.
        for (int t = 0; t < page; ++t) keys[t * d + d - 1] += 3.0f;
        std::vector<float> digest(2 * d);
        ASSERT_TRUE(cpu::ComputePageDigests(Encode(keys, DType::kFp32),
                                            DType::kFp32, d, page, *kind,
                                            absl::MakeSpan(digest))
                        .ok());
        // The digest: each pair's largest norm (rounded up to fp32) in both
        // of its channels, its negation as low; min/max elsewhere.
        const int dims = kind->rotated_dims;
        for (int i = 0; i < dims / 2; ++i) {
          int a = 0, b = 0;
          RotaryPairChannels(kind->pairing, dims, i, &a, &b);
          double largest = 0;
          for (int t = 0; t < page; ++t) {
            largest = std::max(largest, std::hypot(double(keys[t * d + a]),
                                                   double(keys[t * d + b])));
          }
          ASSERT_GE(double(digest[d + a]), largest) << "pair " << i;
          ASSERT_LE(double(digest[d + a]), largest * (1 + 2.4e-7)) << i;
          ASSERT_EQ(digest[d + b], digest[d + a]);
          ASSERT_EQ(digest[a], -digest[d + a]);
          ASSERT_EQ(digest[b], -digest[d + a]);
        }
        for (int c = dims; c < d; ++c) {
          float lo = INFINITY, hi = -INFINITY;
          for (int t = 0; t < page; ++t) {
            lo = std::min(lo, keys[t * d + c]);
            hi = std::max(hi, keys[t * d + c]);
          }
          ASSERT_EQ(digest[c], lo);
          ASSERT_EQ(digest[d + c], hi);
        }
        float score = NAN;
        ASSERT_TRUE(cpu::ScorePages(q, d, digest, *kind, GroupReduction::kMax,
                                    absl::MakeSpan(&score, 1))
                        .ok());
        float tol = 0;
        for (int g = 0; g < group; ++g) {
          tol = std::max(tol, 1e-5f * BoundMagnitude(&q[g * d], &digest[0], d));
        }
        // The worst rotation turns every key pair onto the query pair:
        // q·k = Σ_pairs ‖q_pair‖·‖k_pair‖ + the plain channels.
        for (int g = 0; g < group; ++g) {
          for (int t = 0; t < page; ++t) {
            double aligned = 0;
            for (int i = 0; i < dims / 2; ++i) {
              int a = 0, b = 0;
              RotaryPairChannels(kind->pairing, dims, i, &a, &b);
              aligned +=
                  std::hypot(double(q[g * d + a]), double(q[g * d + b])) *
                  std::hypot(double(keys[t * d + a]), double(keys[t * d + b]));
            }
            for (int c = dims; c < d; ++c) {
              aligned += double(q[g * d + c]) * keys[t * d + c];
            }
            ASSERT_GE(score + tol, aligned) << "head " << g << " key " << t;
          }
        }
        for (int trial = 0; trial < 20; ++trial) {
          double true_max = -INFINITY;
          for (int g = 0; g < group; ++g) {
            std::vector<float> qr(&q[g * d], &q[(g + 1) * d]);
            ASSERT_TRUE(
                cpu::RotateHead(rotary, position(rng), absl::MakeSpan(qr))
                    .ok());
            for (int t = 0; t < page; ++t) {
              std::vector<float> kr(&keys[t * d], &keys[(t + 1) * d]);
              ASSERT_TRUE(
                  cpu::RotateHead(rotary, position(rng), absl::MakeSpan(kr))
                      .ok());
              true_max = std::max(true_max, Dot(qr.data(), kr.data(), d));
            }
          }
          ASSERT_GE(score + tol, true_max) << "trial " << trial;
        }
      }
    }
  }
}

// ---- the greedy fill (selection.md step 4) ---------------------------------
// Runs the fill; pages taken, or {-1} when it failed.
std::vector<int> Fill(int64_t always_in, const std::vector<float>& scores,
                      const std::vector<int64_t>& fresh,
                      const std::vector<int64_t>& order, int64_t budget,
                      SelectionFill* fill_out = nullptr) {
  std::vector<uint8_t> selected(fresh.size(), 7);
  absl::StatusOr<SelectionFill> fill = cpu::FillSelection(
      always_in, {scores, fresh, order}, budget, absl::MakeSpan(selected));
  if (!fill.ok()) return {-1};
  if (fill_out != nullptr) *fill_out = *fill;
  std::vector<int> pages;
  for (size_t p = 0; p < selected.size(); ++p) {
    EXPECT_TRUE(selected[p] == 0 || selected[p] == 1);
    if (selected[p] == 1) pages.push_back(int(p));
  }
  return pages;
}

TEST(Selection, TiesGoToTheLowerOrderKey) {
  // Pages 0 and 1 are spilled (keys 10, 20); page 2 is resident (key 3).
  const std::vector<float> scores = {5, 5, 5};
  const std::vector<int64_t> fresh = {2, 2, 2};
  const std::vector<int64_t> order = {10, 20, 3};
  EXPECT_EQ(Fill(1, scores, fresh, order, 3), (std::vector<int>{2}));
  EXPECT_EQ(Fill(1, scores, fresh, order, 5), (std::vector<int>{0, 2}));
  // A higher score still beats a lower key.
  EXPECT_EQ(Fill(1, {5, 6, 5}, fresh, order, 3), (std::vector<int>{1}));
}

TEST(Selection, SkipsAPageThatDoesNotFitAndTakesASmallerLaterOne) {
  SelectionFill fill;
  // B = 5, 1 always in: page 0 (2) fits, page 1 (5) does not, page 2 (1)
  // still does; page 3 (2 tokens) no longer fits in the 1 left.
  EXPECT_EQ(Fill(1, {9, 8, 7, 1}, {2, 5, 1, 2}, {0, 1, 2, 3}, 5, &fill),
            (std::vector<int>{0, 2}));
  EXPECT_EQ(fill.selected_tokens, 4);
  EXPECT_FALSE(fill.dense);
  // A page wholly inside the always-in set (no fresh token) is never taken.
  EXPECT_EQ(Fill(1, {9, 8}, {0, 1}, {0, 1}, 1), (std::vector<int>{}));
}

TEST(Selection, DenseWhenEverythingFitsTakesAllUnscored) {
  SelectionFill fill;
  // No scores at all: a dense step needs none.
  EXPECT_EQ(Fill(3, {}, {2, 0, 16, 5}, {4, 1, 2, 3}, 26, &fill),
            (std::vector<int>{0, 1, 2, 3}));
  EXPECT_TRUE(fill.dense);
  EXPECT_EQ(fill.selected_tokens, 26);
  // One token short of dense: scores are required.
  EXPECT_EQ(Fill(3, {}, {2, 0, 16, 5}, {4, 1, 2, 3}, 25),
            (std::vector<int>{-1}));
}

TEST(Selection, RejectsBadInputsAndWritesNothing) {
  std::vector<uint8_t> selected(2, 7);
  auto fill = [&](int64_t always_in, std::vector<float> scores,
                  std::vector<int64_t> fresh, std::vector<int64_t> order,
                  int64_t budget) {
    return cpu::FillSelection(always_in, {scores, fresh, order}, budget,
                              absl::MakeSpan(selected))
        .status()
        .code();
  };
  const auto kBad = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(fill(5, {1, 2}, {1, 1}, {0, 1}, 4), kBad);  // always-in > B
  EXPECT_EQ(fill(1, {NAN, 2}, {2, 2}, {0, 1}, 4), kBad);
  EXPECT_EQ(fill(1, {1, 2}, {2, 2}, {1, 1}, 4), kBad);  // repeated key
  EXPECT_EQ(fill(1, {1, 2}, {-1, 2}, {0, 1}, 4), kBad);
  EXPECT_EQ(fill(1, {1}, {2, 2}, {0, 1}, 4), kBad);  // sizes differ
  EXPECT_EQ(selected, std::vector<uint8_t>(2, 7));
}

}  // namespace
}  // namespace kvmem
