#include "storage/checksum.h"

#include <random>
#include <string>

#include "gtest/gtest.h"

namespace kvmem::storage {
namespace {

TEST(Crc32c, MatchesPublishedCheckValues) {
  // RFC 3720 B.4 check value and the 32 zero bytes vector.
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  // Continuing a CRC equals one pass over the concatenation.
  EXPECT_EQ(Crc32c("6789", Crc32c("12345")), Crc32c("123456789"));
}

TEST(Crc32c, FastPathMatchesTheTableForEveryLengthAndOffset) {
  EXPECT_EQ(Crc32cPortable("123456789"), 0xE3069283u);
  std::mt19937_64 rng(7);
  std::string bytes(4096, '\0');
  for (char& c : bytes) c = char(rng());
  for (size_t offset = 0; offset < 9; ++offset) {
    for (size_t length = 0; length < 80; ++length) {
      absl::string_view piece(bytes.data() + offset, length);
      ASSERT_EQ(Crc32c(piece), Crc32cPortable(piece))
          << "offset " << offset << " length " << length;
      ASSERT_EQ(Crc32c(piece, 0x12345678u), Crc32cPortable(piece, 0x12345678u));
    }
  }
  EXPECT_EQ(Crc32c(bytes), Crc32cPortable(bytes));
}

TEST(Frame, RoundTripsAndDetectsEveryFlippedBit) {
  const std::string body = "page of keys and values \x01\x02\x03";
  const std::string framed = FrameValue(body);
  absl::StatusOr<absl::string_view> got = UnframeValue(framed, "test value");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(std::string(*got), body);
  for (size_t byte = 0; byte < framed.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = framed;
      bad[byte] = char(bad[byte] ^ (1 << bit));
      absl::StatusOr<absl::string_view> r = UnframeValue(bad, "test value");
      ASSERT_FALSE(r.ok()) << "byte " << byte << " bit " << bit;
      EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
      EXPECT_NE(r.status().message().find("test value"),
                absl::string_view::npos);
    }
  }
}

TEST(Frame, ShortValueIsDataLoss) {
  EXPECT_EQ(UnframeValue("abc", "x").status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kvmem::storage
