// The engine's step end to end on the CPU backend, against references
// computed here in double precision.
#include "service/engine/engine.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "service/engine/stream_state.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

// Tokens of one session as the test generated them: [t][head][d] floats,
// already rounded to the session dtype.
struct Tokens {
  std::vector<std::vector<float>> q, k, v;  // [t] → [heads · D]
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed %u\n", seed_);
    absl::StatusOr<std::unique_ptr<storage::Store>> store =
        storage::Store::Open(storage::Store::Options(), dir_.path());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Open(Engine::Options(), store_.get());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
  }

  SessionConfig Config(const std::string& id, DType dtype) {
    SessionConfig c;
    c.tenant = "t";
    c.session_id = id;
    c.shape.layers = 3;
    c.shape.kv_heads = 2;
    c.shape.query_heads = 8;
    c.shape.head_dim = 64;
    c.shape.dtype = dtype;
    c.policy.sinks = 4;
    c.policy.cascades = 2;
    c.policy.window = 32;
    c.policy.page_tokens = 8;
    c.policy.recent_tokens = 8;
    c.policy.step_budget_tokens = 4096;
    c.policy.ema_beta = 0.99;
    return c;
  }

  // Random values rounded to `dtype`, and their little-endian bytes.
  std::vector<float> Random(size_t n, DType dtype, std::string* bytes) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> values(n);
    bytes->assign(n * DTypeBytes(dtype), '\0');
    for (size_t i = 0; i < n; ++i) {
      StoreElement(bytes->data(), dtype, int64_t(i), normal(rng_));
      values[i] = LoadElement(bytes->data(), dtype, int64_t(i));
    }
    return values;
  }

  // Steps `count` tokens of `layer` one by one (or as one chunk), keeping
  // what was sent in *tokens; returns the results.
  std::vector<StepEntryResult> Run(const SessionConfig& c, int layer,
                                   StepMode mode, int count, int chunk,
                                   Tokens* tokens) {
    const ModelShape& s = c.shape;
    std::vector<StepEntryResult> all;
    for (int done = 0; done < count; done += chunk) {
      const int T = std::min(chunk, count - done);
      std::string q, k, v;
      std::vector<float> qf =
          Random(size_t(T) * s.query_heads * s.head_dim, s.dtype, &q);
      std::vector<float> kf =
          Random(size_t(T) * s.kv_heads * s.head_dim, s.dtype, &k);
      std::vector<float> vf =
          Random(size_t(T) * s.kv_heads * s.head_dim, s.dtype, &v);
      for (int t = 0; t < T; ++t) {
        auto slice = [&](const std::vector<float>& f, int heads) {
          const size_t w = size_t(heads) * s.head_dim;
          return std::vector<float>(f.begin() + t * w, f.begin() + (t + 1) * w);
        };
        tokens->q.push_back(slice(qf, s.query_heads));
        tokens->k.push_back(slice(kf, s.kv_heads));
        tokens->v.push_back(slice(vf, s.kv_heads));
      }
      StepRequestView request;
      request.layer = layer;
      request.mode = mode;
      request.entries.push_back({c.session_id, done, T, q, k, v});
      absl::StatusOr<std::vector<StepEntryResult>> r =
          engine_->Step(c.tenant, request);
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return all;
      EXPECT_EQ((*r)[0].next_position, done + T);
      all.push_back(std::move((*r)[0]));
    }
    return all;
  }

  unsigned seed_ = 0;
  std::mt19937 rng_;
  testing::TempDir dir_;
  std::unique_ptr<storage::Store> store_;
  std::unique_ptr<Engine> engine_;
};

// Rotates `x` ([D]) by the half-split rotary embedding at `pos` with base
// 10000, in double: the test's own rotary, independent of kernels/.
std::vector<double> Rotate(const std::vector<double>& x, int64_t pos) {
  const size_t D = x.size(), half = D / 2;
  std::vector<double> y(x);
  for (size_t i = 0; i < half; ++i) {
    const double angle = double(pos) * std::pow(10000.0, -2.0 * i / double(D));
    y[i] = x[i] * std::cos(angle) - x[i + half] * std::sin(angle);
    y[i + half] = x[i] * std::sin(angle) + x[i + half] * std::cos(angle);
  }
  return y;
}

