// Step, StepStream, metrics, message size and deadlines over the real
// server (see server_fixture.h).
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <future>

#include "absl/strings/str_cat.h"
#include "grpcpp/generic/generic_stub.h"
#include "service/engine/stream_state.h"
#include "service/grpc/convert.h"
#include "tests/service/grpc/server_fixture.h"

namespace kvmem {
namespace {

// Fills q/k/v of one token with deterministic non-zero fp32 values.
v1::StepEntry Entry(const std::string& id, int64_t position, float salt) {
  v1::StepEntry e;
  e.set_session_id(id);
  e.set_position(position);
  e.set_num_tokens(1);
  auto fill = [&](int n, float scale) {
    std::string bytes(size_t(n) * 4, '\0');
    for (int i = 0; i < n; ++i) {
      float x = scale * std::sin(salt + 0.37f * float(i) + float(position));
      memcpy(&bytes[size_t(i) * 4], &x, 4);
    }
    return bytes;
  };
  e.set_q(fill(4 * 64, 1.0f));
  e.set_k(fill(2 * 64, 0.5f));
  e.set_v(fill(2 * 64, 2.0f));
  return e;
}

v1::CreateSessionRequest SmallFp32(const std::string& id) {
  v1::CreateSessionRequest r;
  r.set_session_id(id);
  v1::ModelShape* s = r.mutable_shape();
  s->set_layers(2);
  s->set_kv_heads(2);
  s->set_query_heads(4);
  s->set_head_dim(64);
  s->set_dtype(v1::DTYPE_FP32);
  r.mutable_policy()->set_sinks(4);
  r.mutable_policy()->set_window(32);
  r.mutable_policy()->set_page_tokens(8);
  return r;
}

TEST_F(ServerTest, StepAndStepStreamAnswerAlike) {
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("unary"), &s).ok());
  ASSERT_TRUE(Create(SmallFp32("stream"), &s).ok());
  auto context = Context();
  auto stream = stub_->StepStream(context.get());
  for (int t = 0; t < 10; ++t) {
    v1::StepRequest unary;
    unary.set_layer(1);
    unary.set_mode(v1::STEP_MODE_ATTEND);
    unary.set_request_id(100 + t);
    *unary.add_entries() = Entry("unary", t, 0.5f);
    v1::StepResponse got;
    grpc::Status st = stub_->Step(Context().get(), unary, &got);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(got.results_size(), 1);
    EXPECT_EQ(got.request_id(), uint64_t(100 + t));
    EXPECT_EQ(got.results(0).next_position(), t + 1);
    EXPECT_EQ(got.results(0).output().size(), 4u * 64 * 4);
    EXPECT_EQ(got.results(0).lse().size(), 4u * 4);

    v1::StepRequest streamed = unary;
    streamed.mutable_entries(0)->set_session_id("stream");
    ASSERT_TRUE(stream->Write(streamed));
    v1::StepStreamResponse reply;
    ASSERT_TRUE(stream->Read(&reply));
    ASSERT_EQ(reply.error_code(), 0) << reply.error_message();
    EXPECT_EQ(reply.request_id(), uint64_t(100 + t));
    // Same inputs, same state: the same bytes.
    EXPECT_EQ(reply.response().results(0).output(), got.results(0).output());
    EXPECT_EQ(reply.response().results(0).lse(), got.results(0).lse());
  }
  // An error answers its request only; the stream goes on.
  v1::StepRequest gap;
  gap.set_layer(1);
  gap.set_mode(v1::STEP_MODE_ATTEND);
  gap.set_request_id(7);
  *gap.add_entries() = Entry("stream", 12, 0.5f);
  ASSERT_TRUE(stream->Write(gap));
  v1::StepStreamResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.error_code(), int(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_NE(reply.error_message().find("expected 10"), std::string::npos)
      << reply.error_message();
  EXPECT_EQ(reply.request_id(), 7u);
  v1::StepRequest fetch;
  fetch.set_layer(1);
  fetch.set_mode(v1::STEP_MODE_FETCH);
  *fetch.add_entries() = Entry("stream", 10, 0.5f);
  ASSERT_TRUE(stream->Write(fetch));
  ASSERT_TRUE(stream->Read(&reply));
  ASSERT_EQ(reply.error_code(), 0) << reply.error_message();
  ASSERT_EQ(reply.response().results(0).heads_size(), 2);
  EXPECT_EQ(reply.response().results(0).heads(0).positions_size(), 11);
  ASSERT_TRUE(stream->WritesDone());
  EXPECT_TRUE(stream->Finish().ok());

  v1::Session described;
  ASSERT_TRUE(Get("stream", &described).ok());
  EXPECT_EQ(described.layer_next_positions(1), 11);
  EXPECT_EQ(described.position(), 0);  // layer 0 has not stepped
  EXPECT_EQ(described.resident_tokens(), 2 * 11);
  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub_->GetStats(Context().get(), {}, &stats).ok());
  EXPECT_EQ(stats.steps(), 21);
  // Where those steps' time went: every phase is reported, the CPU
  // backend's work is in plan and apply, and nothing in the device ones.
  const auto& phases = stats.step_phase_seconds();
  for (const char* phase :
       {"lock", "plan", "recall", "device", "apply", "device_write", "write",
        "device_rows", "device_wait", "device_spill", "sessions", "queue",
        "convert"}) {
    ASSERT_EQ(phases.count(phase), 1u) << phase;
    EXPECT_GE(phases.at(phase), 0.0) << phase;
  }
  EXPECT_GT(phases.at("plan"), 0.0);
  EXPECT_GT(phases.at("apply"), 0.0);
  // The RPC layer's own share: the hand-off to a worker, the messages.
  EXPECT_GT(phases.at("sessions"), 0.0);
  EXPECT_GT(phases.at("queue"), 0.0);
  EXPECT_GT(phases.at("convert"), 0.0);
  EXPECT_EQ(phases.at("device"), 0.0);
  EXPECT_EQ(phases.at("device_rows"), 0.0);
  EXPECT_EQ(phases.at("device_wait"), 0.0);
  EXPECT_EQ(phases.at("device_spill"), 0.0);
  EXPECT_EQ(stats.device_pool_bytes(), 0);
  EXPECT_EQ(stats.hibernations(), 0);
}

