// Every status code that kvmem_client.h, session.h and step_stream.h
// promise, from a real server on 127.0.0.1:0 (server_fixture.h) or, for
// DEADLINE_EXCEEDED, from a listener that never answers.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/kvmem_client.h"
#include "gtest/gtest.h"
#include "tests/client/server_fixture.h"

namespace kvmem {
namespace {

using ::kvmem::testing::Bytes;
using ::kvmem::testing::Contains;
using ::kvmem::testing::RandomTokens;
using ::kvmem::testing::ServerFixture;
using ::kvmem::testing::Tokens;

// A TCP listener that never answers: the kernel completes connections to
// it, but no HTTP/2 settings ever come, so no call to it can finish before
// its deadline.
class SilentListener {
 public:
  SilentListener() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof(address);
    if (fd_ < 0 ||
        bind(fd_, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
        listen(fd_, 16) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      return;
    }
    port_ = ntohs(address.sin_port);
  }
  ~SilentListener() {
    if (fd_ >= 0) close(fd_);
  }
  int port() const { return port_; }  // 0 if the socket could not listen

 private:
  int fd_ = -1;
  int port_ = 0;
};

using ErrorTest = ServerFixture;

TEST_F(ErrorTest, NotFound) {
  EXPECT_EQ(client_->GetSession("ghost").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->OpenSession("ghost").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->DeleteSession("ghost").code(),
            absl::StatusCode::kNotFound);
  StepEntryView entry;
  entry.session_id = "ghost";
  Bytes q(4 * 64 * 4, 1), kv(2 * 64 * 4, 1);
  entry.q = q;
  entry.k = kv;
  entry.v = kv;
  absl::Status st =
      client_->Step(0, v1::STEP_MODE_ATTEND, {&entry, 1}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(st.message(), "ghost")) << st;
  // Another tenant's session is not found either.
  ASSERT_TRUE(client_->CreateSession(SmallFp32("mine")).ok());
  std::unique_ptr<Client> other = Connect("tenant-b");
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->GetSession("mine").status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<std::vector<v1::Session>> listed = other->ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
}

TEST_F(ErrorTest, InvalidArgumentNamesTheField) {
  SessionSpec spec = SmallFp32("bad");
  spec.shape.set_head_dim(96);
  absl::Status st = client_->CreateSession(spec).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "shape.head_dim")) << st;
  EXPECT_EQ(client_->GetSession("bad").status().code(),
            absl::StatusCode::kNotFound);  // nothing was created

  absl::StatusOr<std::unique_ptr<Session>> s =
      client_->CreateSession(SmallFp32("s"));
  ASSERT_TRUE(s.ok());
  std::mt19937 rng(9);
  Tokens t = RandomTokens(**s, 1, &rng);
  st = (*s)->Step(0, v1::STEP_MODE_ATTEND, t.q,
                  absl::MakeConstSpan(t.k).subspan(1), t.v)
           .status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "entries[0].k")) << st;
  st = (*s)->Step(2, v1::STEP_MODE_ATTEND, t.q, t.k, t.v).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);  // client side
  EXPECT_TRUE(Contains(st.message(), "layer")) << st;
  st = (*s)->Step(0, v1::STEP_MODE_UNSPECIFIED, t.q, t.k, t.v).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "mode")) << st;
  st = client_->GetSession("has space").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "session_id")) << st;
  st = client_->ListSessions({}, 5000).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "page_size")) << st;
  EXPECT_EQ((*s)->next_position(0), 0);
  ASSERT_TRUE((*s)->Refresh().ok());
  EXPECT_EQ((*s)->next_position(0), 0);  // nothing was applied

  // The client's own options.
  ClientOptions options;
  options.tenant = "has space";
  st = Client::Connect(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "tenant")) << st;
  options = ClientOptions();
  options.max_message_bytes = 10;
  st = Client::Connect(options).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "max_message_bytes")) << st;
  options = ClientOptions();
  options.address = "";
  EXPECT_TRUE(Contains(Client::Connect(options).status().message(), "address"));
  options = ClientOptions();
  options.deadline = absl::ZeroDuration();
  EXPECT_TRUE(
      Contains(Client::Connect(options).status().message(), "deadline"));
}

