// Many workers, one stream each, over the real server: every ATTEND result
// equals the CPU engine run in-process on the same inputs (eviction and
// selection active), and a cancelled stream leaves its sessions consistent.
#include <cstdio>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/engine/engine.h"
#include "service/server.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

constexpr int kWorkers = 4;
constexpr int kSessions = 16;
constexpr int kLayers = 4;
constexpr int kTokens = 200;
constexpr int kKvHeads = 2, kQueryHeads = 4, kHeadDim = 64;

v1::CreateSessionRequest SessionRequest(int i) {
  v1::CreateSessionRequest r;
  r.set_session_id(absl::StrCat("w-session-", i));
  v1::ModelShape* s = r.mutable_shape();
  s->set_layers(kLayers);
  s->set_kv_heads(kKvHeads);
  s->set_query_heads(kQueryHeads);
  s->set_head_dim(kHeadDim);
  s->set_dtype(v1::DTYPE_BF16);
  v1::CachePolicy* p = r.mutable_policy();
  // 4 + 2·32 = 68 resident tokens of 200: eviction, spill and a sparse
  // selection (budget 48) in layers 2 and 3.
  p->set_sinks(4);
  p->set_cascades(2);
  p->set_window(32);
  p->set_page_tokens(8);
  p->set_recent_tokens(8);
  p->set_step_budget_tokens(48);
  return r;
}

// The same session for the in-process reference engine.
SessionConfig ReferenceConfig(int i) {
  SessionConfig c;
  c.tenant = "default";
  c.session_id = absl::StrCat("w-session-", i);
  c.shape.layers = kLayers;
  c.shape.kv_heads = kKvHeads;
  c.shape.query_heads = kQueryHeads;
  c.shape.head_dim = kHeadDim;
  c.shape.dtype = DType::kBf16;
  c.policy.sinks = 4;
  c.policy.cascades = 2;
  c.policy.window = 32;
  c.policy.page_tokens = 8;
  c.policy.recent_tokens = 8;
  c.policy.step_budget_tokens = 48;
  c.policy.dense_layers = {0, 1};
  return c;
}

// Deterministic bf16 bytes for (session, layer, token, tensor).
std::string Tensor(int session, int layer, int token, int which, int elems) {
  std::mt19937 rng(
      uint32_t(((session * 131 + layer) * 1009 + token) * 7 + which));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(size_t(elems) * 2, '\0');
  for (int i = 0; i < elems; ++i) {
    StoreElement(bytes.data(), DType::kBf16, i, normal(rng));
  }
  return bytes;
}

class WorkersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.data_dir = server_dir_.path();
    options.backend = "cpu";
    absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateChannel(server_->address(),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::KvMemory::NewStub(channel_);
  }
  void TearDown() override { server_->Shutdown(absl::Seconds(5)); }

  testing::TempDir server_dir_;
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvMemory::Stub> stub_;
};