// Over gRPC, under a --memory_limit_bytes that holds one session's layer:
// alternating steps of two sessions each hibernate the other, and every
// answer equals that of a server without a limit.
TEST_F(ServerTest, PastTheMemoryLimitIdleSessionsHibernateAndAnswerAlike) {
  SessionConfig config;
  ASSERT_TRUE(SessionConfigFromProto(SmallFp32("x"), "default", &config).ok());
  const int64_t fixed =
      StreamState::FixedBytes(*StreamConfig::FromSession(config));
  const int heads = config.shape.kv_heads;
  tweak_ = [=](ServerOptions* o) {
    o->memory_limit_bytes = 3 * heads * fixed / 2;
  };
  Restart();
  testing::TempDir free_dir;
  ServerOptions free_options;
  free_options.listen = "127.0.0.1:0";
  free_options.data_dir = free_dir.path();
  free_options.backend = "cpu";
  absl::StatusOr<std::unique_ptr<Server>> free = StartServer(free_options);
  ASSERT_TRUE(free.ok()) << free.status();
  auto free_stub = v1::KvMemory::NewStub(grpc::CreateChannel(
      (*free)->address(), grpc::InsecureChannelCredentials()));
  for (const char* id : {"a", "b"}) {
    v1::Session s;
    ASSERT_TRUE(Create(SmallFp32(id), &s).ok());
    grpc::ClientContext context;
    ASSERT_TRUE(free_stub->CreateSession(&context, SmallFp32(id), &s).ok());
  }
  for (int t = 0; t < 40; ++t) {
    for (const char* id : {"a", "b"}) {
      v1::StepRequest r;
      r.set_layer(0);
      r.set_mode(v1::STEP_MODE_ATTEND);
      *r.add_entries() = Entry(id, t, id[0] == 'a' ? 0.25f : 0.75f);
      v1::StepResponse got, want;
      grpc::Status st = stub_->Step(Context().get(), r, &got);
      ASSERT_TRUE(st.ok()) << id << " at " << t << ": " << st.error_message();
      grpc::ClientContext context;
      ASSERT_TRUE(free_stub->Step(&context, r, &want).ok());
      ASSERT_EQ(got.results(0).output(), want.results(0).output())
          << id << " at " << t;
    }
  }
  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub_->GetStats(Context().get(), {}, &stats).ok());
  EXPECT_GE(stats.hibernations(), 2 * 40 - 2);
  // Both at once cannot fit, whatever is hibernated.
  v1::StepRequest both;
  both.set_layer(0);
  both.set_mode(v1::STEP_MODE_ATTEND);
  *both.add_entries() = Entry("a", 40, 0.25f);
  *both.add_entries() = Entry("b", 40, 0.75f);
  v1::StepResponse got;
  grpc::Status st = stub_->Step(Context().get(), both, &got);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("memory limit"), std::string::npos)
      << st.error_message();
  (*free)->Shutdown(absl::Seconds(5));
}

