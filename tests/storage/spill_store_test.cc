// Spilled pages in the Store: WriteSpill, ReadPages, ForEachDigest,
// CountSpilled and DeleteSession on a real RocksDB.
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "storage/keys.h"
#include "storage/store.h"
#include "tests/storage/spill_test_util.h"
#include "tests/temp_dir.h"

namespace kvmem::storage {
namespace {

using test_util::RandomPage;
using test_util::SamePage;
using test_util::Share;
using test_util::TestSeed;

std::unique_ptr<Store> OpenOrDie(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Store>> store =
      Store::Open(Store::Options(), dir);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? std::move(*store) : nullptr;
}

// Applies `edit(db, family)` to column family `name` of the closed store in
// `dir`, behind the store's back.
void EditFamily(const std::string& dir, const std::string& name,
                const std::function<void(rocksdb::DB*,
                                         rocksdb::ColumnFamilyHandle*)>& edit) {
  rocksdb::DBOptions options;
  std::vector<std::string> names;
  ASSERT_TRUE(rocksdb::DB::ListColumnFamilies(options, dir, &names).ok());
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const std::string& n : names)
    families.emplace_back(n, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(options, dir, families, &handles, &db).ok());
  rocksdb::ColumnFamilyHandle* family = nullptr;
  for (rocksdb::ColumnFamilyHandle* h : handles) {
    if (h->GetName() == name) family = h;
  }
  ASSERT_NE(family, nullptr);
  edit(db, family);
  for (rocksdb::ColumnFamilyHandle* h : handles) {
    ASSERT_TRUE(db->DestroyColumnFamilyHandle(h).ok());
  }
  delete db;
}

using Pages = std::map<std::tuple<uint64_t, uint32_t, uint32_t, uint64_t>,
                       std::shared_ptr<const SpillPage>>;

// Fills `batch` with pages of sessions `seqs`, 2 layers × 2 heads × 3 pages
// each, and records them in `pages`.
void AddPages(std::mt19937_64& rng, std::vector<uint64_t> seqs,
              SpillBatch* batch, Pages* pages) {
  for (uint64_t seq : seqs) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      for (uint32_t head = 0; head < 2; ++head) {
        for (uint64_t page_seq : {0, 1, 300}) {
          auto page = Share(RandomPage(rng));
          batch->pages.push_back({PageId{seq, layer, head, page_seq}, page});
          (*pages)[{seq, layer, head, page_seq}] = page;
        }
      }
    }
  }
}

// Every digest of session `seq`, in visit order.
std::vector<std::pair<PageId, DigestRecord>> Digests(Store* store,
                                                     uint64_t seq) {
  std::vector<std::pair<PageId, DigestRecord>> all;
  absl::Status st =
      store->ForEachDigest(seq, [&](const PageId& id, const DigestRecord& r) {
        all.emplace_back(id, r);
        return absl::OkStatus();
      });
  EXPECT_TRUE(st.ok()) << st;
  return all;
}

TEST(SpillStore, PagesRoundTripBitForBitAcrossReopen) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  Pages pages;
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    SpillBatch batch;
    AddPages(rng, {3, 4}, &batch, &pages);
    ASSERT_TRUE(store->WriteSpill(batch, /*sync=*/true).ok());
    ASSERT_TRUE(store->WriteSpill(SpillBatch(), true).ok());  // empty: OK
  }
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::vector<SpillPage>> got =
      store->ReadPages(4, 1, 0, {300, 0, 1});
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 3u);
  EXPECT_TRUE(SamePage((*got)[0], *pages[{4, 1, 0, 300}]));
  EXPECT_TRUE(SamePage((*got)[1], *pages[{4, 1, 0, 0}]));
  EXPECT_TRUE(SamePage((*got)[2], *pages[{4, 1, 0, 1}]));
  for (const auto& [key, page] : pages) {
    auto [seq, layer, head, page_seq] = key;
    absl::StatusOr<std::vector<SpillPage>> one =
        store->ReadPages(seq, layer, head, {page_seq});
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_TRUE(SamePage(one->at(0), *page));
  }
  absl::StatusOr<std::vector<SpillPage>> none = store->ReadPages(4, 1, 0, {});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(SpillStore, MissingPageIsNotFoundNamingIt) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  SpillBatch batch;
  batch.pages.push_back({PageId{1, 0, 0, 0}, Share(RandomPage(rng))});
  ASSERT_TRUE(store->WriteSpill(batch, false).ok());
  absl::StatusOr<std::vector<SpillPage>> got =
      store->ReadPages(1, 0, 0, {0, 9});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(got.status().message().find("page 9 of session #1 layer 0"),
            absl::string_view::npos)
      << got.status();
}