// Full causal attention of token t's query head h over tokens 0..t, in
// double; `rotary` applies the test's rotary at the original positions.
void FullAttention(const Tokens& tok, const ModelShape& s, int t, int h,
                   bool rotary, std::vector<double>* out, double* lse) {
  const int D = s.head_dim, G = s.query_heads / s.kv_heads, kv = h / G;
  std::vector<double> q(tok.q[t].begin() + h * D,
                        tok.q[t].begin() + (h + 1) * D);
  if (rotary) q = Rotate(q, t);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> logits(size_t(t) + 1);
  double m = -INFINITY;
  for (int j = 0; j <= t; ++j) {
    std::vector<double> k(tok.k[j].begin() + kv * D,
                          tok.k[j].begin() + (kv + 1) * D);
    if (rotary) k = Rotate(k, j);
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += q[d] * k[d];
    logits[j] = dot * scale;
    m = std::max(m, logits[j]);
  }
  double z = 0;
  out->assign(size_t(D), 0.0);
  for (int j = 0; j <= t; ++j) {
    const double p = std::exp(logits[j] - m);
    z += p;
    for (int d = 0; d < D; ++d) (*out)[d] += p * tok.v[j][size_t(kv) * D + d];
  }
  for (double& o : *out) o /= z;
  *lse = m + std::log(z);
}

// Checks every ATTEND result of `results` (entries of one or more tokens)
// against full attention within `rtol`/`atol`.
void ExpectFullAttention(const std::vector<StepEntryResult>& results,
                         const Tokens& tok, const ModelShape& s, bool rotary,
                         double rtol, double atol, unsigned seed) {
  const int D = s.head_dim, Hq = s.query_heads;
  int t0 = 0;
  for (const StepEntryResult& r : results) {
    const int T = int(r.lse.size() / (sizeof(float) * Hq));
    ASSERT_EQ(r.output.size(), size_t(T) * Hq * D * DTypeBytes(s.dtype));
    for (int t = t0; t < t0 + T; ++t) {
      for (int h = 0; h < Hq; ++h) {
        std::vector<double> want;
        double want_lse = 0;
        FullAttention(tok, s, t, h, rotary, &want, &want_lse);
        float lse;
        memcpy(&lse, r.lse.data() + (size_t(t - t0) * Hq + h) * 4, 4);
        EXPECT_NEAR(lse, want_lse, atol + rtol * std::abs(want_lse))
            << "token " << t << " head " << h << " seed " << seed;
        for (int d = 0; d < D; ++d) {
          const double got = LoadElement(r.output.data(), s.dtype,
                                         (int64_t(t - t0) * Hq + h) * D + d);
          ASSERT_NEAR(got, want[d], atol + rtol * std::abs(want[d]))
              << "token " << t << " head " << h << " dim " << d << " seed "
              << seed;
        }
      }
    }
    t0 += T;
  }
}

TEST_F(EngineTest, AttendEqualsFullAttentionWhileNothingIsEvictedFp32) {
  SessionConfig c = Config("fp32", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  // 60 tokens fit in S + C·W = 68: no eviction; layer 2 is sparse but the
  // budget covers everything.
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kAttend, 60, 1, &tok);
  ExpectFullAttention(r, tok, c.shape, false, 1e-5, 1e-6, seed_);
}

TEST_F(EngineTest, AttendEqualsFullAttentionBf16) {
  SessionConfig c = Config("bf16", DType::kBf16);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kAttend, 40, 1, &tok);
  // bf16 output rounding: 2^-8 relative, plus accumulated input rounding.
  ExpectFullAttention(r, tok, c.shape, false, 1e-2, 1e-2, seed_);
}

