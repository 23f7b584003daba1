#include "storage/spill_page.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvmem::storage {
namespace {

void PutU32(uint32_t v, std::string* out) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = char((v >> (8 * i)) & 0xff);
  out->append(b, 4);
}

void PutU64(uint64_t v, std::string* out) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = char((v >> (8 * i)) & 0xff);
  out->append(b, 8);
}

void PutFloats(const std::vector<float>& floats, std::string* out) {
  for (float f : floats) {
    uint32_t bits = 0;
    std::memcpy(&bits, &f, 4);  // bit for bit, NaN payloads included
    PutU32(bits, out);
  }
}

// Reads little-endian fields from a body, never past its end; the first
// failed read makes every later one fail too.
class Reader {
 public:
  Reader(absl::string_view body, absl::string_view what)
      : body_(body), what_(what) {}

  bool U8(uint8_t* v) {
    if (!Need(1, "format byte")) return false;
    *v = uint8_t(body_[at_++]);
    return true;
  }
  bool U32(uint32_t* v, absl::string_view field) {
    if (!Need(4, field)) return false;
    *v = 0;
    for (int i = 0; i < 4; ++i)
      *v |= uint32_t(uint8_t(body_[at_ + i])) << (8 * i);
    at_ += 4;
    return true;
  }
  bool U64(uint64_t* v, absl::string_view field) {
    if (!Need(8, field)) return false;
    *v = 0;
    for (int i = 0; i < 8; ++i)
      *v |= uint64_t(uint8_t(body_[at_ + i])) << (8 * i);
    at_ += 8;
    return true;
  }
  bool Bytes(uint64_t n, std::string* out, absl::string_view field) {
    if (!Need(n, field)) return false;
    out->assign(body_.data() + at_, n);
    at_ += n;
    return true;
  }
  bool Floats(uint32_t n, std::vector<float>* out, absl::string_view field) {
    if (!Need(uint64_t{n} * 4, field)) return false;
    out->resize(n);
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t bits = 0;
      U32(&bits, field);
      std::memcpy(&(*out)[i], &bits, 4);
    }
    return true;
  }
  // Fails unless `v` is in [lo, hi].
  bool InRange(uint64_t v, uint64_t lo, uint64_t hi, absl::string_view field) {
    if (!status_.ok()) return false;
    if (v < lo || v > hi) {
      status_ = absl::DataLossError(
          absl::StrCat(what_, ": ", field, " is ", v, ", want ", lo, "..", hi));
      return false;
    }
    return true;
  }
  // DATA_LOSS if a read failed or bytes are left over.
  absl::Status Finish() {
    if (status_.ok() && at_ != body_.size()) {
      status_ = absl::DataLossError(absl::StrCat(
          what_, ": ", body_.size() - at_, " trailing bytes after ", at_));
    }
    return status_;
  }

 private:
  bool Need(uint64_t n, absl::string_view field) {
    if (!status_.ok()) return false;
    if (n > body_.size() - at_) {
      status_ = absl::DataLossError(
          absl::StrCat(what_, ": truncated at ", field, " (", body_.size(),
                       " bytes, need ", at_ + n, ")"));
      return false;
    }
    return true;
  }

  absl::string_view body_;
  absl::string_view what_;
  size_t at_ = 0;
  absl::Status status_;
};

absl::Status CheckFormat(Reader& r, absl::string_view what) {
  uint8_t format = 0;
  if (r.U8(&format) && format != kSpillPageFormat) {
    return absl::DataLossError(absl::StrCat(what, ": unknown page format ",
                                            int(format), ", want ",
                                            int(kSpillPageFormat)));
  }
  return absl::OkStatus();
}

}  // namespace

std::string DescribePage(const PageId& id) {
  return absl::StrCat("page ", id.page_seq, " of session #", id.session_seq,
                      " layer ", id.layer, " kv_head ", id.kv_head);
}

size_t SpillPage::MemoryBytes() const {
  return sizeof(SpillPage) + positions.size() * sizeof(int64_t) + keys.size() +
         values.size() + digest.size() * sizeof(float);
}

absl::Status SpillPage::Validate() const {
  if (tokens() < 1 || tokens() > kMaxPageTokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "positions: ", tokens(), " tokens, want 1..", kMaxPageTokens));
  }
  if (row_bytes < 1 || row_bytes > kMaxRowBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("row_bytes: ", row_bytes, ", want 1..", kMaxRowBytes));
  }
  const size_t want = tokens() * size_t{row_bytes};
  if (keys.size() != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys: ", keys.size(), " bytes, want ", want));
  }
  if (values.size() != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("values: ", values.size(), " bytes, want ", want));
  }
  if (digest.size() > kMaxDigestFloats) {
    return absl::InvalidArgumentError(absl::StrCat(
        "digest: ", digest.size(), " floats, want ≤ ", kMaxDigestFloats));
  }
  return absl::OkStatus();
}