TEST(SpillStore, CorruptedPageIsDataLossNamingIt) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    SpillBatch batch;
    for (uint64_t p = 0; p < 3; ++p)
      batch.pages.push_back({PageId{5, 2, 1, p}, Share(RandomPage(rng))});
    ASSERT_TRUE(store->WriteSpill(batch, true).ok());
  }
  // Flip one bit in the middle of page 1's stored value (its key rows).
  EditFamily(dir.path(), "pages",
             [](rocksdb::DB* db, rocksdb::ColumnFamilyHandle* pages) {
               const std::string key = PageKey(5, 2, 1, 1);
               std::string value;
               ASSERT_TRUE(db->Get({}, pages, key, &value).ok());
               value[value.size() / 2] ^= 0x04;
               ASSERT_TRUE(db->Put({}, pages, key, value).ok());
             });
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::vector<SpillPage>> got =
      store->ReadPages(5, 2, 1, {0, 1, 2});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  EXPECT_NE(got.status().message().find("page 1 of session #5 layer 2 "
                                        "kv_head 1"),
            absl::string_view::npos)
      << got.status();
  // The pages around it still read.
  EXPECT_TRUE(store->ReadPages(5, 2, 1, {0, 2}).ok());
}

TEST(SpillStore, CorruptedDigestIsDataLossNamingIt) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    SpillBatch batch;
    batch.pages.push_back({PageId{6, 0, 3, 8}, Share(RandomPage(rng))});
    ASSERT_TRUE(store->WriteSpill(batch, true).ok());
  }
  EditFamily(dir.path(), "digests",
             [](rocksdb::DB* db, rocksdb::ColumnFamilyHandle* digests) {
               const std::string key = PageKey(6, 0, 3, 8);
               std::string value;
               ASSERT_TRUE(db->Get({}, digests, key, &value).ok());
               value.back() ^= 0x01;
               ASSERT_TRUE(db->Put({}, digests, key, value).ok());
             });
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  absl::Status st = store->ForEachDigest(
      6, [](const PageId&, const DigestRecord&) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("digest of page 8 of session #6"),
            absl::string_view::npos)
      << st;
  EXPECT_EQ(store->CountSpilled(6).status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(SpillStore, ForEachDigestRebuildsWhatWasWrittenInKeyOrder) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  Pages pages;
  {
    std::unique_ptr<Store> store = OpenOrDie(dir.path());
    ASSERT_NE(store, nullptr);
    SpillBatch first, second;
    AddPages(rng, {7, 8}, &first, &pages);
    AddPages(rng, {9}, &second, &pages);
    ASSERT_TRUE(store->WriteSpill(first, false).ok());
    ASSERT_TRUE(store->WriteSpill(second, false).ok());
  }
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<std::pair<PageId, DigestRecord>> digests =
      Digests(store.get(), 8);
  // Pages of session 8, in (layer, head, page) order: map order.
  std::vector<std::pair<PageId, std::shared_ptr<const SpillPage>>> want;
  for (const auto& [key, page] : pages) {
    auto [seq, layer, head, page_seq] = key;
    if (seq == 8) want.push_back({PageId{seq, layer, head, page_seq}, page});
  }
  ASSERT_EQ(digests.size(), want.size());
  uint64_t tokens = 0, bytes = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(digests[i].first, want[i].first) << i;
    EXPECT_EQ(digests[i].second.tokens, want[i].second->tokens());
    EXPECT_TRUE(test_util::SameFloatBits(digests[i].second.digest,
                                         want[i].second->digest));
    // The stored size is the framed encoding: 5 + the body.
    EXPECT_EQ(digests[i].second.page_bytes,
              5 + EncodeSpillPage(*want[i].second).size());
    tokens += digests[i].second.tokens;
    bytes += digests[i].second.page_bytes;
  }
  absl::StatusOr<Store::SpillCounts> counts = store->CountSpilled(8);
  ASSERT_TRUE(counts.ok()) << counts.status();
  EXPECT_EQ(counts->pages, want.size());
  EXPECT_EQ(counts->tokens, tokens);
  EXPECT_EQ(counts->page_bytes, bytes);
  EXPECT_TRUE(Digests(store.get(), 10).empty());
  // A visitor's error stops the scan and comes back.
  int visits = 0;
  absl::Status st =
      store->ForEachDigest(7, [&](const PageId&, const DigestRecord&) {
        return ++visits == 2 ? absl::CancelledError("enough")
                             : absl::OkStatus();
      });
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(visits, 2);
}

