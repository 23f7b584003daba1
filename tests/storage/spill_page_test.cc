#include "storage/spill_page.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"
#include "tests/storage/spill_test_util.h"

namespace kvmem::storage {
namespace {

using test_util::RandomPage;
using test_util::SamePage;
using test_util::TestSeed;

TEST(SpillPage, RoundTripsBitForBit) {
  std::mt19937_64 rng(TestSeed());
  for (int i = 0; i < 200; ++i) {
    const uint32_t row_bytes = uint32_t(rng() % 600) + 1;
    SpillPage page = RandomPage(rng, row_bytes);
    page.digest.resize(rng() % 300);  // any length: opaque to storage
    ASSERT_TRUE(page.Validate().ok()) << page.Validate();
    const std::string body = EncodeSpillPage(page);
    absl::StatusOr<SpillPage> got = DecodeSpillPage(body, "page");
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(SamePage(*got, page)) << "page " << i;
    // Re-encoding the decoded page gives the same bytes.
    EXPECT_EQ(EncodeSpillPage(*got), body);
  }
}

TEST(SpillPage, KeepsNaNPayloadsAndExtremePositions) {
  SpillPage page;
  page.row_bytes = 2;
  page.positions = {std::numeric_limits<int64_t>::min(), -1, 0,
                    std::numeric_limits<int64_t>::max()};
  page.keys = std::string("\x00\xff\x7f\x80\x01\x02\x03\x04", 8);
  page.values = page.keys;
  const uint32_t nan_bits[] = {0x7fc00001u, 0xffbfffffu, 0x00000001u,
                               0x80000000u};
  for (uint32_t bits : nan_bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    page.digest.push_back(f);
  }
  absl::StatusOr<SpillPage> got =
      DecodeSpillPage(EncodeSpillPage(page), "page");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SamePage(*got, page));
}

TEST(SpillPage, PartsJoinToTheWholeEncoding) {
  std::mt19937_64 rng(TestSeed());
  SpillPage page = RandomPage(rng);
  SpillPageParts parts = EncodeSpillPageParts(page);
  EXPECT_EQ(parts.head + page.keys + page.values + parts.tail,
            EncodeSpillPage(page));
}

TEST(SpillPage, EveryTruncationAndTrailingByteIsDataLoss) {
  std::mt19937_64 rng(TestSeed());
  const std::string body = EncodeSpillPage(RandomPage(rng, 8, 3));
  for (size_t n = 0; n < body.size(); ++n) {
    absl::StatusOr<SpillPage> got =
        DecodeSpillPage(body.substr(0, n), "page 7");
    ASSERT_FALSE(got.ok()) << "prefix of " << n << " bytes decoded";
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(got.status().message().find("page 7"), absl::string_view::npos)
        << got.status();
  }
  EXPECT_EQ(DecodeSpillPage(body + "x", "p").status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(SpillPage, BadHeaderIsDataLoss) {
  std::mt19937_64 rng(TestSeed());
  const std::string body = EncodeSpillPage(RandomPage(rng, 8, 3));
  std::string bad_format = body;
  bad_format[0] = char(kSpillPageFormat + 1);
  absl::Status st = DecodeSpillPage(bad_format, "p").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("format"), absl::string_view::npos) << st;
  // A huge token count must be refused before anything is allocated.
  std::string huge_tokens = body;
  for (int i = 1; i <= 4; ++i) huge_tokens[i] = char(0xff);
  st = DecodeSpillPage(huge_tokens, "p").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("tokens"), absl::string_view::npos) << st;
  std::string zero_tokens = body;
  for (int i = 1; i <= 4; ++i) zero_tokens[i] = 0;
  EXPECT_EQ(DecodeSpillPage(zero_tokens, "p").status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(SpillPage, ValidateNamesTheField) {
  std::mt19937_64 rng(TestSeed());
  SpillPage page = RandomPage(rng, 16, 4);
  ASSERT_TRUE(page.Validate().ok());
  SpillPage short_values = page;
  short_values.values.pop_back();
  absl::Status st = short_values.Validate();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("values: 63 bytes, want 64"),
            absl::string_view::npos)
      << st;
  SpillPage empty;
  empty.row_bytes = 4;
  EXPECT_EQ(empty.Validate().code(), absl::StatusCode::kInvalidArgument);
  SpillPage no_rows = page;
  no_rows.row_bytes = 0;
  EXPECT_EQ(no_rows.Validate().code(), absl::StatusCode::kInvalidArgument);

  SpillBatch batch;
  batch.pages.push_back({PageId{1, 2, 3, 4}, test_util::Share(page)});
  batch.pages.push_back({PageId{1, 2, 3, 5}, test_util::Share(short_values)});
  st = batch.Validate();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("pages[1] (page 5 of session #1 layer 2 "
                              "kv_head 3).values"),
            absl::string_view::npos)
      << st;
  batch.pages[1].page = nullptr;
  EXPECT_EQ(batch.Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DigestRecord, RoundTripsAndRejectsTruncation) {
  DigestRecord record;
  record.tokens = 16;
  record.page_bytes = 65563;
  record.digest = {-1.5f, std::nanf("7"), 3.0f, 0.0f};
  const std::string body = EncodeDigestRecord(record);
  absl::StatusOr<DigestRecord> got = DecodeDigestRecord(body, "d");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->tokens, 16u);
  EXPECT_EQ(got->page_bytes, 65563u);
  EXPECT_TRUE(test_util::SameFloatBits(got->digest, record.digest));
  for (size_t n = 0; n < body.size(); ++n) {
    EXPECT_EQ(DecodeDigestRecord(body.substr(0, n), "d").status().code(),
              absl::StatusCode::kDataLoss)
        << n;
  }
}

}  // namespace
}  // namespace kvmem::storage