TEST_F(EngineTest, RecallGivesFullAttentionOverEveryTokenEverAppended) {
  // 200 tokens through a 68-token cascade: most are evicted (spilled), and
  // with recall on and B ≥ tokens seen the step attends to all of them.
  SessionConfig c = Config("recall", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kAttend, 200, 1, &tok);
  ExpectFullAttention(r, tok, c.shape, false, 1e-5, 1e-6, seed_);
  absl::StatusOr<SessionInfo> info = engine_->GetSession("t", "recall");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->resident_tokens, 2 * 68);  // two KV heads, full cascades
  // 132 spilled tokens per stream: 16 sealed pages of 8, 4 in the open one.
  EXPECT_EQ(info->spilled_pages, 2 * ((200 - 68) / 8));
  EXPECT_EQ(info->manifest.layer_next_positions[2], 200);
  EXPECT_EQ(info->position, 0);  // layers 0 and 1 have not stepped
}

TEST_F(EngineTest, ABatchRecallingManyPagesGivesEachSessionFullAttention) {
  // Four sessions decoding side by side in one request: at the end each
  // step recalls 2 heads × 16 pages a session, 128 pages, past
  // kParallelRecallPages, so the pages are read on the worker threads.
  constexpr int kSessions = 4, kTokens = 200;
  std::vector<SessionConfig> configs;
  std::vector<Tokens> tokens(kSessions);
  std::vector<std::vector<StepEntryResult>> results(kSessions);
  for (int i = 0; i < kSessions; ++i) {
    configs.push_back(Config(absl::StrCat("many-", i), DType::kFp32));
    ASSERT_TRUE(engine_->CreateSession(configs.back()).ok());
  }
  const ModelShape& s = configs[0].shape;
  for (int t = 0; t < kTokens; ++t) {
    std::vector<std::string> q(kSessions), k(kSessions), v(kSessions);
    StepRequestView request;
    request.layer = 1;
    request.mode = StepMode::kAttend;
    for (int i = 0; i < kSessions; ++i) {
      tokens[i].q.push_back(
          Random(size_t(s.query_heads) * s.head_dim, s.dtype, &q[i]));
      tokens[i].k.push_back(
          Random(size_t(s.kv_heads) * s.head_dim, s.dtype, &k[i]));
      tokens[i].v.push_back(
          Random(size_t(s.kv_heads) * s.head_dim, s.dtype, &v[i]));
      request.entries.push_back(
          {configs[i].session_id, t, 1, q[i], k[i], v[i]});
    }
    absl::StatusOr<std::vector<StepEntryResult>> r =
        engine_->Step("t", request);
    ASSERT_TRUE(r.ok()) << r.status();
    for (int i = 0; i < kSessions; ++i) {
      results[i].push_back(std::move((*r)[i]));
    }
  }
  for (int i = 0; i < kSessions; ++i) {
    ExpectFullAttention(results[i], tokens[i], s, false, 1e-5, 1e-6, seed_);
  }
  absl::StatusOr<SessionInfo> info = engine_->GetSession("t", "many-0");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->spilled_pages, 2 * ((kTokens - 68) / 8));
}

TEST_F(EngineTest, PrefillChunksThenDecodeEqualFullAttention) {
  SessionConfig c = Config("chunks", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kAttend, 50, 25, &tok);
  ExpectFullAttention(r, tok, c.shape, false, 1e-5, 1e-6, seed_);
}

TEST_F(EngineTest, FetchReturnsEveryTokenWithItsPosition) {
  SessionConfig c = Config("fetch", DType::kBf16);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  std::vector<StepEntryResult> r = Run(c, 1, StepMode::kFetch, 30, 1, &tok);
  ASSERT_EQ(r.size(), 30u);
  const int D = 64;
  for (int t = 0; t < 30; ++t) {
    ASSERT_EQ(r[t].heads.size(), 2u);
    for (int h = 0; h < 2; ++h) {
      const FetchedHead& f = r[t].heads[h];
      ASSERT_EQ(f.positions.size(), size_t(t) + 1);
      for (int j = 0; j <= t; ++j) {
        EXPECT_EQ(f.positions[j], j);
        for (int d = 0; d < D; ++d) {
          ASSERT_EQ(LoadElement(f.k.data(), DType::kBf16, int64_t(j) * D + d),
                    tok.k[j][size_t(h) * D + d]);
          ASSERT_EQ(LoadElement(f.v.data(), DType::kBf16, int64_t(j) * D + d),
                    tok.v[j][size_t(h) * D + d]);
        }
      }
    }
  }
}