TEST_F(ServerTest, StepErrorsCarryTheirCodes) {
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("e"), &s).ok());
  v1::StepRequest r;
  r.set_layer(0);
  v1::StepResponse got;
  *r.add_entries() = Entry("e", 0, 1.0f);
  grpc::Status st = stub_->Step(Context().get(), r, &got);  // no mode
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("mode"), std::string::npos);
  r.set_mode(v1::STEP_MODE_APPEND);
  r.mutable_entries(0)->set_session_id("missing");
  EXPECT_EQ(stub_->Step(Context().get(), r, &got).error_code(),
            grpc::StatusCode::NOT_FOUND);
  r.mutable_entries(0)->set_session_id("e");
  r.mutable_entries(0)->mutable_k()->pop_back();
  st = stub_->Step(Context().get(), r, &got);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("entries[0].k"), std::string::npos);
  // APPEND without q stores the token.
  *r.mutable_entries(0) = Entry("e", 0, 1.0f);
  r.mutable_entries(0)->clear_q();
  st = stub_->Step(Context().get(), r, &got);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(got.results(0).next_position(), 1);
  EXPECT_TRUE(got.results(0).output().empty());
}

// Step is a raw method (its reply written by StepResponseWire): bytes that
// are no StepRequest get INVALID_ARGUMENT and change nothing.
TEST_F(ServerTest, StepBytesThatAreNoRequestAreInvalidArgument) {
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("raw"), &s).ok());
  grpc::GenericStub generic(channel_);
  // Field 3 (entries) claims 100 bytes and ends after 2: malformed.
  const std::string junk = std::string("\x1a\x64\x0a\x01", 4);
  grpc::Slice slice(junk);
  grpc::ByteBuffer in(&slice, 1), out;
  std::promise<grpc::Status> done;
  auto context = Context();
  generic.UnaryCall(context.get(), "/kvmem.v1.KvMemory/Step",
                    grpc::StubOptions(), &in, &out,
                    [&](grpc::Status st) { done.set_value(st); });
  const grpc::Status st = done.get_future().get();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("StepRequest"), std::string::npos)
      << st.error_message();
  v1::Session after;
  ASSERT_TRUE(Get("raw", &after).ok());
  EXPECT_EQ(after.position(), 0);
  EXPECT_EQ(after.resident_tokens(), 0);
  // A well-formed request on the same server is answered as usual.
  v1::StepRequest r;
  r.set_layer(0);
  r.set_mode(v1::STEP_MODE_ATTEND);
  r.set_request_id(41);
  *r.add_entries() = Entry("raw", 0, 2.0f);
  v1::StepResponse got;
  grpc::Status ok = stub_->Step(Context().get(), r, &got);
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(got.request_id(), 41u);
  EXPECT_EQ(got.results(0).next_position(), 1);
  EXPECT_EQ(got.results(0).output().size(), size_t(4) * 64 * 4);
}

