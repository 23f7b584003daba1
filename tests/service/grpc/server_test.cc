// Integration tests of the session lifecycle, health and server options:
// the real server on 127.0.0.1:0 (server_fixture.h).
#include "service/server.h"

#include <malloc.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "kernels/cuda/device_probe.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "tests/service/grpc/server_fixture.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

TEST_F(ServerTest, CreateGetListDelete) {
  v1::Session created;
  ASSERT_TRUE(Create(ValidRequest("chat-1"), &created).ok());
  EXPECT_EQ(created.session_id(), "chat-1");
  EXPECT_EQ(created.tenant(), "default");
  // Defaults of the contract are filled in and reported.
  EXPECT_EQ(created.policy().sinks(), 64);
  EXPECT_EQ(created.policy().cascades(), 4);
  EXPECT_EQ(created.policy().window(), 1024);
  EXPECT_EQ(created.policy().page_tokens(), 16);
  EXPECT_EQ(created.policy().step_budget_tokens(), 2048);
  EXPECT_EQ(created.policy().recent_tokens(), 16);
  EXPECT_DOUBLE_EQ(created.policy().ema_beta(), 0.9999999);
  EXPECT_EQ(created.policy().dense_layers_size(), 2);
  EXPECT_EQ(created.policy().positions_mode(), v1::POSITIONS_MODE_ABSOLUTE);
  EXPECT_TRUE(created.policy().recall());
  EXPECT_EQ(created.durability(), v1::DURABILITY_ASYNC);
  EXPECT_FLOAT_EQ(created.shape().softmax_scale(), 1.0f / std::sqrt(128.0f));
  EXPECT_EQ(created.layer_next_positions_size(), 32);
  EXPECT_EQ(created.position(), 0);

  v1::Session generated;
  ASSERT_TRUE(Create(ValidRequest(""), &generated).ok());
  EXPECT_FALSE(generated.session_id().empty());

  v1::Session got;
  ASSERT_TRUE(Get("chat-1", &got).ok());
  EXPECT_EQ(got.shape().SerializeAsString(),
            created.shape().SerializeAsString());
  EXPECT_EQ(got.policy().SerializeAsString(),
            created.policy().SerializeAsString());

  std::vector<std::string> ids = ListIds();
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids[0], "chat-1");  // "chat-1" < "s-..."
  EXPECT_EQ(ids[1], generated.session_id());

  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub_->GetStats(Context().get(), {}, &stats).ok());
  EXPECT_EQ(stats.sessions(), 2);
  EXPECT_EQ(stats.backend(), "cpu");

  v1::DeleteSessionRequest del;
  del.set_session_id("chat-1");
  v1::DeleteSessionResponse deleted;
  ASSERT_TRUE(stub_->DeleteSession(Context().get(), del, &deleted).ok());
  EXPECT_EQ(Get("chat-1", &got).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(stub_->DeleteSession(Context().get(), del, &deleted).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ListIds().size(), 1u);
}

TEST_F(ServerTest, SessionsSurviveARestart) {
  std::map<std::string, std::string> described;
  for (int i = 0; i < 5; ++i) {
    v1::CreateSessionRequest r = ValidRequest(absl::StrCat("sess-", i));
    (*r.mutable_labels())["worker"] = absl::StrCat("w", i % 2);
    r.mutable_policy()->set_window(512);
    r.set_durability(i % 2 ? v1::DURABILITY_STEP_SYNC : v1::DURABILITY_ASYNC);
    v1::Session s;
    ASSERT_TRUE(Create(r, &s, "acme").ok());
    s.clear_last_used_unix_micros();
    described[s.session_id()] = s.SerializeAsString();
  }
  Restart();
  EXPECT_EQ(ListIds("acme").size(), 5u);
  for (const auto& [id, bytes] : described) {
    v1::Session s;
    ASSERT_TRUE(Get(id, &s, "acme").ok()) << id;
    s.clear_last_used_unix_micros();
    EXPECT_EQ(s.SerializeAsString(), bytes) << id;
  }
  v1::DeleteSessionRequest del;
  del.set_session_id("sess-3");
  v1::DeleteSessionResponse deleted;
  ASSERT_TRUE(stub_->DeleteSession(Context("acme").get(), del, &deleted).ok());
  Restart();
  std::vector<std::string> ids = ListIds("acme");
  EXPECT_EQ(ids,
            (std::vector<std::string>{"sess-0", "sess-1", "sess-2", "sess-4"}));
}