TEST_F(EngineTest, SparseSelectionStaysInBudgetAndKeepsTheAlwaysInTokens) {
  SessionConfig c = Config("sparse", DType::kFp32);
  c.policy.step_budget_tokens = 40;
  c.policy.recall = false;
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kFetch, 150, 1, &tok);
  for (int t = 0; t < 150; ++t) {
    for (const FetchedHead& f : r[t].heads) {
      ASSERT_LE(f.positions.size(), 40u) << "token " << t;
      ASSERT_TRUE(std::is_sorted(f.positions.begin(), f.positions.end()));
      EXPECT_EQ(f.positions.back(), t);  // the new token
      // Sinks 0..3 are always selected once they exist.
      for (int s = 0; s < std::min(t, 4); ++s) EXPECT_EQ(f.positions[s], s);
      // The recent tokens of cascade 0 are always in: at least t−8..t−1
      // while cascade 0 holds them.
      if (t >= 12) {
        for (int j = t - 8; j < t; ++j) {
          EXPECT_TRUE(std::binary_search(f.positions.begin(), f.positions.end(),
                                         int64_t(j)))
              << "token " << t << " misses recent " << j;
        }
      }
    }
  }
}

TEST_F(EngineTest, CacheRankWithEverythingSelectedIsOrdinaryRotaryAttention) {
  SessionConfig c = Config("rank", DType::kFp32);
  c.policy.positions_mode = PositionsMode::kCacheRank;
  c.shape.rotary.base_theta = 10000;
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  // Evicted and recalled: ranks equal the original positions.
  std::vector<StepEntryResult> r = Run(c, 2, StepMode::kAttend, 120, 1, &tok);
  ExpectFullAttention(r, tok, c.shape, true, 2e-5, 2e-6, seed_);
}

TEST_F(EngineTest, CacheRankFetchReproducesAttend) {
  // Recall off and a small budget: ranks differ from original positions.
  SessionConfig c = Config("rank-fetch", DType::kFp32);
  c.policy.positions_mode = PositionsMode::kCacheRank;
  c.shape.rotary.base_theta = 10000;
  c.policy.recall = false;
  c.policy.step_budget_tokens = 30;
  SessionConfig twin = c;
  twin.session_id = "rank-attend";
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  ASSERT_TRUE(engine_->CreateSession(twin).ok());
  const ModelShape& s = c.shape;
  const int D = s.head_dim, Hq = s.query_heads, H = s.kv_heads, G = Hq / H;
  for (int t = 0; t < 100; ++t) {
    std::string q, k, v;
    Random(size_t(Hq) * D, DType::kFp32, &q);
    Random(size_t(H) * D, DType::kFp32, &k);
    Random(size_t(H) * D, DType::kFp32, &v);
    StepRequestView fetch{2, StepMode::kFetch, {{c.session_id, t, 1, q, k, v}}};
    StepRequestView attend{
        2, StepMode::kAttend, {{twin.session_id, t, 1, q, k, v}}};
    absl::StatusOr<std::vector<StepEntryResult>> f = engine_->Step("t", fetch);
    absl::StatusOr<std::vector<StepEntryResult>> a = engine_->Step("t", attend);
    ASSERT_TRUE(f.ok() && a.ok());
    for (int h = 0; h < Hq; ++h) {
      const FetchedHead& head = (*f)[0].heads[size_t(h / G)];
      ASSERT_EQ(head.query_rotary_positions.size(), 1u);
      const int64_t qpos = head.query_rotary_positions[0];
      EXPECT_LT(qpos, 4 + 2 * 32 + 1);  // positions stay below S + C·W + T
      std::vector<double> qv(D);
      for (int d = 0; d < D; ++d)
        qv[d] = LoadElement(q.data(), DType::kFp32, int64_t(h) * D + d);
      qv = Rotate(qv, qpos);
      const size_t n = head.positions.size();
      std::vector<double> logits(n);
      double m = -INFINITY;
      for (size_t j = 0; j < n; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) {
          dot += qv[d] *
                 LoadElement(head.k.data(), DType::kFp32, int64_t(j) * D + d);
        }
        logits[j] = dot / std::sqrt(double(D));
        m = std::max(m, logits[j]);
      }
      double z = 0;
      std::vector<double> o(D, 0.0);
      for (size_t j = 0; j < n; ++j) {
        const double p = std::exp(logits[j] - m);
        z += p;
        for (int d = 0; d < D; ++d) {
          o[d] +=
              p * LoadElement(head.v.data(), DType::kFp32, int64_t(j) * D + d);
        }
      }
      for (int d = 0; d < D; ++d) {
        const double got = LoadElement((*a)[0].output.data(), DType::kFp32,
                                       int64_t(h) * D + d);
        ASSERT_NEAR(got, o[d] / z, 1e-5 + 1e-5 * std::abs(o[d] / z))
            << "token " << t << " head " << h << " seed " << seed_;
      }
    }
  }
}

