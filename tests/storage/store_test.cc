#include "storage/store.h"

#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "storage/keys.h"
#include "tests/temp_dir.h"

namespace kvmem::storage {
namespace {

std::unique_ptr<Store> OpenOrDie(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Store>> store =
      Store::Open(Store::Options(), dir);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? std::move(*store) : nullptr;
}

std::vector<std::pair<uint64_t, std::string>> AllManifests(Store* store) {
  std::vector<std::pair<uint64_t, std::string>> all;
  absl::Status st =
      store->ForEachManifest([&](uint64_t seq, absl::string_view body) {
        all.emplace_back(seq, std::string(body));
        return absl::OkStatus();
      });
  EXPECT_TRUE(st.ok()) << st;
  return all;
}

TEST(Store, ManifestsPersistAcrossReopen) {
  testing::TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  uint64_t a = 0, b = 0;
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    absl::StatusOr<uint64_t> sa = store->NewSessionSeq();
    absl::StatusOr<uint64_t> sb = store->NewSessionSeq();
    ASSERT_TRUE(sa.ok() && sb.ok());
    a = *sa;
    b = *sb;
    EXPECT_LT(a, b);
    ASSERT_TRUE(store->PutManifest(b, "second", /*sync=*/true).ok());
    ASSERT_TRUE(store->PutManifest(a, std::string("fir\0st", 6), true).ok());
  }
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<std::pair<uint64_t, std::string>> all = AllManifests(store.get());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], std::make_pair(a, std::string("fir\0st", 6)));  // seq order
  EXPECT_EQ(all[1], std::make_pair(b, std::string("second")));
  absl::StatusOr<std::string> got = store->GetManifest(b);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, "second");
  // Sequence numbers are never handed out twice, even after a reopen.
  absl::StatusOr<uint64_t> c = store->NewSessionSeq();
  ASSERT_TRUE(c.ok());
  EXPECT_GT(*c, b);
}

TEST(Store, MissingManifestIsNotFound) {
  testing::TempDir dir;
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->GetManifest(42).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(Store, DeleteSessionRemovesOnlyThatSession) {
  testing::TempDir dir;
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  for (uint64_t seq : {7, 8, 9}) {
    ASSERT_TRUE(store->PutManifest(seq, "m", true).ok());
  }
  ASSERT_TRUE(store->DeleteSession(8, true).ok());
  std::vector<std::pair<uint64_t, std::string>> all = AllManifests(store.get());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 7u);
  EXPECT_EQ(all[1].first, 9u);
  EXPECT_EQ(store->GetManifest(8).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->DeleteSession(1234, true).ok());  // absent: OK
}

TEST(Store, CorruptedManifestIsDataLoss) {
  testing::TempDir dir;
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutManifest(5, "manifest body", true).ok());
  }
  {
    // Flip one byte of the stored value behind the store's back.
    rocksdb::DBOptions options;
    std::vector<rocksdb::ColumnFamilyDescriptor> families;
    std::vector<std::string> names;
    ASSERT_TRUE(
        rocksdb::DB::ListColumnFamilies(options, dir.path(), &names).ok());
    for (const std::string& name : names)
      families.emplace_back(name, rocksdb::ColumnFamilyOptions());
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(
        rocksdb::DB::Open(options, dir.path(), families, &handles, &db).ok());
    rocksdb::ColumnFamilyHandle* manifests = nullptr;
    for (rocksdb::ColumnFamilyHandle* h : handles) {
      if (h->GetName() == "manifests") manifests = h;
    }
    ASSERT_NE(manifests, nullptr);
    std::string value;
    ASSERT_TRUE(
        db->Get(rocksdb::ReadOptions(), manifests, SessionKey(5), &value).ok());
    value[value.size() - 1] ^= 0x10;
    ASSERT_TRUE(
        db->Put(rocksdb::WriteOptions(), manifests, SessionKey(5), value).ok());
    for (rocksdb::ColumnFamilyHandle* h : handles) {
      ASSERT_TRUE(db->DestroyColumnFamilyHandle(h).ok());
    }
    delete db;
  }
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::string> got = store->GetManifest(5);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  absl::Status scan = store->ForEachManifest(
      [](uint64_t, absl::string_view) { return absl::OkStatus(); });
  EXPECT_EQ(scan.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(scan.message().find("session #5"), absl::string_view::npos) << scan;
}

TEST(Store, SecondOpenOfTheSameDirectoryIsUnavailable) {
  testing::TempDir dir;
  std::unique_ptr<Store> first = OpenOrDie(dir.path());
  ASSERT_NE(first, nullptr);
  absl::StatusOr<std::unique_ptr<Store>> second =
      Store::Open(Store::Options(), dir.path());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable)
      << second.status();
}

TEST(Store, BadOptionsNameTheField) {
  Store::Options options;
  options.page_block_bytes = 100;
  absl::Status st = options.Validate();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("page_block_bytes"), absl::string_view::npos);
}

TEST(Keys, OneStreamsPagesAreOneOrderedRange) {
  // Bytewise order equals (session, layer, head, page) numeric order.
  EXPECT_LT(PageKey(1, 0, 0, 255), PageKey(1, 0, 0, 256));
  EXPECT_LT(PageKey(1, 0, 1, 0), PageKey(1, 1, 0, 0));
  EXPECT_LT(PageKey(1, 7, 7, ~uint64_t{0}), SessionKey(2));
  EXPECT_GE(PageKey(1, 0, 0, 0), SessionKey(1));
}

}  // namespace
}  // namespace kvmem::storage

namespace kvmem::storage {
namespace {

TEST(Store, DeletedSessionsSpaceIsReclaimed) {
  testing::TempDir dir;
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  // 2 MiB of incompressible pages (256 pages of 8 KiB): 15/16 of them for
  // session 3, the rest for session 4.
  std::mt19937 rng(1);
  for (int batch = 0; batch < 16; ++batch) {
    SpillBatch spill;
    for (int p = 0; p < 16; ++p) {
      auto page = std::make_shared<SpillPage>();
      page->row_bytes = 256;
      for (int t = 0; t < 16; ++t) page->positions.push_back(t);
      page->keys.resize(16 * 256);
      page->values.resize(16 * 256);
      for (char& c : page->keys) c = char(rng());
      for (char& c : page->values) c = char(rng());
      page->digest.assign(4, 1.0f);
      spill.pages.push_back(
          {PageId{batch < 15 ? 3u : 4u, 0, 0, uint64_t(batch * 16 + p)}, page});
    }
    ASSERT_TRUE(store->WriteSpill(spill, false).ok());
  }
  const uint64_t before = store->Stats().live_bytes;
  EXPECT_GT(before, uint64_t{1} << 20);
  ASSERT_TRUE(store->DeleteSession(3, true).ok());
  const uint64_t after = store->Stats().live_bytes;
  EXPECT_LT(after, before / 4) << before << " -> " << after;
  // Session 4 is untouched.
  absl::StatusOr<Store::SpillCounts> counts = store->CountSpilled(4);
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ(counts->pages, 16u);
  EXPECT_GE(store->Stats().bytes_written, uint64_t{2} << 20);
}

}  // namespace
}  // namespace kvmem::storage