SpillPageParts EncodeSpillPageParts(const SpillPage& page) {
  SpillPageParts parts;
  parts.head.reserve(13 + page.tokens() * 8);
  parts.head.push_back(char(kSpillPageFormat));
  PutU32(uint32_t(page.tokens()), &parts.head);
  PutU32(page.row_bytes, &parts.head);
  PutU32(uint32_t(page.digest.size()), &parts.head);
  for (int64_t p : page.positions) PutU64(uint64_t(p), &parts.head);
  parts.tail.reserve(page.digest.size() * 4);
  PutFloats(page.digest, &parts.tail);
  return parts;
}

std::string EncodeSpillPage(const SpillPage& page) {
  SpillPageParts parts = EncodeSpillPageParts(page);
  std::string out;
  out.reserve(parts.head.size() + page.keys.size() + page.values.size() +
              parts.tail.size());
  out.append(parts.head);
  out.append(page.keys);
  out.append(page.values);
  out.append(parts.tail);
  return out;
}

absl::StatusOr<SpillPage> DecodeSpillPage(absl::string_view body,
                                          absl::string_view what) {
  Reader r(body, what);
  KVMEM_RETURN_IF_ERROR(CheckFormat(r, what));
  uint32_t tokens = 0, digest_floats = 0;
  SpillPage page;
  if (r.U32(&tokens, "tokens") && r.U32(&page.row_bytes, "row_bytes") &&
      r.U32(&digest_floats, "digest_floats") &&
      r.InRange(tokens, 1, kMaxPageTokens, "tokens") &&
      r.InRange(page.row_bytes, 1, kMaxRowBytes, "row_bytes") &&
      r.InRange(digest_floats, 0, kMaxDigestFloats, "digest_floats")) {
    page.positions.resize(tokens);
    for (uint32_t i = 0; i < tokens; ++i) {
      uint64_t p = 0;
      if (!r.U64(&p, "positions")) break;
      page.positions[i] = int64_t(p);
    }
    const uint64_t rows = uint64_t{tokens} * page.row_bytes;
    if (r.Bytes(rows, &page.keys, "keys") &&
        r.Bytes(rows, &page.values, "values")) {
      r.Floats(digest_floats, &page.digest, "digest");
    }
  }
  KVMEM_RETURN_IF_ERROR(r.Finish());
  return page;
}

std::string EncodeDigestRecord(const DigestRecord& record) {
  std::string out;
  out.reserve(17 + record.digest.size() * 4);
  out.push_back(char(kSpillPageFormat));
  PutU32(record.tokens, &out);
  PutU64(record.page_bytes, &out);
  PutU32(uint32_t(record.digest.size()), &out);
  PutFloats(record.digest, &out);
  return out;
}

absl::StatusOr<DigestRecord> DecodeDigestRecord(absl::string_view body,
                                                absl::string_view what) {
  Reader r(body, what);
  KVMEM_RETURN_IF_ERROR(CheckFormat(r, what));
  DigestRecord record;
  uint32_t digest_floats = 0;
  if (r.U32(&record.tokens, "tokens") &&
      r.U64(&record.page_bytes, "page_bytes") &&
      r.U32(&digest_floats, "digest_floats") &&
      r.InRange(record.tokens, 1, kMaxPageTokens, "tokens") &&
      r.InRange(digest_floats, 0, kMaxDigestFloats, "digest_floats")) {
    r.Floats(digest_floats, &record.digest, "digest");
  }
  KVMEM_RETURN_IF_ERROR(r.Finish());
  return record;
}

size_t SpillBatch::MemoryBytes() const {
  size_t total = 0;
  for (const Entry& e : pages) {
    if (e.page != nullptr) total += e.page->MemoryBytes();
  }
  for (const LogRecord& r : log) total += r.body.size() + sizeof(LogRecord);
  return total;
}

absl::Status SpillBatch::Validate() const {
  for (size_t i = 0; i < pages.size(); ++i) {
    if (pages[i].page == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("pages[", i, "].page: null"));
    }
    absl::Status st = pages[i].page->Validate();
    if (!st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pages[", i, "] (", DescribePage(pages[i].id), ").", st.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvmem::storage