TEST_F(ServerTest, DuplicateIdIsAlreadyExistsAndChangesNothing) {
  v1::CreateSessionRequest r = ValidRequest("dup");
  v1::Session first, second;
  ASSERT_TRUE(Create(r, &first).ok());
  r.mutable_shape()->set_layers(2);
  grpc::Status st = Create(r, &second);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(st.error_message().find("dup"), std::string::npos);
  v1::Session got;
  ASSERT_TRUE(Get("dup", &got).ok());
  EXPECT_EQ(got.shape().layers(), 32);
}

TEST_F(ServerTest, TenantsAreIsolated) {
  v1::Session s;
  ASSERT_TRUE(Create(ValidRequest("mine"), &s, "tenant-a").ok());
  EXPECT_EQ(Get("mine", &s, "tenant-b").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(ListIds("tenant-b").empty());
  EXPECT_TRUE(Get("mine", &s, "tenant-a").ok());
  grpc::Status st = Get("mine", &s, "bad tenant");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("kvmem-tenant"), std::string::npos);
}

TEST_F(ServerTest, ListPagesAndFilters) {
  for (int i = 0; i < 7; ++i) {
    v1::CreateSessionRequest r = ValidRequest(absl::StrCat("p", i));
    (*r.mutable_labels())["even"] = i % 2 ? "no" : "yes";
    v1::Session s;
    ASSERT_TRUE(Create(r, &s).ok());
  }
  EXPECT_EQ(ListIds("", 2).size(), 7u);
  v1::ListSessionsRequest r;
  (*r.mutable_label_filter())["even"] = "yes";
  v1::ListSessionsResponse page;
  ASSERT_TRUE(stub_->ListSessions(Context().get(), r, &page).ok());
  EXPECT_EQ(page.sessions_size(), 4);
  r.set_page_size(5000);
  grpc::Status st = stub_->ListSessions(Context().get(), r, &page);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("page_size"), std::string::npos);
  r.set_page_size(2);
  r.set_page_token("not-a-token");
  st = stub_->ListSessions(Context().get(), r, &page);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("page_token"), std::string::npos);
}

struct BadField {
  const char* name;  // the field the message must name
  std::function<void(v1::CreateSessionRequest*)> mutate;
};