// StepStream is raw too: bytes that are no StepRequest are answered with
// INVALID_ARGUMENT in the reply, and the stream goes on.
TEST_F(ServerTest, StepStreamAnswersBytesThatAreNoRequestAndGoesOn) {
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("rawstream"), &s).ok());
  grpc::CompletionQueue cq;
  grpc::GenericStub generic(channel_);
  auto context = Context();
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      generic.PrepareCall(context.get(), "/kvmem.v1.KvMemory/StepStream", &cq);
  // Each operation in turn: start it, then wait for its tag.
  auto wait = [&](intptr_t tag) {
    void* got = nullptr;
    bool ok = false;
    ASSERT_TRUE(cq.Next(&got, &ok));
    EXPECT_EQ(got, reinterpret_cast<void*>(tag));
    EXPECT_TRUE(ok) << tag;
  };
  auto exchange = [&](const std::string& bytes, v1::StepStreamResponse* out) {
    grpc::Slice slice(bytes);
    grpc::ByteBuffer in(&slice, 1), reply;
    call->Write(in, reinterpret_cast<void*>(2));
    wait(2);
    call->Read(&reply, reinterpret_cast<void*>(3));
    wait(3);
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(reply.Dump(&slices).ok());
    std::string flat;
    for (const grpc::Slice& piece : slices) {
      flat.append(reinterpret_cast<const char*>(piece.begin()), piece.size());
    }
    ASSERT_TRUE(out->ParseFromString(flat));
  };
  call->StartCall(reinterpret_cast<void*>(1));
  wait(1);
  v1::StepStreamResponse error;
  exchange(std::string("\x1a\x64\x0a\x01", 4), &error);
  EXPECT_EQ(error.error_code(), int(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(error.error_message().find("StepRequest"), std::string::npos);
  EXPECT_FALSE(error.has_response());

  v1::StepRequest r;
  r.set_layer(0);
  r.set_mode(v1::STEP_MODE_ATTEND);
  r.set_request_id(9);
  *r.add_entries() = Entry("rawstream", 0, 3.0f);
  v1::StepStreamResponse answer;
  exchange(r.SerializeAsString(), &answer);
  EXPECT_EQ(answer.error_code(), 0) << answer.error_message();
  EXPECT_EQ(answer.request_id(), 9u);
  ASSERT_EQ(answer.response().results_size(), 1);
  EXPECT_EQ(answer.response().request_id(), 9u);
  EXPECT_EQ(answer.response().results(0).next_position(), 1);
  EXPECT_EQ(answer.response().results(0).output().size(), size_t(4) * 64 * 4);

  call->WritesDone(reinterpret_cast<void*>(4));
  wait(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  wait(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

}  // namespace
}  // namespace kvmem

namespace kvmem {
namespace {

// GET `path` from 127.0.0.1:`port` over a plain socket; the whole reply.
std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  std::string request = "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n";
  (void)!write(fd, request.data(), request.size());
  std::string reply;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) reply.append(buf, size_t(n));
  close(fd);
  return reply;
}

TEST_F(ServerTest, MetricsCountStepsAndLatency) {
  tweak_ = [](ServerOptions* o) { o->metrics_listen = "127.0.0.1:0"; };
  Restart();
  ASSERT_GT(server_->metrics_port(), 0);
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("m"), &s).ok());
  for (int t = 0; t < 3; ++t) {
    v1::StepRequest r;
    r.set_layer(0);
    r.set_mode(v1::STEP_MODE_ATTEND);
    *r.add_entries() = Entry("m", t, 1.0f);
    v1::StepResponse got;
    ASSERT_TRUE(stub_->Step(Context().get(), r, &got).ok());
  }
  v1::StepRequest bad;
  bad.set_layer(0);
  bad.set_mode(v1::STEP_MODE_APPEND);
  *bad.add_entries() = Entry("m", 7, 1.0f);
  v1::StepResponse got;
  EXPECT_EQ(stub_->Step(Context().get(), bad, &got).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  std::string page = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(page.find("HTTP/1.1 200 OK"), std::string::npos) << page;
  EXPECT_NE(page.find("kvmem_step_requests_total{mode=\"attend\"} 3"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("kvmem_step_tokens_total{mode=\"attend\"} 3"),
            std::string::npos);
  EXPECT_NE(
      page.find("kvmem_step_results_total{code=\"FAILED_PRECONDITION\"} 1"),
      std::string::npos);
  EXPECT_NE(page.find("kvmem_step_latency_seconds_count 4"), std::string::npos);
  EXPECT_NE(page.find("kvmem_step_phase_seconds_total{phase=\"apply\"} "),
            std::string::npos);
  EXPECT_NE(page.find("kvmem_hibernations 0"), std::string::npos);
  EXPECT_NE(page.find("kvmem_sessions 1"), std::string::npos);
  EXPECT_NE(HttpGet(server_->metrics_port(), "/other").find("404"),
            std::string::npos);
}

TEST_F(ServerTest, OverLargeRequestIsResourceExhaustedNamingTheLimit) {
  tweak_ = [](ServerOptions* o) { o->max_message_bytes = 64 << 10; };
  Restart();
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("big"), &s).ok());
  v1::StepRequest r;
  r.set_layer(0);
  r.set_mode(v1::STEP_MODE_APPEND);
  *r.add_entries() = Entry("big", 0, 1.0f);
  r.mutable_entries(0)->set_q(std::string(100 << 10, 'x'));
  v1::StepResponse got;
  grpc::Status st = stub_->Step(Context().get(), r, &got);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("65536"), std::string::npos)
      << st.error_message();
  // Nothing was applied: position 0 is still expected.
  *r.mutable_entries(0) = Entry("big", 0, 1.0f);
  ASSERT_TRUE(stub_->Step(Context().get(), r, &got).ok());
  EXPECT_EQ(got.results(0).next_position(), 1);
}

TEST_F(ServerTest, ExpiredDeadlineAppliesNothing) {
  v1::Session s;
  ASSERT_TRUE(Create(SmallFp32("late"), &s).ok());
  v1::StepRequest r;
  r.set_layer(0);
  r.set_mode(v1::STEP_MODE_ATTEND);
  *r.add_entries() = Entry("late", 0, 1.0f);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() -
                       std::chrono::seconds(1));
  v1::StepResponse got;
  EXPECT_EQ(stub_->Step(&context, r, &got).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_TRUE(stub_->Step(Context().get(), r, &got).ok());
  EXPECT_EQ(got.results(0).next_position(), 1);
}

}  // namespace
}  // namespace kvmem