TEST_F(ErrorTest, FailedPreconditionNamesTheExpectedPosition) {
  absl::StatusOr<std::unique_ptr<Session>> s =
      client_->CreateSession(SmallFp32("s"));
  ASSERT_TRUE(s.ok());
  std::mt19937 rng(13);
  Tokens t = RandomTokens(**s, 2, &rng);
  ASSERT_TRUE((*s)->Step(0, v1::STEP_MODE_APPEND, t.q, t.k, t.v, 2).ok());
  // A second handle that has not seen that step sends a repeat.
  absl::StatusOr<std::unique_ptr<Session>> stale = client_->OpenSession("s");
  ASSERT_TRUE(stale.ok());
  Tokens u = RandomTokens(**s, 1, &rng);
  StepEntryView entry = (*stale)->Entry(0, u.q, u.k, u.v);
  entry.position = 0;
  absl::Status st =
      client_->Step(0, v1::STEP_MODE_APPEND, {&entry, 1}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(st.message(), "expected 2")) << st;
  entry.position = 5;  // a gap
  st = client_->Step(0, v1::STEP_MODE_APPEND, {&entry, 1}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(st.message(), "expected 2")) << st;
  EXPECT_TRUE((*stale)->Step(0, v1::STEP_MODE_APPEND, u.q, u.k, u.v).ok());
  // The first handle is now behind; Refresh puts it right. (Other inputs:
  // an identical repeat of the last step would be answered as a retry.)
  Tokens w = RandomTokens(**s, 1, &rng);
  st = (*s)->Step(0, v1::STEP_MODE_APPEND, w.q, w.k, w.v).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(st.message(), "expected 3")) << st;
  ASSERT_TRUE((*s)->Refresh().ok());
  EXPECT_EQ((*s)->next_position(0), 3);
  EXPECT_TRUE((*s)->Step(0, v1::STEP_MODE_APPEND, w.q, w.k, w.v).ok());
}

TEST_F(ErrorTest, AlreadyExists) {
  ASSERT_TRUE(client_->CreateSession(SmallFp32("dup")).ok());
  absl::Status st = client_->CreateSession(SmallFp32("dup", 4)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(Contains(st.message(), "dup")) << st;
  absl::StatusOr<v1::Session> got = client_->GetSession("dup");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->shape().layers(), 2);  // the first one, unchanged
}

TEST_F(ErrorTest, DeadlineExceededAndResourceExhausted) {
  SilentListener silent;
  ASSERT_GT(silent.port(), 0);
  ClientOptions options;
  options.address = absl::StrCat("127.0.0.1:", silent.port());
  options.deadline = absl::Milliseconds(200);
  absl::StatusOr<std::unique_ptr<Client>> hurried = Client::Connect(options);
  ASSERT_TRUE(hurried.ok());
  EXPECT_EQ((*hurried)->GetStats().status().code(),
            absl::StatusCode::kDeadlineExceeded);
  std::unique_ptr<StepStream> stream =
      (*hurried)->OpenStepStream(absl::Milliseconds(200));
  absl::Status st = stream->Step(0, v1::STEP_MODE_ATTEND, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_FALSE(stream->is_open());

  options = ClientOptions();
  options.address = server_->address();
  options.max_message_bytes = 1024;
  absl::StatusOr<std::unique_ptr<Client>> small = Client::Connect(options);
  ASSERT_TRUE(small.ok());
  absl::StatusOr<std::unique_ptr<Session>> s =
      (*small)->CreateSession(SmallFp32("s"));
  ASSERT_TRUE(s.ok()) << s.status();
  std::mt19937 rng(17);
  Tokens t = RandomTokens(**s, 1, &rng);  // 2 KiB of tensors
  st = (*s)->Step(0, v1::STEP_MODE_APPEND, t.q, t.k, t.v).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  ASSERT_TRUE((*s)->Refresh().ok());
  EXPECT_EQ((*s)->next_position(0), 0);  // nothing was sent
}

TEST_F(ErrorTest, UnavailableWhenTheServerIsShutDown) {
  absl::StatusOr<std::unique_ptr<Session>> s =
      client_->CreateSession(SmallFp32("s"));
  ASSERT_TRUE(s.ok());
  std::mt19937 rng(19);
  Tokens t = RandomTokens(**s, 1, &rng);
  std::unique_ptr<StepStream> open = client_->OpenStepStream();
  ASSERT_TRUE(
      (*s)->Step(0, v1::STEP_MODE_ATTEND, t.q, t.k, t.v, 1, open.get()).ok());

  server_->Shutdown(absl::ZeroDuration());
  EXPECT_EQ(client_->GetSession("s").status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(client_->GetStats().status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ((*s)->Step(1, v1::STEP_MODE_ATTEND, t.q, t.k, t.v).status().code(),
            absl::StatusCode::kUnavailable);
  // A stream opened now fails its first call and stays ended.
  std::unique_ptr<StepStream> late = client_->OpenStepStream();
  absl::Status st =
      (*s)->Step(1, v1::STEP_MODE_ATTEND, t.q, t.k, t.v, 1, late.get())
          .status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_FALSE(late->is_open());
  EXPECT_EQ(late->Close().code(), absl::StatusCode::kUnavailable);
  // The stream that was open when the server went away has ended too.
  st = (*s)->Step(1, v1::STEP_MODE_ATTEND, t.q, t.k, t.v, 1, open.get())
           .status();
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(open->is_open());
  EXPECT_EQ(open->Close(), st);
}

}  // namespace
}  // namespace kvmem