TEST_F(EngineTest, InvalidStepsAreRejectedAndChangeNothing) {
  SessionConfig c = Config("strict", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  Tokens tok;
  Run(c, 2, StepMode::kAttend, 3, 1, &tok);
  const int D = 64;
  std::string q(8 * D * 4, '\1'), k(2 * D * 4, '\1'), v(2 * D * 4, '\1');
  struct Case {
    StepRequestView request;
    absl::StatusCode code;
    const char* names;
  };
  std::vector<Case> cases = {
      {{2,
        StepMode::kAttend,
        {{"strict", 3, 1, q, k, v}, {"strict", 3, 1, q, k, v}}},
       absl::StatusCode::kInvalidArgument,
       "entries[1].session_id"},
      {{2, StepMode::kAttend, {{"nobody", 3, 1, q, k, v}}},
       absl::StatusCode::kNotFound,
       "entries[0].session_id"},
      {{3, StepMode::kAttend, {{"strict", 3, 1, q, k, v}}},
       absl::StatusCode::kInvalidArgument,
       "layer"},
      {{2, StepMode::kAttend, {{"strict", 3, 1, q.substr(4), k, v}}},
       absl::StatusCode::kInvalidArgument,
       "entries[0].q"},
      {{2, StepMode::kAttend, {{"strict", 3, 1, q, k + "x", v}}},
       absl::StatusCode::kInvalidArgument,
       "entries[0].k"},
      {{2, StepMode::kAttend, {{"strict", 3, 1, q, k, ""}}},
       absl::StatusCode::kInvalidArgument,
       "entries[0].v"},
      {{2, StepMode::kAttend, {{"strict", 3, 0, q, k, v}}},
       absl::StatusCode::kInvalidArgument,
       "entries[0].num_tokens"},
      {{2, StepMode::kFetch, {{"strict", 3, 1, "", k, v}}},
       absl::StatusCode::kInvalidArgument,
       "entries[0].q"},
      {{2, StepMode::kAttend, {{"strict", 5, 1, q, k, v}}},
       absl::StatusCode::kFailedPrecondition,
       "expected 3"},
      {{2, StepMode::kAttend, {{"strict", 2, 1, q, k, v}}},
       absl::StatusCode::kFailedPrecondition,
       "expected 3"},
      {{2, StepMode::kAttend, {}},
       absl::StatusCode::kInvalidArgument,
       "entries"},
      {{2, StepMode(0), {{"strict", 3, 1, q, k, v}}},
       absl::StatusCode::kInvalidArgument,
       "mode"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    absl::Status st = engine_->Step("t", cases[i].request).status();
    EXPECT_EQ(st.code(), cases[i].code) << "case " << i << ": " << st;
    EXPECT_NE(st.message().find(cases[i].names), absl::string_view::npos)
        << "case " << i << ": " << st;
  }
  // Another tenant cannot see the session.
  StepRequestView other{2, StepMode::kAttend, {{"strict", 3, 1, q, k, v}}};
  EXPECT_EQ(engine_->Step("other", other).status().code(),
            absl::StatusCode::kNotFound);
  // Nothing changed: the session goes on at 3 and still equals the reference.
  Tokens all = tok;
  std::vector<StepEntryResult> r;
  for (int t = 3; t < 6; ++t) {
    std::string qq, kk, vv;
    std::vector<float> qf = Random(8 * D, DType::kFp32, &qq);
    std::vector<float> kf = Random(2 * D, DType::kFp32, &kk);
    std::vector<float> vf = Random(2 * D, DType::kFp32, &vv);
    all.q.push_back(qf);
    all.k.push_back(kf);
    all.v.push_back(vf);
    StepRequestView step{2, StepMode::kAttend, {{"strict", t, 1, qq, kk, vv}}};
    absl::StatusOr<std::vector<StepEntryResult>> res = engine_->Step("t", step);
    ASSERT_TRUE(res.ok()) << res.status();
    r.push_back((*res)[0]);
  }
  // Check token 5 (the last) against full attention over all six tokens.
  std::vector<double> want;
  double want_lse;
  FullAttention(all, c.shape, 5, 0, false, &want, &want_lse);
  for (int d = 0; d < D; ++d) {
    EXPECT_NEAR(LoadElement(r[2].output.data(), DType::kFp32, d), want[d],
                1e-5 + 1e-5 * std::abs(want[d]));
  }
}

TEST_F(EngineTest, ABatchOfSessionsMatchesEachSessionAlone) {
  SessionConfig a = Config("a", DType::kFp32), b = Config("b", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(a).ok());
  ASSERT_TRUE(engine_->CreateSession(b).ok());
  SessionConfig solo = Config("solo", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(solo).ok());
  for (int t = 0; t < 20; ++t) {
    std::string qa, ka, va, qb, kb, vb;
    Random(8 * 64, DType::kFp32, &qa);
    Random(2 * 64, DType::kFp32, &ka);
    Random(2 * 64, DType::kFp32, &va);
    Random(8 * 64, DType::kFp32, &qb);
    Random(2 * 64, DType::kFp32, &kb);
    Random(2 * 64, DType::kFp32, &vb);
    StepRequestView both{2,
                         StepMode::kAttend,
                         {{"a", t, 1, qa, ka, va}, {"b", t, 1, qb, kb, vb}}};
    StepRequestView alone{2, StepMode::kAttend, {{"solo", t, 1, qb, kb, vb}}};
    absl::StatusOr<std::vector<StepEntryResult>> r1 = engine_->Step("t", both);
    absl::StatusOr<std::vector<StepEntryResult>> r2 = engine_->Step("t", alone);
    ASSERT_TRUE(r1.ok() && r2.ok());
    EXPECT_EQ((*r1)[1].output, (*r2)[0].output) << "token " << t;
    EXPECT_EQ((*r1)[1].lse, (*r2)[0].lse);
  }
}

}  // namespace
}  // namespace kvmem

