// Persistence of the engine on a real RocksDB: a session answers the same
// before and after a restart (graceful, or without a checkpoint so that the
// step log is replayed), STEP_SYNC steps report themselves durable, and a
// spilled needle comes back from storage through recall.
#include <sys/resource.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "service/engine/engine.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

constexpr int kHq = 4, kH = 2, kD = 64;

SessionConfig Config(const std::string& id, Durability durability) {
  SessionConfig c;
  c.tenant = "t";
  c.session_id = id;
  c.shape.layers = 3;
  c.shape.kv_heads = kH;
  c.shape.query_heads = kHq;
  c.shape.head_dim = kD;
  c.shape.dtype = DType::kBf16;
  c.policy.sinks = 4;
  c.policy.cascades = 2;
  c.policy.window = 32;
  c.policy.page_tokens = 8;
  c.policy.recent_tokens = 8;
  c.policy.step_budget_tokens = 40;  // sparse: selection and recall matter
  c.policy.ema_beta = 0.99;
  c.policy.dense_layers = {0};
  c.durability = durability;
  return c;
}

// Deterministic bf16 tensors per (layer, position, which).
std::string Tensor(int layer, int64_t position, int which, int elems) {
  std::mt19937 rng(uint32_t((layer * 100003 + position) * 7 + which));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(size_t(elems) * 2, '\0');
  for (int i = 0; i < elems; ++i) {
    StoreElement(bytes.data(), DType::kBf16, i, normal(rng));
  }
  return bytes;
}

class Node {
 public:
  explicit Node(const std::string& dir) : dir_(dir) { Open(); }
  void Open() {
    absl::StatusOr<std::unique_ptr<storage::Store>> store =
        storage::Store::Open(storage::Store::Options(), dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    Engine::Options options;
    options.wal_sync_ms = 5;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Open(options, store_.get());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
  }
  // `graceful`: checkpoint every session first, as a server's stop does.
  void Restart(bool graceful) {
    if (graceful) {
      ASSERT_TRUE(engine_->Checkpoint("", "", /*all_tenants=*/true).ok());
    }
    engine_.reset();
    store_.reset();
    Open();
  }
  Engine* engine() { return engine_.get(); }

 private:
  std::string dir_;
  std::unique_ptr<storage::Store> store_;
  std::unique_ptr<Engine> engine_;
};

// Steps tokens [from, to) of every layer of `id`; returns each reply.
std::vector<StepEntryResult> Drive(Engine* engine, const std::string& id,
                                   int64_t from, int64_t to, StepMode mode) {
  std::vector<StepEntryResult> replies;
  for (int64_t t = from; t < to; ++t) {
    for (int l = 0; l < 3; ++l) {
      std::string q = Tensor(l, t, 0, kHq * kD);
      std::string k = Tensor(l, t, 1, kH * kD);
      std::string v = Tensor(l, t, 2, kH * kD);
      StepRequestView r{l, mode, {{id, t, 1, q, k, v}}};
      absl::StatusOr<std::vector<StepEntryResult>> got = engine->Step("t", r);
      EXPECT_TRUE(got.ok()) << got.status() << " token " << t;
      if (!got.ok()) return replies;
      replies.push_back(std::move((*got)[0]));
    }
  }
  return replies;
}

void ExpectSameReplies(const std::vector<StepEntryResult>& a,
                       const std::vector<StepEntryResult>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].output, b[i].output) << "reply " << i;
    EXPECT_EQ(a[i].lse, b[i].lse) << "reply " << i;
    ASSERT_EQ(a[i].heads.size(), b[i].heads.size());
    for (size_t h = 0; h < a[i].heads.size(); ++h) {
      EXPECT_EQ(a[i].heads[h].positions, b[i].heads[h].positions);
      EXPECT_EQ(a[i].heads[h].k, b[i].heads[h].k) << "reply " << i;
      EXPECT_EQ(a[i].heads[h].v, b[i].heads[h].v) << "reply " << i;
    }
  }
}

class DurabilityTest : public ::testing::TestWithParam<bool> {};