TEST_F(ServerTest, EveryInvalidFieldOfCreateSessionIsNamed) {
  using R = v1::CreateSessionRequest;
  auto cache_rank = [](R* r) {
    r->mutable_policy()->set_positions_mode(v1::POSITIONS_MODE_CACHE_RANK);
    r->mutable_shape()->mutable_rotary()->set_base_theta(10000);
  };
  const std::vector<BadField> cases = {
      {"session_id", [](R* r) { r->set_session_id("has space"); }},
      {"session_id", [](R* r) { r->set_session_id(std::string(129, 'a')); }},
      {"shape.layers", [](R* r) { r->mutable_shape()->set_layers(0); }},
      {"shape.layers", [](R* r) { r->mutable_shape()->set_layers(1025); }},
      {"shape.kv_heads", [](R* r) { r->mutable_shape()->set_kv_heads(0); }},
      {"shape.kv_heads", [](R* r) { r->mutable_shape()->set_kv_heads(-8); }},
      {"shape.query_heads",
       [](R* r) { r->mutable_shape()->set_query_heads(12); }},
      {"shape.query_heads",
       [](R* r) { r->mutable_shape()->set_query_heads(0); }},
      {"shape.head_dim must be one of 64, 128, 256",
       [](R* r) { r->mutable_shape()->set_head_dim(96); }},
      {"shape.dtype",
       [](R* r) { r->mutable_shape()->set_dtype(v1::DTYPE_UNSPECIFIED); }},
      {"shape.dtype",
       [](R* r) { r->mutable_shape()->set_dtype(v1::DType(9)); }},
      {"shape.softmax_scale",
       [](R* r) { r->mutable_shape()->set_softmax_scale(-1); }},
      {"shape.softmax_scale",
       [](R* r) { r->mutable_shape()->set_softmax_scale(NAN); }},
      {"shape.rotary.base_theta",
       [](R* r) { r->mutable_shape()->mutable_rotary()->set_base_theta(-5); }},
      {"shape.rotary.base_theta",
       [](R* r) {
         r->mutable_policy()->set_positions_mode(v1::POSITIONS_MODE_CACHE_RANK);
       }},
      {"shape.rotary.rotary_dims",
       [&](R* r) {
         cache_rank(r);
         r->mutable_shape()->mutable_rotary()->set_rotary_dims(3);
       }},
      {"shape.rotary.rotary_dims",
       [&](R* r) {
         cache_rank(r);
         r->mutable_shape()->mutable_rotary()->set_rotary_dims(256);
       }},
      {"shape.rotary.scaling",
       [&](R* r) {
         cache_rank(r);
         r->mutable_shape()->mutable_rotary()->set_scaling(
             v1::RotaryScaling(7));
       }},
      {"shape.rotary.scaling_factor",
       [&](R* r) {
         cache_rank(r);
         v1::Rotary* rot = r->mutable_shape()->mutable_rotary();
         rot->set_scaling(v1::ROTARY_SCALING_LINEAR);
         rot->set_scaling_factor(0.5);
       }},
      {"shape.rotary.low_freq_factor",
       [&](R* r) {
         cache_rank(r);
         v1::Rotary* rot = r->mutable_shape()->mutable_rotary();
         rot->set_scaling(v1::ROTARY_SCALING_LLAMA3);
         rot->set_scaling_factor(8);
         rot->set_low_freq_factor(4);
         rot->set_high_freq_factor(1);
         rot->set_original_max_positions(8192);
       }},
      {"shape.rotary.original_max_positions",
       [&](R* r) {
         cache_rank(r);
         v1::Rotary* rot = r->mutable_shape()->mutable_rotary();
         rot->set_scaling(v1::ROTARY_SCALING_LLAMA3);
         rot->set_scaling_factor(8);
         rot->set_low_freq_factor(1);
         rot->set_high_freq_factor(4);
       }},
      {"policy.sinks", [](R* r) { r->mutable_policy()->set_sinks(-1); }},
      {"policy.cascades", [](R* r) { r->mutable_policy()->set_cascades(0); }},
      {"policy.cascades", [](R* r) { r->mutable_policy()->set_cascades(17); }},
      {"policy.page_tokens",
       [](R* r) { r->mutable_policy()->set_page_tokens(0); }},
      {"policy.page_tokens",
       [](R* r) { r->mutable_policy()->set_page_tokens(2048); }},
      {"policy.window must be a multiple of policy.page_tokens",
       [](R* r) { r->mutable_policy()->set_window(1000); }},
      {"policy.window", [](R* r) { r->mutable_policy()->set_window(0); }},
      {"policy.window",
       [](R* r) {
         r->mutable_policy()->set_window(1 << 20);
         r->mutable_policy()->set_cascades(16);
       }},
      {"policy.recent_tokens",
       [](R* r) { r->mutable_policy()->set_recent_tokens(-1); }},
      {"policy.recent_tokens",
       [](R* r) { r->mutable_policy()->set_recent_tokens(4096); }},
      {"policy.step_budget_tokens",
       [](R* r) { r->mutable_policy()->set_step_budget_tokens(64); }},
      {"policy.step_budget_tokens",
       [](R* r) { r->mutable_policy()->set_step_budget_tokens(1 << 21); }},
      {"policy.ema_beta", [](R* r) { r->mutable_policy()->set_ema_beta(1.0); }},
      {"policy.ema_beta", [](R* r) { r->mutable_policy()->set_ema_beta(0); }},
      {"policy.ema_beta", [](R* r) { r->mutable_policy()->set_ema_beta(NAN); }},
      {"policy.score_reduction",
       [](R* r) {
         r->mutable_policy()->set_score_reduction(v1::ScoreReduction(5));
       }},
      {"policy.positions_mode",
       [](R* r) {
         r->mutable_policy()->set_positions_mode(v1::PositionsMode(5));
       }},
      {"policy.dense_layers[0]",
       [](R* r) { r->mutable_policy()->add_dense_layers(32); }},
      {"policy.dense_layers[1] repeats",
       [](R* r) {
         r->mutable_policy()->add_dense_layers(1);
         r->mutable_policy()->add_dense_layers(1);
       }},
      {"policy.spill_quota_bytes",
       [](R* r) { r->mutable_policy()->set_spill_quota_bytes(-1); }},
      {"policy.idle_ttl_seconds",
       [](R* r) { r->mutable_policy()->set_idle_ttl_seconds(-1); }},
      {"durability", [](R* r) { r->set_durability(v1::Durability(3)); }},
      {"labels", [](R* r) { (*r->mutable_labels())["Bad Key"] = "x"; }},
      {"labels",
       [](R* r) { (*r->mutable_labels())["k"] = std::string(300, 'v'); }},
      {"labels",
       [](R* r) {
         for (int i = 0; i < 65; ++i)
           (*r->mutable_labels())[absl::StrCat("k", i)] = "v";
       }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    v1::CreateSessionRequest r = ValidRequest(absl::StrCat("case-", i));
    cases[i].mutate(&r);
    v1::Session s;
    grpc::Status st = Create(r, &s);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << "case " << i << " (" << cases[i].name << "): " << st.error_message();
    EXPECT_NE(st.error_message().find(cases[i].name), std::string::npos)
        << "case " << i << ": message \"" << st.error_message()
        << "\" does not name " << cases[i].name;
  }
  // A rejected request changes nothing, and the base request is valid.
  EXPECT_TRUE(ListIds().empty());
  v1::Session s;
  EXPECT_TRUE(Create(ValidRequest("valid"), &s).ok());
}

// Calls grpc.health.v1.Health/Check for `service` with hand-encoded bytes
// (HealthCheckRequest{service = 1}); returns the status field (1 = SERVING,
// 2 = NOT_SERVING), or -1 with the call's status in `error`.
int HealthCheck(grpc::Channel* channel, const std::string& service,
                grpc::Status* error) {
  grpc::GenericStub stub(channel->shared_from_this());
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);
    request.push_back(char(service.size()));
    request.append(service);
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(10));
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(),
                 &in, &out, [&done](grpc::Status s) { done.set_value(s); });
  *error = done.get_future().get();
  if (!error->ok()) return -1;
  std::vector<grpc::Slice> slices;
  if (!out.Dump(&slices).ok()) return -1;
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  // HealthCheckResponse{status = 1 (varint)}; an absent field means 0.
  if (bytes.size() == 2 && bytes[0] == 0x08) return bytes[1];
  return bytes.empty() ? 0 : -1;
}

