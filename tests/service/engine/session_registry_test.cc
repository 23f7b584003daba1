#include "service/engine/session_registry.h"

#include <atomic>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

SessionConfig Config(const std::string& tenant, const std::string& id) {
  SessionConfig c;
  c.tenant = tenant;
  c.session_id = id;
  c.shape.layers = 4;
  c.shape.kv_heads = 2;
  c.shape.query_heads = 8;
  c.shape.head_dim = 64;
  c.shape.dtype = DType::kBf16;
  return c;
}

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    Reopen();
  }
  void Reopen() {
    registry_.reset();
    store_.reset();
    absl::StatusOr<std::unique_ptr<storage::Store>> store =
        storage::Store::Open(storage::Store::Options(), dir_.path());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    absl::StatusOr<std::unique_ptr<SessionRegistry>> registry =
        SessionRegistry::Open(SessionRegistry::Options(), store_.get());
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = std::move(*registry);
  }

  testing::TempDir dir_;
  std::unique_ptr<storage::Store> store_;
  std::unique_ptr<SessionRegistry> registry_;
};

TEST_F(RegistryTest, CreateGetDeleteAndReopen) {
  absl::StatusOr<SessionInfo> a = registry_->Create(Config("t1", "alpha"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->manifest.layer_next_positions, std::vector<int64_t>(4, 0));
  absl::StatusOr<SessionInfo> generated = registry_->Create(Config("t1", ""));
  ASSERT_TRUE(generated.ok());
  const std::string gen_id = generated->manifest.config.session_id;
  EXPECT_EQ(gen_id.size(), 34u) << gen_id;
  EXPECT_EQ(registry_->Create(Config("t1", "alpha")).status().code(),
            absl::StatusCode::kAlreadyExists);
  // Another tenant may use the same id, and cannot see t1's.
  ASSERT_TRUE(registry_->Create(Config("t2", "alpha")).ok());
  EXPECT_EQ(registry_->SessionCount(), 3);

  Reopen();
  absl::StatusOr<SessionInfo> again = registry_->Get("t1", "alpha");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->manifest.seq, a->manifest.seq);
  EXPECT_EQ(again->manifest.config.shape.query_heads, 8);
  EXPECT_TRUE(registry_->Get("t1", gen_id).ok());
  EXPECT_EQ(registry_->SessionCount(), 3);

  ASSERT_TRUE(registry_->Delete("t1", "alpha").ok());
  EXPECT_EQ(registry_->Get("t1", "alpha").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(registry_->Delete("t1", "alpha").code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(registry_->Get("t2", "alpha").ok());
  Reopen();
  EXPECT_EQ(registry_->Get("t1", "alpha").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(registry_->SessionCount(), 2);
  // A new session never reuses a deleted one's storage number.
  absl::StatusOr<SessionInfo> later = registry_->Create(Config("t1", "alpha"));
  ASSERT_TRUE(later.ok());
  EXPECT_GT(later->manifest.seq, a->manifest.seq);
}

TEST_F(RegistryTest, ListPagesThroughEverySessionOnce) {
  for (int i = 0; i < 25; ++i) {
    SessionConfig c = Config("t", absl::StrCat("s", 100 + i));
    c.labels["parity"] = i % 2 ? "odd" : "even";
    ASSERT_TRUE(registry_->Create(c).ok());
  }
  ASSERT_TRUE(registry_->Create(Config("other", "s100")).ok());
  std::vector<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    absl::StatusOr<SessionRegistry::ListPage> page =
        registry_->List("t", 10, token, {});
    ASSERT_TRUE(page.ok()) << page.status();
    for (const SessionInfo& s : page->sessions) {
      seen.push_back(s.manifest.config.session_id);
    }
    token = page->next_page_token;
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 3);
  ASSERT_EQ(seen.size(), 25u);
  for (int i = 0; i < 25; ++i) EXPECT_EQ(seen[i], absl::StrCat("s", 100 + i));

  absl::StatusOr<SessionRegistry::ListPage> odd =
      registry_->List("t", 0, "", {{"parity", "odd"}});
  ASSERT_TRUE(odd.ok());
  EXPECT_EQ(odd->sessions.size(), 12u);
  EXPECT_TRUE(odd->next_page_token.empty());

  EXPECT_EQ(registry_->List("t", 1001, "", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry_->List("t", 10, "garbage", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RegistryTest, ConcurrentCreatesOfOneIdLetExactlyOneWin) {
  std::atomic<int> won{0}, exists{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      absl::StatusOr<SessionInfo> r = registry_->Create(Config("t", "race"));
      if (r.ok()) ++won;
      if (r.status().code() == absl::StatusCode::kAlreadyExists) ++exists;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(exists.load(), 7);
  EXPECT_EQ(registry_->SessionCount(), 1);
}

TEST_F(RegistryTest, RejectedCreateChangesNothing) {
  SessionConfig bad = Config("t", "bad");
  bad.shape.head_dim = 96;
  absl::Status st = registry_->Create(bad).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("shape.head_dim"), absl::string_view::npos);
  EXPECT_EQ(registry_->SessionCount(), 0);
  Reopen();
  EXPECT_EQ(registry_->SessionCount(), 0);
  EXPECT_EQ(registry_->Create(Config("bad tenant!", "x")).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem
