// A real kvmem server (StartServer, CPU backend) on 127.0.0.1:0 with a
// fresh RocksDB directory, a kvmem::Client connected to it, and random
// tensors to step with.
#ifndef KVMEM_TESTS_CLIENT_SERVER_FIXTURE_H_
#define KVMEM_TESTS_CLIENT_SERVER_FIXTURE_H_

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/cpp/kvmem_client.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/temp_dir.h"

namespace kvmem::testing {

using Bytes = std::vector<uint8_t>;

inline bool Contains(absl::string_view text, absl::string_view part) {
  return text.find(part) != absl::string_view::npos;
}

// `count` fp32 values of N(0, 1), never all zero.
inline Bytes RandomFp32(size_t count, std::mt19937* rng) {
  std::normal_distribution<float> normal;
  Bytes bytes(count * 4);
  for (size_t i = 0; i < count; ++i) {
    const float x = normal(*rng);
    std::memcpy(bytes.data() + i * 4, &x, 4);
  }
  return bytes;
}

// q, k and v of `num_tokens` tokens for an fp32 session.
struct Tokens {
  Bytes q, k, v;
};
inline Tokens RandomTokens(const Session& s, int num_tokens,
                           std::mt19937* rng) {
  return {RandomFp32(s.q_bytes(num_tokens) / 4, rng),
          RandomFp32(s.kv_bytes(num_tokens) / 4, rng),
          RandomFp32(s.kv_bytes(num_tokens) / 4, rng)};
}

class ServerFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.data_dir = dir_.path() + "/data";
    options.backend = "cpu";
    absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client_ = Connect();
    ASSERT_NE(client_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(absl::Seconds(5));
  }

  // A client of the server as `tenant` ("" sends none), or null.
  std::unique_ptr<Client> Connect(const std::string& tenant = "") {
    ClientOptions options;
    options.address = server_->address();
    options.tenant = tenant;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  // A small fp32 session whose budget covers every token it will see:
  // L layers, H 2, Hq 4, D 64; 4 sinks and one window of 64, so nothing
  // leaves the resident set before 68 tokens.
  static SessionSpec SmallFp32(const std::string& id, int layers = 2) {
    SessionSpec spec;
    spec.session_id = id;
    spec.shape.set_layers(layers);
    spec.shape.set_kv_heads(2);
    spec.shape.set_query_heads(4);
    spec.shape.set_head_dim(64);
    spec.shape.set_dtype(v1::DTYPE_FP32);
    spec.policy.set_sinks(4);
    spec.policy.set_cascades(1);
    spec.policy.set_window(64);
    spec.policy.set_page_tokens(8);
    return spec;
  }

  TempDir dir_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;  // destroyed before the server
};

}  // namespace kvmem::testing

#endif  // KVMEM_TESTS_CLIENT_SERVER_FIXTURE_H_
