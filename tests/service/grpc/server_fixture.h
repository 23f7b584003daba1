// The server fixture of the gRPC integration tests: the real server
// (StartServer) on 127.0.0.1:0 with a real RocksDB in a temp dir, called
// through the generated stub.
#ifndef KVMEM_TESTS_SERVICE_GRPC_SERVER_FIXTURE_H_
#define KVMEM_TESTS_SERVICE_GRPC_SERVER_FIXTURE_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/server.h"
#include "tests/temp_dir.h"

namespace kvmem {

// A valid CreateSession request: 32 layers, 8 KV / 32 query heads × 128.
inline v1::CreateSessionRequest ValidRequest(const std::string& id) {
  v1::CreateSessionRequest r;
  r.set_session_id(id);
  v1::ModelShape* s = r.mutable_shape();
  s->set_layers(32);
  s->set_kv_heads(8);
  s->set_query_heads(32);
  s->set_head_dim(128);
  s->set_dtype(v1::DTYPE_BF16);
  return r;
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    Start();
  }
  void TearDown() override {
    if (server_) server_->Shutdown(absl::Seconds(5));
  }

  void Start() {
    ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.data_dir = dir_.path();
    options.backend = "cpu";
    if (tweak_) tweak_(&options);
    absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
    channel_ = grpc::CreateChannel(server_->address(),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::KvMemory::NewStub(channel_);
  }

  void Restart() {
    server_->Shutdown(absl::Seconds(5));
    server_.reset();
    Start();
  }

  // A context for `tenant` ("" sends no tenant metadata).
  static std::unique_ptr<grpc::ClientContext> Context(
      const std::string& tenant = "") {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!tenant.empty()) context->AddMetadata("kvmem-tenant", tenant);
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::seconds(30));
    return context;
  }

  grpc::Status Create(const v1::CreateSessionRequest& request, v1::Session* out,
                      const std::string& tenant = "") {
    return stub_->CreateSession(Context(tenant).get(), request, out);
  }
  grpc::Status Get(const std::string& id, v1::Session* out,
                   const std::string& tenant = "") {
    v1::GetSessionRequest r;
    r.set_session_id(id);
    return stub_->GetSession(Context(tenant).get(), r, out);
  }
  std::vector<std::string> ListIds(const std::string& tenant = "",
                                   int page_size = 0) {
    std::vector<std::string> ids;
    v1::ListSessionsRequest r;
    r.set_page_size(page_size);
    do {
      v1::ListSessionsResponse page;
      grpc::Status st = stub_->ListSessions(Context(tenant).get(), r, &page);
      EXPECT_TRUE(st.ok()) << st.error_message();
      if (!st.ok()) break;
      for (const v1::Session& s : page.sessions())
        ids.push_back(s.session_id());
      r.set_page_token(page.next_page_token());
    } while (!r.page_token().empty());
    return ids;
  }

  testing::TempDir dir_;
  std::function<void(ServerOptions*)> tweak_;  // applied by Start()
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvMemory::Stub> stub_;
};

}  // namespace kvmem

#endif  // KVMEM_TESTS_SERVICE_GRPC_SERVER_FIXTURE_H_