namespace kvmem {
namespace {

TEST_F(EngineTest, AnIdenticalRetryIsAnsweredAgainNotAppliedTwice) {
  SessionConfig c = Config("retry", DType::kFp32);
  SessionConfig twin = Config("twin", DType::kFp32);
  ASSERT_TRUE(engine_->CreateSession(c).ok());
  ASSERT_TRUE(engine_->CreateSession(twin).ok());
  for (int t = 0; t < 12; ++t) {
    std::string q, k, v;
    Random(8 * 64, DType::kFp32, &q);
    Random(2 * 64, DType::kFp32, &k);
    Random(2 * 64, DType::kFp32, &v);
    for (StepMode mode : {StepMode::kAttend}) {
      StepRequestView step{2, mode, {{"retry", t, 1, q, k, v}}};
      absl::StatusOr<std::vector<StepEntryResult>> first =
          engine_->Step("t", step);
      ASSERT_TRUE(first.ok()) << first.status();
      // The retry (say after a lost reply) gets the same answer...
      absl::StatusOr<std::vector<StepEntryResult>> again =
          engine_->Step("t", step);
      ASSERT_TRUE(again.ok()) << again.status();
      EXPECT_EQ((*again)[0].output, (*first)[0].output);
      EXPECT_EQ((*again)[0].next_position, t + 1);
      // ...and the session advanced once: it matches a twin stepped once.
      StepRequestView once{2, mode, {{"twin", t, 1, q, k, v}}};
      absl::StatusOr<std::vector<StepEntryResult>> twin_r =
          engine_->Step("t", once);
      ASSERT_TRUE(twin_r.ok());
      EXPECT_EQ((*twin_r)[0].output, (*first)[0].output) << "token " << t;
    }
  }
  // A repeat of the position with other bytes is not a retry.
  std::string q, k, v;
  Random(8 * 64, DType::kFp32, &q);
  Random(2 * 64, DType::kFp32, &k);
  Random(2 * 64, DType::kFp32, &v);
  StepRequestView other{2, StepMode::kAttend, {{"retry", 11, 1, q, k, v}}};
  absl::Status st = engine_->Step("t", other).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("expected 12"), absl::string_view::npos) << st;
}

}  // namespace
}  // namespace kvmem