TEST(SpillStore, InvalidPageWritesNothingOfTheBatch) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  SpillBatch batch;
  batch.pages.push_back({PageId{2, 0, 0, 0}, Share(RandomPage(rng))});
  SpillPage bad = RandomPage(rng);
  bad.keys.pop_back();
  batch.pages.push_back({PageId{2, 0, 0, 1}, Share(bad)});
  absl::Status st = store->WriteSpill(batch, true);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("pages[1]"), absl::string_view::npos) << st;
  EXPECT_EQ(store->ReadPages(2, 0, 0, {0}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(Digests(store.get(), 2).empty());
  // In a group, the message names the batch too; still nothing written.
  SpillBatch good;
  good.pages.push_back({PageId{2, 0, 0, 5}, Share(RandomPage(rng))});
  const SpillBatch* group[] = {&good, &batch};
  st = store->WriteSpillGroup(group, true);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("batches[1].pages[1]"), absl::string_view::npos)
      << st;
  EXPECT_EQ(store->ReadPages(2, 0, 0, {5}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SpillStore, RewritingAPageReplacesPageAndDigest) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  for (int round = 0; round < 2; ++round) {
    SpillPage page = RandomPage(rng, 64, round == 0 ? 3 : 9);
    SpillBatch batch;
    batch.pages.push_back({PageId{3, 1, 1, 1}, Share(page)});
    ASSERT_TRUE(store->WriteSpill(batch, false).ok());
    absl::StatusOr<std::vector<SpillPage>> got = store->ReadPages(3, 1, 1, {1});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(SamePage(got->at(0), page));
    std::vector<std::pair<PageId, DigestRecord>> digests =
        Digests(store.get(), 3);
    ASSERT_EQ(digests.size(), 1u);
    EXPECT_EQ(digests[0].second.tokens, page.tokens());
  }
}

TEST(SpillStore, DeleteSessionRemovesPagesAndDigestsOfThatSessionOnly) {
  kvmem::testing::TempDir dir;
  std::mt19937_64 rng(TestSeed());
  std::unique_ptr<Store> store = OpenOrDie(dir.path());
  ASSERT_NE(store, nullptr);
  Pages pages;
  SpillBatch batch;
  AddPages(rng, {10, 11, 12}, &batch, &pages);
  ASSERT_TRUE(store->WriteSpill(batch, false).ok());
  ASSERT_TRUE(store->PutManifest(11, "m", false).ok());
  ASSERT_TRUE(store->DeleteSession(11, true).ok());
  EXPECT_TRUE(Digests(store.get(), 11).empty());
  EXPECT_EQ(store->ReadPages(11, 0, 0, {0}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->ReadPages(11, 1, 1, {300}).status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<Store::SpillCounts> gone = store->CountSpilled(11);
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(gone->pages, 0u);
  for (uint64_t seq : {10, 12}) {
    EXPECT_EQ(Digests(store.get(), seq).size(), 12u);
    absl::StatusOr<std::vector<SpillPage>> got =
        store->ReadPages(seq, 1, 1, {0, 1, 300});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(SamePage(got->at(2), *pages[{seq, 1, 1, 300}]));
  }
}

}  // namespace
}  // namespace kvmem::storage