// With a checkpoint (graceful) and without one (the step log replayed): a
// restarted session answers FETCH bit-identical and ATTEND identical to a
// twin that never restarted.
TEST_P(DurabilityTest, RestartedSessionAnswersLikeOneThatNeverStopped) {
  const bool graceful = GetParam();
  testing::TempDir restarted_dir, twin_dir;
  Node restarted(restarted_dir.path()), twin(twin_dir.path());
  for (Node* node : {&restarted, &twin}) {
    ASSERT_TRUE(
        node->engine()->CreateSession(Config("s", Durability::kAsync)).ok());
    Drive(node->engine(), "s", 0, 120, StepMode::kAttend);
  }
  restarted.Restart(graceful);
  absl::StatusOr<SessionInfo> info = restarted.engine()->GetSession("t", "s");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->position, 120);
  EXPECT_EQ(info->manifest.durable_position, 120);
  EXPECT_GT(info->spilled_pages, 0);
  ExpectSameReplies(Drive(restarted.engine(), "s", 120, 140, StepMode::kFetch),
                    Drive(twin.engine(), "s", 120, 140, StepMode::kFetch));
  ExpectSameReplies(Drive(restarted.engine(), "s", 140, 160, StepMode::kAttend),
                    Drive(twin.engine(), "s", 140, 160, StepMode::kAttend));
  // A second restart, after more steps, still agrees.
  restarted.Restart(graceful);
  ExpectSameReplies(Drive(restarted.engine(), "s", 160, 170, StepMode::kAttend),
                    Drive(twin.engine(), "s", 160, 170, StepMode::kAttend));
}

// After a restart a worker that lost the reply of its last step gets it
// again, once: after a crash the log replay rebuilds each layer's kept
// reply; after a graceful stop the checkpoint stored it.
TEST_P(DurabilityTest, ARetryAfterARestartIsAnsweredOnce) {
  const bool graceful = GetParam();
  testing::TempDir dir;
  Node node(dir.path());
  ASSERT_TRUE(
      node.engine()->CreateSession(Config("retry", Durability::kAsync)).ok());
  std::vector<StepEntryResult> before =
      Drive(node.engine(), "retry", 0, 30, StepMode::kAttend);
  ASSERT_EQ(before.size(), 90u);
  node.Restart(graceful);
  for (int l = 0; l < 3; ++l) {
    std::string q = Tensor(l, 29, 0, kHq * kD);
    std::string k = Tensor(l, 29, 1, kH * kD);
    std::string v = Tensor(l, 29, 2, kH * kD);
    StepRequestView again{l, StepMode::kAttend, {{"retry", 29, 1, q, k, v}}};
    absl::StatusOr<std::vector<StepEntryResult>> got =
        node.engine()->Step("t", again);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ((*got)[0].output, before[size_t(29 * 3 + l)].output);
    EXPECT_EQ((*got)[0].lse, before[size_t(29 * 3 + l)].lse);
    EXPECT_EQ((*got)[0].next_position, 30);
  }
  absl::StatusOr<SessionInfo> info = node.engine()->GetSession("t", "retry");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->position, 30);  // answered, not applied again
  // A repeat with other bytes is still refused.
  std::string q = Tensor(0, 99, 0, kHq * kD), k = Tensor(0, 99, 1, kH * kD);
  std::string v = Tensor(0, 99, 2, kH * kD);
  StepRequestView other{0, StepMode::kAttend, {{"retry", 29, 1, q, k, v}}};
  EXPECT_EQ(node.engine()->Step("t", other).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

INSTANTIATE_TEST_SUITE_P(GracefulOrReplayed, DurabilityTest, ::testing::Bool());

TEST(DurabilityTest, StepSyncRepliesAreDurable) {
  testing::TempDir dir;
  Node node(dir.path());
  ASSERT_TRUE(
      node.engine()->CreateSession(Config("sync", Durability::kStepSync)).ok());
  std::vector<StepEntryResult> replies =
      Drive(node.engine(), "sync", 0, 12, StepMode::kAppend);
  ASSERT_EQ(replies.size(), 36u);
  for (size_t i = 0; i < replies.size(); ++i) {
    const int64_t token = int64_t(i / 3), layer = int64_t(i % 3);
    // Durable in every layer: the token is durable once its last layer is.
    EXPECT_EQ(replies[i].durable_position, layer == 2 ? token + 1 : token)
        << "reply " << i;
  }
}

TEST(DurabilityTest, AsyncStepsBecomeDurableWithTheWalSync) {
  testing::TempDir dir;
  Node node(dir.path());
  ASSERT_TRUE(
      node.engine()->CreateSession(Config("async", Durability::kAsync)).ok());
  Drive(node.engine(), "async", 0, 10, StepMode::kAppend);
  // The sync loop runs every 5 ms; wait for it by polling the position
  // (bounded), since its timing is the thing under test.
  int64_t durable = 0;
  for (int i = 0; i < 2000 && durable < 10; ++i) {
    absl::StatusOr<SessionInfo> info = node.engine()->GetSession("t", "async");
    ASSERT_TRUE(info.ok());
    durable = info->manifest.durable_position;
    if (durable < 10) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(durable, 10);
}

TEST(DurabilityTest, ANeedleSpilledToStorageIsRecalledAfterARestart) {
  testing::TempDir dir;
  Node node(dir.path());
  SessionConfig c = Config("needle", Durability::kAsync);
  c.shape.layers = 1;
  c.shape.dtype = DType::kFp32;
  c.policy.dense_layers = {};
  ASSERT_TRUE(node.engine()->CreateSession(c).ok());
  // Token 10 is the needle: a key far larger than the others along one
  // direction. Tokens are noise elsewhere.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  auto tensor = [&](int elems, bool needle) {
    std::string bytes(size_t(elems) * 4, '\0');
    for (int i = 0; i < elems; ++i) {
      float x = needle && i % kD == 3 ? 30.0f : normal(rng);
      memcpy(&bytes[size_t(i) * 4], &x, 4);
    }
    return bytes;
  };
  for (int64_t t = 0; t < 200; ++t) {
    std::string q = tensor(kHq * kD, false), k = tensor(kH * kD, t == 10);
    std::string v = tensor(kH * kD, false);
    StepRequestView r{0, StepMode::kAppend, {{"needle", t, 1, q, k, v}}};
    ASSERT_TRUE(node.engine()->Step("t", r).ok());
  }
  node.Restart(/*graceful=*/true);
  // A query along the needle's direction: recall must bring page holding
  // token 10 back from RocksDB (the cascade evicted it long ago).
  std::string q = tensor(kHq * kD, true), k = tensor(kH * kD, false);
  std::string v = tensor(kH * kD, false);
  StepRequestView fetch{0, StepMode::kFetch, {{"needle", 200, 1, q, k, v}}};
  absl::StatusOr<std::vector<StepEntryResult>> got =
      node.engine()->Step("t", fetch);
  ASSERT_TRUE(got.ok()) << got.status();
  for (const FetchedHead& head : (*got)[0].heads) {
    EXPECT_LE(head.positions.size(), 40u);
    EXPECT_TRUE(std::binary_search(head.positions.begin(), head.positions.end(),
                                   int64_t(10)))
        << "the needle was not recalled";
  }
}

}  // namespace
}  // namespace kvmem

