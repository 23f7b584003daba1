#include "storage/checksum.h"

#include <array>

#include "absl/strings/str_cat.h"

namespace kvmem::storage {
namespace {

// Reflected table of the Castagnoli polynomial 0x82F63B78.
std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}

}  // namespace

uint32_t Crc32c(absl::string_view bytes, uint32_t crc) {
  static const std::array<uint32_t, 256> kTable = MakeTable();
  crc = ~crc;
  for (unsigned char b : bytes) crc = kTable[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::string FrameValue(absl::string_view body) {
  std::string framed;
  framed.reserve(5 + body.size());
  framed.push_back(char(kFrameVersion));
  uint32_t crc = Crc32c(body);
  for (int i = 0; i < 4; ++i) framed.push_back(char((crc >> (8 * i)) & 0xff));
  framed.append(body.data(), body.size());
  return framed;
}

absl::StatusOr<absl::string_view> UnframeValue(absl::string_view framed,
                                               absl::string_view what) {
  if (framed.size() < 5) {
    return absl::DataLossError(absl::StrCat(what, ": stored value is ",
                                            framed.size(),
                                            " bytes, shorter than its frame"));
  }
  if (uint8_t(framed[0]) != kFrameVersion) {
    return absl::DataLossError(absl::StrCat(what, ": unknown value version ",
                                            int(uint8_t(framed[0]))));
  }
  uint32_t want = 0;
  for (int i = 0; i < 4; ++i)
    want |= uint32_t(uint8_t(framed[1 + i])) << (8 * i);
  absl::string_view body = framed.substr(5);
  uint32_t got = Crc32c(body);
  if (got != want) {
    return absl::DataLossError(
        absl::StrCat(what, ": checksum mismatch (stored ", absl::Hex(want),
                     ", computed ", absl::Hex(got), ")"));
  }
  return body;
}

}  // namespace kvmem::storage