TEST_F(ServerTest, HealthIsServingThenShutdownRefusesCalls) {
  grpc::Status error;
  EXPECT_EQ(HealthCheck(channel_.get(), "", &error), 1)
      << error.error_message();
  EXPECT_EQ(HealthCheck(channel_.get(), "kvmem.v1.KvMemory", &error), 1);
  server_->Shutdown(absl::Seconds(5));
  v1::Session s;
  grpc::Status st = Get("anything", &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  server_.reset();
}

TEST_F(ServerTest, SecondServerOnTheSameDataDirIsRefused) {
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.data_dir = dir_.path();
  options.backend = "cpu";
  absl::StatusOr<std::unique_ptr<Server>> second = StartServer(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable)
      << second.status();
}

TEST_F(ServerTest, BadServerOptionsAreNamed) {
  testing::TempDir other;
  ServerOptions options;
  options.data_dir = other.path();
  options.listen = "127.0.0.1:0";
  options.backend = "tpu";
  absl::Status st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--backend"), absl::string_view::npos);
  options.backend = "cpu";
  options.listen = "no-port";
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--listen"), absl::string_view::npos);
  options.listen = "127.0.0.1:0";
  options.device_memory_bytes = -1;
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--device_memory"), absl::string_view::npos);
  options.device_memory_bytes = 0;
  options.max_log_bytes = 4096;
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--max_log_bytes"), absl::string_view::npos);
  options.max_log_bytes = int64_t{256} << 20;
  options.step_spin_us = -2;
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--step_spin_us"), absl::string_view::npos);
  options.step_spin_us = -1;
  options.inline_steps = -2;
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--inline_steps"), absl::string_view::npos);
  options.inline_steps = -1;
  options.device_spill_ring_tokens = -16;
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--device_spill_ring_tokens"),
            absl::string_view::npos);
  options.device_spill_ring_tokens = 0;
  // Asked for by name, the CUDA backend needs a device: on a machine
  // without one the start is refused, naming the backend.
  if (cuda::ProbeDevices().device_count == 0) {
    options.backend = "cuda";
    st = StartServer(options).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(st.message().find("--backend=cuda"), absl::string_view::npos);
    options.backend = "cpu";
  }
  // The port the running server holds cannot be bound twice.
  options.listen = server_->address();
  st = StartServer(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
}

// Locks taken in both orders (never at once, so no deadlock) are a
// "potential deadlock" to Abseil's detector, which aborts where it is
// compiled in (Debian's Abseil); a serving process turns it off.
TEST(ServingProcessTest, AbseilDeadlockDetectionIsOff) {
  ConfigureServingProcess();
  absl::Mutex a, b;
  {
    absl::MutexLock first(&a);
    absl::MutexLock second(&b);
  }
  {
    absl::MutexLock first(&b);
    absl::MutexLock second(&a);  // aborts with the detector on
  }
  SUCCEED() << "no abort: the detector is off";
}

// Freed blocks stay in the heap, ready for the next step, instead of going
// back to the kernel (whose fresh pages the next step would fault in).
TEST(ServingProcessTest, MallocKeepsFreedMemoryForTheNextStep) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' allocators do not take glibc's mallopt";
#else
  ConfigureServingProcess();
  // Below the mmap threshold, so from the heap; freed, the heap's top
  // keeps it (glibc's defaults would unmap it, or trim it past 128 KiB).
  constexpr size_t kBlock = size_t(kServingMmapThreshold) / 8;
  std::vector<char*> blocks;
  for (int i = 0; i < 4; ++i) {
    blocks.push_back(static_cast<char*>(std::malloc(kBlock)));
    ASSERT_NE(blocks.back(), nullptr);
    std::memset(blocks.back(), 1, kBlock);
  }
  const struct mallinfo2 before = mallinfo2();
  for (char* b : blocks) std::free(b);
  const struct mallinfo2 after = mallinfo2();
  EXPECT_EQ(after.hblkhd, before.hblkhd) << "the blocks were mmapped";
  EXPECT_GE(after.fordblks, before.fordblks + 3 * kBlock)
      << "freed memory went back to the kernel";
#endif
}

}  // namespace
}  // namespace kvmem