namespace kvmem {
namespace {

// Two sessions under a memory limit that holds one: each step of one
// hibernates the other (checkpointed, dropped), which wakes from storage on
// its next step and answers exactly as an engine without a limit does.
TEST(EngineMemoryTest, PastTheLimitIdleSessionsHibernateAndWakeExactly) {
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  SessionConfig c;
  c.tenant = "t";
  c.shape = {1, 2, 2, 64, DType::kFp32, std::nullopt, {}};
  c.policy.sinks = 2;
  c.policy.cascades = 2;
  c.policy.window = 16;
  c.policy.page_tokens = 8;
  c.policy.recent_tokens = 8;
  c.policy.step_budget_tokens = 24;
  c.policy.ema_beta = 0.99;
  c.policy.dense_layers = {};
  StreamConfig sc = *StreamConfig::FromSession(c);
  const int kTokens = 120;  // spills and recalls: 34 slots per stream
  // Room for one session's streams and all of its spill, not for two.
  Engine::Options limited;
  limited.memory_limit_bytes = 3 * StreamState::FixedBytes(sc);
  testing::TempDir dir_limited, dir_free;
  auto open = [](const Engine::Options& options, const std::string& path,
                 std::unique_ptr<storage::Store>* store) {
    *store = std::move(*storage::Store::Open(storage::Store::Options(), path));
    return std::move(*Engine::Open(options, store->get()));
  };
  std::unique_ptr<storage::Store> store_limited, store_free;
  std::unique_ptr<Engine> engine =
      open(limited, dir_limited.path(), &store_limited);
  std::unique_ptr<Engine> reference =
      open(Engine::Options(), dir_free.path(), &store_free);
  for (Engine* e : {engine.get(), reference.get()}) {
    for (const char* id : {"first", "second"}) {
      c.session_id = id;
      ASSERT_TRUE(e->CreateSession(c).ok());
    }
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto tensor = [&](int heads) {
    std::string bytes(size_t(heads) * 64 * 4, '\0');
    for (size_t i = 0; i < bytes.size(); i += 4) {
      const float x = normal(rng);
      memcpy(&bytes[i], &x, 4);
    }
    return bytes;
  };
  for (int t = 0; t < kTokens; ++t) {
    for (const char* id : {"first", "second"}) {
      const std::string q = tensor(2), k = tensor(2), v = tensor(2);
      StepRequestView step{0, StepMode::kAttend, {{id, t, 1, q, k, v}}};
      absl::StatusOr<std::vector<StepEntryResult>> got =
          engine->Step("t", step);
      absl::StatusOr<std::vector<StepEntryResult>> want =
          reference->Step("t", step);
      ASSERT_TRUE(got.ok()) << id << " at " << t << ": " << got.status();
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_EQ((*got)[0].output, (*want)[0].output) << id << " at " << t;
      ASSERT_EQ((*got)[0].lse, (*want)[0].lse) << id << " at " << t;
      ASSERT_LE(engine->Stats().memory_bytes, limited.memory_limit_bytes);
    }
  }
  // Every step after the first pair found the other session idle.
  EXPECT_GE(engine->Stats().hibernations, 2 * kTokens - 2);
  EXPECT_EQ(reference->Stats().hibernations, 0);
  // Describing the hibernated session ("first": "second" stepped last)
  // reports its figures without waking it.
  const int64_t in_use = engine->Stats().memory_bytes;
  absl::StatusOr<SessionInfo> asleep = engine->GetSession("t", "first");
  absl::StatusOr<SessionInfo> awake = reference->GetSession("t", "first");
  ASSERT_TRUE(asleep.ok() && awake.ok());
  EXPECT_EQ(engine->Stats().memory_bytes, in_use);
  EXPECT_EQ(asleep->manifest.layer_next_positions,
            awake->manifest.layer_next_positions);
  EXPECT_EQ(asleep->resident_tokens, awake->resident_tokens);
  EXPECT_EQ(asleep->resident_tokens_per_cascade,
            awake->resident_tokens_per_cascade);
  EXPECT_EQ(asleep->spilled_pages, awake->spilled_pages);
  EXPECT_EQ(asleep->spilled_bytes, awake->spilled_bytes);
  EXPECT_GT(asleep->spilled_pages, 0);
  // Both in one request: neither is idle, so nothing can make room, and
  // nothing changes.
  const std::string q = tensor(2), k = tensor(2), v = tensor(2);
  StepRequestView both{
      0,
      StepMode::kAttend,
      {{"first", kTokens, 1, q, k, v}, {"second", kTokens, 1, q, k, v}}};
  absl::Status st = engine->Step("t", both).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find(absl::StrCat(limited.memory_limit_bytes)),
            absl::string_view::npos)
      << st;
  for (const char* id : {"first", "second"}) {
    EXPECT_EQ(engine->GetSession("t", id)->manifest.layer_next_positions[0],
              kTokens);
  }
  // Deleting a session returns its memory; the request then fits.
  ASSERT_TRUE(engine->DeleteSession("t", "first").ok());
  ASSERT_TRUE(reference->DeleteSession("t", "first").ok());
  StepRequestView second{
      0, StepMode::kAttend, {{"second", kTokens, 1, q, k, v}}};
  absl::StatusOr<std::vector<StepEntryResult>> got = engine->Step("t", second);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0].output, (*reference->Step("t", second))[0].output);
}