TEST_F(WorkersTest, FourWorkersSixteenSessionsMatchTheInProcessEngine) {
  for (int i = 0; i < kSessions; ++i) {
    grpc::ClientContext context;
    v1::Session s;
    ASSERT_TRUE(stub_->CreateSession(&context, SessionRequest(i), &s).ok());
  }
  // Worker w drives sessions w, w+4, w+8, w+12: each request is one layer
  // of a batch of its four sessions; layers go 0..3 for every token.
  std::vector<std::vector<std::string>> outputs(
      kSessions, std::vector<std::string>(size_t(kLayers) * kTokens));
  std::vector<std::thread> workers;
  std::atomic<int> failures{0};
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      auto channel = grpc::CreateChannel(server_->address(),
                                         grpc::InsecureChannelCredentials());
      auto stub = v1::KvMemory::NewStub(channel);
      grpc::ClientContext context;
      auto stream = stub->StepStream(&context);
      for (int t = 0; t < kTokens; ++t) {
        for (int l = 0; l < kLayers; ++l) {
          v1::StepRequest r;
          r.set_layer(l);
          r.set_mode(v1::STEP_MODE_ATTEND);
          r.set_request_id(uint64_t(t * kLayers + l));
          for (int i = w; i < kSessions; i += kWorkers) {
            v1::StepEntry* e = r.add_entries();
            e->set_session_id(absl::StrCat("w-session-", i));
            e->set_position(t);
            e->set_num_tokens(1);
            e->set_q(Tensor(i, l, t, 0, kQueryHeads * kHeadDim));
            e->set_k(Tensor(i, l, t, 1, kKvHeads * kHeadDim));
            e->set_v(Tensor(i, l, t, 2, kKvHeads * kHeadDim));
          }
          v1::StepStreamResponse reply;
          if (!stream->Write(r) || !stream->Read(&reply) ||
              reply.error_code() != 0) {
            ++failures;
            std::fprintf(stderr, "worker %d token %d layer %d: %s\n", w, t, l,
                         reply.error_message().c_str());
            return;
          }
          for (int j = 0; j < reply.response().results_size(); ++j) {
            outputs[size_t(w + j * kWorkers)][size_t(l) * kTokens + t] =
                reply.response().results(j).output();
          }
        }
      }
      stream->WritesDone();
      if (!stream->Finish().ok()) ++failures;
    });
  }
  for (std::thread& t : workers) t.join();
  ASSERT_EQ(failures.load(), 0);

  // The reference: the CPU engine in-process, same inputs, one at a time.
  testing::TempDir reference_dir;
  absl::StatusOr<std::unique_ptr<storage::Store>> store =
      storage::Store::Open(storage::Store::Options(), reference_dir.path());
  ASSERT_TRUE(store.ok());
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Open(Engine::Options(), store->get());
  ASSERT_TRUE(engine.ok());
  int compared = 0;
  for (int i = 0; i < kSessions; ++i) {
    ASSERT_TRUE((*engine)->CreateSession(ReferenceConfig(i)).ok());
    for (int t = 0; t < kTokens; ++t) {
      for (int l = 0; l < kLayers; ++l) {
        std::string q = Tensor(i, l, t, 0, kQueryHeads * kHeadDim);
        std::string k = Tensor(i, l, t, 1, kKvHeads * kHeadDim);
        std::string v = Tensor(i, l, t, 2, kKvHeads * kHeadDim);
        StepRequestView r{l,
                          StepMode::kAttend,
                          {{absl::StrCat("w-session-", i), t, 1, q, k, v}}};
        absl::StatusOr<std::vector<StepEntryResult>> want =
            (*engine)->Step("default", r);
        ASSERT_TRUE(want.ok()) << want.status();
        ASSERT_EQ(outputs[i][size_t(l) * kTokens + t], (*want)[0].output)
            << "session " << i << " layer " << l << " token " << t;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, kSessions * kLayers * kTokens);
  // Eviction happened: each stream holds 68 of its 200 tokens.
  grpc::ClientContext context;
  v1::GetSessionRequest get;
  get.set_session_id("w-session-0");
  v1::Session s;
  ASSERT_TRUE(stub_->GetSession(&context, get, &s).ok());
  EXPECT_EQ(s.position(), kTokens);
  EXPECT_EQ(s.resident_tokens(), kLayers * kKvHeads * 68);
  // Sinks, then two full cascades of 32, in every stream.
  ASSERT_EQ(s.resident_tokens_per_cascade_size(), 3);
  EXPECT_EQ(s.resident_tokens_per_cascade(0), kLayers * kKvHeads * 4);
  EXPECT_EQ(s.resident_tokens_per_cascade(1), kLayers * kKvHeads * 32);
  EXPECT_EQ(s.resident_tokens_per_cascade(2), kLayers * kKvHeads * 32);
  EXPECT_GT(s.spilled_pages(), 0);
}

TEST_F(WorkersTest, ACancelledStreamLeavesItsSessionsConsistent) {
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext context;
    v1::Session s;
    ASSERT_TRUE(stub_->CreateSession(&context, SessionRequest(i), &s).ok());
  }
  auto request = [](int layer, int t) {
    v1::StepRequest r;
    r.set_layer(layer);
    r.set_mode(v1::STEP_MODE_ATTEND);
    for (int i = 0; i < 2; ++i) {
      v1::StepEntry* e = r.add_entries();
      e->set_session_id(absl::StrCat("w-session-", i));
      e->set_position(t);
      e->set_num_tokens(1);
      e->set_q(Tensor(i, layer, t, 0, kQueryHeads * kHeadDim));
      e->set_k(Tensor(i, layer, t, 1, kKvHeads * kHeadDim));
      e->set_v(Tensor(i, layer, t, 2, kKvHeads * kHeadDim));
    }
    return r;
  };
  // The dying worker writes a batch and cancels without reading the reply.
  {
    grpc::ClientContext context;
    auto stream = stub_->StepStream(&context);
    v1::StepStreamResponse reply;
    ASSERT_TRUE(stream->Write(request(0, 0)));
    ASSERT_TRUE(stream->Read(&reply));
    ASSERT_TRUE(stream->Write(request(0, 1)));
    context.TryCancel();
    stream->Finish().IgnoreError();
  }
  // Another worker goes on. It resends the cancelled batch: whether the
  // server had applied it (wholly, for both sessions), had it still queued,
  // or never got it, the resend is answered once and both sessions stand at
  // 2, since an identical repeat of a step is a retry, not a new step.
  grpc::ClientContext context;
  auto stream = stub_->StepStream(&context);
  for (int t = 1; t < 5; ++t) {
    v1::StepStreamResponse reply;
    ASSERT_TRUE(stream->Write(request(0, t)));
    ASSERT_TRUE(stream->Read(&reply));
    ASSERT_EQ(reply.error_code(), 0) << reply.error_message();
    EXPECT_EQ(reply.response().results(0).next_position(), t + 1);
    EXPECT_EQ(reply.response().results(1).next_position(), t + 1);
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext get_context;
    v1::GetSessionRequest get;
    get.set_session_id(absl::StrCat("w-session-", i));
    v1::Session s;
    ASSERT_TRUE(stub_->GetSession(&get_context, get, &s).ok());
    EXPECT_EQ(s.layer_next_positions(0), 5);
  }
}

}  // namespace
}  // namespace kvmem