namespace kvmem {
namespace {

TEST(SessionLimitsTest, IdleSessionsExpireAndSpillQuotaIsEnforced) {
  testing::TempDir dir;
  absl::StatusOr<std::unique_ptr<storage::Store>> store =
      storage::Store::Open(storage::Store::Options(), dir.path());
  ASSERT_TRUE(store.ok());
  // µs; starts at the wall clock (creation uses it), then moved by the test.
  std::atomic<int64_t> now{absl::ToUnixMicros(absl::Now())};
  Engine::Options options;
  options.now_unix_micros = [&now] { return now.load(); };
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Open(options, store->get());
  ASSERT_TRUE(engine.ok());

  SessionConfig idle = Config("idle", Durability::kAsync);
  idle.policy.idle_ttl_seconds = 5;
  ASSERT_TRUE((*engine)->CreateSession(idle).ok());
  ASSERT_TRUE(
      (*engine)->CreateSession(Config("forever", Durability::kAsync)).ok());
  now += 3'000'000;
  Drive(engine->get(), "idle", 0, 1, StepMode::kAppend);  // used at +3 s
  now += 4'000'000;
  EXPECT_EQ((*engine)->SweepExpired(), 0);  // idle for 4 s < 5 s
  now += 2'000'000;
  EXPECT_EQ((*engine)->SweepExpired(), 1);  // idle for 6 s
  EXPECT_EQ((*engine)->GetSession("t", "idle").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE((*engine)->GetSession("t", "forever").ok());

  // The quota holds 10 tokens' worth of spill in every layer (3 layers ×
  // 2 KV heads × (k + v) × 64 × bf16 per token).
  SessionConfig capped = Config("capped", Durability::kAsync);
  const int64_t per_token = 3 * kH * 2 * kD * 2;  // 3 layers
  capped.policy.spill_quota_bytes = 10 * per_token;
  ASSERT_TRUE((*engine)->CreateSession(capped).ok());
  int64_t t = 0;
  absl::Status refused;
  for (; t < 200 && refused.ok(); ++t) {
    for (int l = 0; l < 3 && refused.ok(); ++l) {
      std::string k = Tensor(l, t, 1, kH * kD), v = Tensor(l, t, 2, kH * kD);
      StepRequestView r{l, StepMode::kAppend, {{"capped", t, 1, "", k, v}}};
      refused = (*engine)->Step("t", r).status();
    }
  }
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("spill quota"), absl::string_view::npos);
  absl::StatusOr<SessionInfo> info = (*engine)->GetSession("t", "capped");
  ASSERT_TRUE(info.ok());
  // Evictions start after 68 tokens; the quota stops it 10 tokens later.
  EXPECT_GE(info->position, 68);
  EXPECT_LE(info->spilled_bytes, capped.policy.spill_quota_bytes);
}

}  // namespace
}  // namespace kvmem