TEST(EngineMemoryTest, ARequestLargerThanTheLimitIsRefusedAndChangesNothing) {
  testing::TempDir dir;
  absl::StatusOr<std::unique_ptr<storage::Store>> store =
      storage::Store::Open(storage::Store::Options(), dir.path());
  ASSERT_TRUE(store.ok());
  SessionConfig c;
  c.tenant = "t";
  c.session_id = "big";
  c.shape = {1, 2, 2, 64, DType::kFp32, std::nullopt, {}};
  c.policy.sinks = 0;
  c.policy.cascades = 1;
  c.policy.window = 64;
  c.policy.page_tokens = 16;
  c.policy.recent_tokens = 16;
  c.policy.dense_layers = {};
  StreamConfig sc = *StreamConfig::FromSession(c);
  Engine::Options options;
  options.memory_limit_bytes = StreamState::FixedBytes(sc);  // not 2 heads
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Open(options, store->get());
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->CreateSession(c).ok());
  std::string q(2 * 64 * 4, '\0'), k(2 * 64 * 4, '\0'), v(2 * 64 * 4, '\0');
  for (size_t i = 0; i < q.size(); i += 4) q[i + 2] = k[i + 2] = v[i + 2] = 1;
  StepRequestView first{0, StepMode::kAppend, {{"big", 0, 1, q, k, v}}};
  absl::Status st = (*engine)->Step("t", first).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find(absl::StrCat(options.memory_limit_bytes)),
            absl::string_view::npos)
      << st;
  EXPECT_EQ((*engine)->Stats().memory_bytes, 0);
  EXPECT_EQ((*engine)->GetSession("t", "big")->manifest.layer_next_positions[0],
            0);
}

}  // namespace
}  // namespace kvmem