namespace kvmem {
namespace {

// A real storage failure (a file-size limit below the WAL's next append):
// the STEP_SYNC step that hit it answers UNAVAILABLE with the cause, its
// session refuses further steps, and after a restart every session resumes
// at its durable position with its data intact.
TEST(StorageFaultTest, AFailedWriteIsUnavailableAndCorruptsNothing) {
  testing::TempDir dir;
  std::vector<StepEntryResult> fetched_before;
  {
    Node node(dir.path());
    ASSERT_TRUE(
        node.engine()->CreateSession(Config("a", Durability::kStepSync)).ok());
    ASSERT_TRUE(
        node.engine()->CreateSession(Config("b", Durability::kStepSync)).ok());
    Drive(node.engine(), "a", 0, 20, StepMode::kAppend);
    Drive(node.engine(), "b", 0, 20, StepMode::kAppend);

    struct rlimit old_limit;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
    struct sigaction ignore = {}, old_action;
    ignore.sa_handler = SIG_IGN;
    ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &old_action), 0);
    struct rlimit limit = old_limit;
    limit.rlim_cur = 4096;  // below the WAL's size: its next append fails
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
    std::string q = Tensor(0, 20, 0, kHq * kD), k = Tensor(0, 20, 1, kH * kD);
    std::string v = Tensor(0, 20, 2, kH * kD);
    StepRequestView step{0, StepMode::kAppend, {{"a", 20, 1, q, k, v}}};
    absl::Status failed = node.engine()->Step("t", step).status();
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old_limit), 0);
    ASSERT_EQ(sigaction(SIGXFSZ, &old_action, nullptr), 0);
    EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
    EXPECT_NE(failed.message().find("File too large"), absl::string_view::npos)
        << failed;
    // The session whose write failed refuses steps until a restart.
    StepRequestView next{1, StepMode::kAppend, {{"a", 20, 1, q, k, v}}};
    absl::Status refused = node.engine()->Step("t", next).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
    EXPECT_NE(refused.message().find("restart"), absl::string_view::npos);
  }
  // Restart: RocksDB reopens, every session is at its durable position (the
  // failed step was never durable) and its data reads back.
  Node node(dir.path());
  for (const char* id : {"a", "b"}) {
    absl::StatusOr<SessionInfo> info = node.engine()->GetSession("t", id);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->manifest.durable_position, 20) << id;
    EXPECT_EQ(info->manifest.layer_next_positions,
              std::vector<int64_t>({20, 20, 20}))
        << id;
  }
  testing::TempDir twin_dir;
  Node twin(twin_dir.path());
  ASSERT_TRUE(
      twin.engine()->CreateSession(Config("a", Durability::kStepSync)).ok());
  Drive(twin.engine(), "a", 0, 20, StepMode::kAppend);
  ExpectSameReplies(Drive(node.engine(), "a", 20, 22, StepMode::kFetch),
                    Drive(twin.engine(), "a", 20, 22, StepMode::kFetch));
}

}  // namespace
}  // namespace kvmem
