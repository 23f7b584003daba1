#include "service/grpc/step_wire.h"

#include <atomic>
#include <cstring>
#include <string>
#include <utility>

#include "base/status_macros.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/slice.h"
#include "service/grpc/convert.h"

namespace kvmem {
namespace {

// Wire types of the proto encoding.
constexpr uint32_t kVarint = 0, kDelimited = 2;

size_t VarintSize(uint64_t v) {
  return size_t(70 - __builtin_clzll(v | 1)) / 7;  // 7 bits a byte
}

// Writes v's varint at `at`; returns the end.
char* PutVarint(char* at, uint64_t v) {
  while (v >= 0x80) {
    *at++ = char(v | 0x80);
    v >>= 7;
  }
  *at++ = char(v);
  return at;
}

// A tag is one byte: every field written here has a number below 16.
static_assert(v1::StepResponse::kResultsFieldNumber < 16 &&
                  v1::StepResult::kLseFieldNumber < 16 &&
                  v1::StepResult::kHeadsFieldNumber < 16 &&
                  v1::FetchedHead::kQueryRotaryPositionsFieldNumber < 16 &&
                  v1::StepStreamResponse::kRequestIdFieldNumber < 16,
              "a field number of 16 or more takes a two-byte tag");

size_t DelimitedSize(size_t bytes) { return 1 + VarintSize(bytes) + bytes; }

// Packed repeated int64 payload bytes (negative values take 10 bytes).
size_t PackedSize(const std::vector<int64_t>& values) {
  size_t n = 0;
  for (int64_t v : values) n += VarintSize(uint64_t(v));
  return n;
}

// Field sizes as protobuf counts them: proto3 leaves out zeros and empties.
struct HeadSizes {
  size_t positions = 0;  // packed payload bytes
  size_t rotary = 0;     // query_rotary_positions' packed payload bytes
  size_t all = 0;        // the FetchedHead message's bytes
};

HeadSizes SizeHead(const FetchedHead& h) {
  HeadSizes s;
  s.positions = PackedSize(h.positions);
  s.rotary = PackedSize(h.query_rotary_positions);
  if (!h.positions.empty()) s.all += DelimitedSize(s.positions);
  if (!h.k.empty()) s.all += DelimitedSize(h.k.size());
  if (!h.v.empty()) s.all += DelimitedSize(h.v.size());
  if (!h.query_rotary_positions.empty()) s.all += DelimitedSize(s.rotary);
  return s;
}

// `heads`: SizeHead of each of r.heads.
size_t ResultSize(const StepEntryResult& r, const std::string& session_id,
                  const HeadSizes* heads) {
  size_t n = 0;
  if (!session_id.empty()) n += DelimitedSize(session_id.size());
  if (r.next_position != 0) n += 1 + VarintSize(uint64_t(r.next_position));
  if (r.durable_position != 0) {
    n += 1 + VarintSize(uint64_t(r.durable_position));
  }
  for (size_t h = 0; h < r.heads.size(); ++h) {
    n += DelimitedSize(heads[h].all);
  }
  if (!r.output.empty()) n += DelimitedSize(r.output.size());
  if (!r.lse.empty()) n += DelimitedSize(r.lse.size());
  return n;
}

// Owns the results while gRPC holds slices over them: one reference per
// slice, the last one's release frees it.
struct Reply {
  std::vector<StepEntryResult> results;
  std::string own;  // tags, lengths, small fields
  std::atomic<int> refs{0};

  static void Release(void* self) {
    Reply* reply = static_cast<Reply*>(self);
    if (reply->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete reply;
  }
};

// The encoding as pieces: runs of `own`, and shared strings.
class Writer {
 public:
  explicit Writer(Reply* reply) : reply_(reply) {}

  void Varint(uint64_t v) {
    char bytes[10];
    reply_->own.append(bytes, size_t(PutVarint(bytes, v) - bytes));
  }
  void Tag(uint32_t field, uint32_t wire_type) {
    Varint((field << 3) | wire_type);
  }
  void Int64(uint32_t field, int64_t v) {
    if (v == 0) return;
    Tag(field, kVarint);
    Varint(uint64_t(v));
  }
  void Bytes(uint32_t field, const std::string& bytes) {
    if (bytes.empty()) return;
    Tag(field, kDelimited);
    Varint(bytes.size());
    if (bytes.size() < kMinSharedBytes) {
      reply_->own.append(bytes);
      return;
    }
    CloseOwnRun();
    pieces_.push_back(
        {false, reinterpret_cast<uintptr_t>(bytes.data()), bytes.size()});
    run_start_ = reply_->own.size();
  }
  // `bytes`: PackedSize(values), counted once by the caller (FETCH sends
  // 2048 positions a head, 500k at batch 32).
  void Packed(uint32_t field, const std::vector<int64_t>& values,
              size_t bytes) {
    if (values.empty()) return;
    Tag(field, kDelimited);
    Varint(bytes);
    std::string& own = reply_->own;
    const size_t at = own.size();
    own.resize(at + bytes);
    char* out = own.data() + at;
    for (int64_t v : values) out = PutVarint(out, uint64_t(v));
  }
  void Delimited(uint32_t field, size_t bytes) {
    Tag(field, kDelimited);
    Varint(bytes);
  }

  // The slices, once everything is written (`own` no longer moves).
  grpc::ByteBuffer Finish() {
    CloseOwnRun();
    std::vector<grpc::Slice> slices;
    slices.reserve(pieces_.size());
    reply_->refs.store(int(pieces_.size()), std::memory_order_relaxed);
    for (const Piece& p : pieces_) {
      char* at =
          p.own ? reply_->own.data() + p.at : reinterpret_cast<char*>(p.at);
      slices.emplace_back(at, p.bytes, &Reply::Release, reply_);
    }
    if (pieces_.empty()) {  // an empty message
      delete reply_;
      grpc::Slice empty;
      return grpc::ByteBuffer(&empty, 1);
    }
    return grpc::ByteBuffer(slices.data(), slices.size());
  }

 private:
  struct Piece {
    bool own;
    uintptr_t at;  // own: offset into reply_->own; else the address
    size_t bytes;
  };
  void CloseOwnRun() {
    const size_t end = reply_->own.size();
    if (end > run_start_)
      pieces_.push_back({true, run_start_, end - run_start_});
    run_start_ = end;
  }

  Reply* reply_;
  std::vector<Piece> pieces_;
  size_t run_start_ = 0;
};

}  // namespace

namespace {

// StepResponse{request_id, results}; inside StepStreamResponse{response,
// request_id} when `stream`.
grpc::ByteBuffer Encode(uint64_t request_id,
                        std::vector<StepEntryResult> results,
                        const StepRequestView& request, bool stream) {
  using v1::FetchedHead;
  using v1::StepResponse;
  using v1::StepResult;
  using v1::StepStreamResponse;
  Reply* reply = new Reply;
  reply->results = std::move(results);
  // Every head's and result's sizes, counted once; then what `own` will
  // hold: tags, lengths and small fields, a few dozen bytes an entry, and
  // FETCH's packed positions.
  std::vector<HeadSizes> head_sizes;
  std::vector<size_t> result_sizes;
  size_t own = 32;
  size_t response = request_id != 0 ? 1 + VarintSize(request_id) : 0;
  for (size_t i = 0; i < reply->results.size(); ++i) {
    const StepEntryResult& r = reply->results[i];
    const size_t first = head_sizes.size();
    own += 64 + r.lse.size();
    for (const kvmem::FetchedHead& h : r.heads) {
      head_sizes.push_back(SizeHead(h));
      own += 48 + head_sizes.back().positions + head_sizes.back().rotary;
    }
    result_sizes.push_back(ResultSize(r, request.entries[i].session_id,
                                      head_sizes.data() + first));
    response += DelimitedSize(result_sizes.back());
  }
  reply->own.reserve(own);
  const HeadSizes* sizes = head_sizes.data();
  Writer w(reply);
  if (stream) w.Delimited(StepStreamResponse::kResponseFieldNumber, response);
  if (request_id != 0) {
    w.Tag(StepResponse::kRequestIdFieldNumber, kVarint);
    w.Varint(request_id);
  }
  for (size_t i = 0; i < reply->results.size(); ++i) {
    const StepEntryResult& r = reply->results[i];
    w.Delimited(StepResponse::kResultsFieldNumber, result_sizes[i]);
    w.Bytes(StepResult::kSessionIdFieldNumber, request.entries[i].session_id);
    w.Int64(StepResult::kNextPositionFieldNumber, r.next_position);
    w.Int64(StepResult::kDurablePositionFieldNumber, r.durable_position);
    for (const kvmem::FetchedHead& h : r.heads) {
      const HeadSizes& size = *sizes++;
      w.Delimited(StepResult::kHeadsFieldNumber, size.all);
      w.Packed(FetchedHead::kPositionsFieldNumber, h.positions, size.positions);
      w.Bytes(FetchedHead::kKFieldNumber, h.k);
      w.Bytes(FetchedHead::kVFieldNumber, h.v);
      w.Packed(FetchedHead::kQueryRotaryPositionsFieldNumber,
               h.query_rotary_positions, size.rotary);
    }
    w.Bytes(StepResult::kOutputFieldNumber, r.output);
    w.Bytes(StepResult::kLseFieldNumber, r.lse);
  }
  if (stream && request_id != 0) {
    w.Tag(StepStreamResponse::kRequestIdFieldNumber, kVarint);
    w.Varint(request_id);
  }
  return w.Finish();
}

}  // namespace

namespace {

// Reading protobuf's wire format as protobuf 3.21's generated parsers do
// (parse_context.h): each returns false where protobuf's parse fails.
class WireReader {
 public:
  WireReader(const char* at, const char* end) : at_(at), end_(end) {}
  bool done() const { return at_ == end_; }

  // Up to 10 bytes; the bits past 64 are dropped.
  bool Varint(uint64_t* value) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (at_ == end_) return false;
      const uint8_t byte = uint8_t(*at_++);
      if (shift < 64) v |= uint64_t(byte & 0x7f) << shift;
      if (byte < 0x80) {
        *value = v;
        return true;
      }
    }
    return false;
  }
  // Up to 5 bytes, wrapping at 32 bits (ReadTag).
  bool Tag(uint32_t* tag) {
    uint32_t t = 0;
    for (int shift = 0; shift < 35; shift += 7) {
      if (at_ == end_) return false;
      const uint8_t byte = uint8_t(*at_++);
      t += uint32_t(byte & 0x7f) << shift;
      if (byte < 0x80) {
        *tag = t;
        return true;
      }
    }
    return false;
  }
  // A length-delimited field's bytes: a size below 2^31 (ReadSize) that
  // fits in what is left.
  bool Delimited(absl::string_view* bytes) {
    uint32_t size = 0;
    for (int shift = 0;; shift += 7) {
      if (at_ == end_ || shift == 35) return false;
      const uint8_t byte = uint8_t(*at_++);
      if (shift == 28 && byte >= 8) return false;
      size |= uint32_t(byte & 0x7f) << shift;
      if (byte < 0x80) break;
    }
    if (size > size_t(end_ - at_)) return false;
    *bytes = absl::string_view(at_, size);
    at_ += size;
    return true;
  }
  bool Skip(size_t bytes) {
    if (bytes > size_t(end_ - at_)) return false;
    at_ += bytes;
    return true;
  }
  // An unknown field whose tag was read (UnknownFieldParse): a group is
  // skipped to its end-group tag of the same number, `depth` levels deep
  // at most (protobuf's recursion limit). Field number 0 is no field.
  bool SkipField(uint32_t tag, int depth) {
    if ((tag >> 3) == 0) return false;
    absl::string_view ignored;
    uint64_t value = 0;
    switch (tag & 7) {
      case 0:
        return Varint(&value);
      case 1:
        return Skip(8);
      case 2:
        return Delimited(&ignored);
      case 3:
        if (depth <= 0) return false;
        for (;;) {
          uint32_t inner;
          if (!Tag(&inner) || inner == 0) return false;
          if ((inner & 7) == 4) return inner == tag + 1;  // its end
          if (!SkipField(inner, depth - 1)) return false;
        }
      case 5:
        return Skip(4);
      default:  // 4 (an end group with no start), 6, 7
        return false;
    }
  }

 private:
  const char* at_;
  const char* end_;
};

// Protobuf's check of proto3 strings (utf8_range): no overlong forms, no
// surrogates, nothing past U+10FFFF, no truncated sequence.
bool IsUtf8(absl::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const uint8_t c = uint8_t(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int more;
    uint8_t lo = 0x80, hi = 0xbf;  // the second byte's range
    if (c >= 0xc2 && c <= 0xdf) {
      more = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      more = 2;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      more = 3;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      return false;
    }
    if (n - i <= size_t(more)) return false;
    for (int j = 1; j <= more; ++j) {
      const uint8_t b = uint8_t(s[i + size_t(j)]);
      if (j == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xbf)) return false;
    }
    i += size_t(more) + 1;
  }
  return true;
}

// Protobuf's default recursion limit, less the entry's own level.
constexpr int kGroupDepth = 99;

bool ReadEntry(absl::string_view bytes, WireStepEntry* e) {
  WireReader r(bytes.data(), bytes.data() + bytes.size());
  while (!r.done()) {
    uint32_t tag;
    uint64_t value = 0;
    if (!r.Tag(&tag) || tag == 0) return false;
    bool ok;
    switch (tag) {
      case (1 << 3) | kDelimited:
        ok = r.Delimited(&e->session_id) && IsUtf8(e->session_id);
        break;
      case (2 << 3) | kVarint:
        ok = r.Varint(&value);
        e->position = int64_t(value);
        break;
      case (3 << 3) | kVarint:
        ok = r.Varint(&value);
        e->num_tokens = int32_t(uint32_t(value));
        break;
      case (4 << 3) | kDelimited:
        ok = r.Delimited(&e->q);
        break;
      case (5 << 3) | kDelimited:
        ok = r.Delimited(&e->k);
        break;
      case (6 << 3) | kDelimited:
        ok = r.Delimited(&e->v);
        break;
      default:
        ok = r.SkipField(tag, kGroupDepth - 1);
    }
    if (!ok) return false;
  }
  return true;
}

}  // namespace

void WireStepRequest::ClearFields() {
  request_id_ = 0;
  layer_ = 0;
  mode_ = 0;
  entries_.clear();
}

absl::Status WireStepRequest::Parse(const grpc::ByteBuffer& wire) {
  slices_.clear();
  ClearFields();
  if (!wire.Dump(&slices_).ok()) {
    slices_.clear();
    return absl::InvalidArgumentError("request: unreadable bytes");
  }
  if (slices_.size() == 1) {
    return Parse(absl::string_view(
        reinterpret_cast<const char*>(slices_[0].begin()), slices_[0].size()));
  }
  size_t size = 0;
  for (const grpc::Slice& slice : slices_) size += slice.size();
  gathered_.resize(size);
  char* at = gathered_.data();
  for (const grpc::Slice& slice : slices_) {
    std::memcpy(at, slice.begin(), slice.size());
    at += slice.size();
  }
  slices_.clear();
  return Parse(gathered_);
}

absl::Status WireStepRequest::Parse(absl::string_view bytes) {
  ClearFields();  // not slices_: `bytes` may be slices_[0]'s
  WireReader r(bytes.data(), bytes.data() + bytes.size());
  bool ok = true;
  while (ok && !r.done()) {
    uint32_t tag;
    uint64_t value = 0;
    absl::string_view entry;
    if (!r.Tag(&tag) || tag == 0) {
      ok = false;
      break;
    }
    switch (tag) {
      case (1 << 3) | kVarint:
        ok = r.Varint(&value);
        layer_ = int32_t(uint32_t(value));
        break;
      case (2 << 3) | kVarint:
        ok = r.Varint(&value);
        mode_ = int32_t(uint32_t(value));
        break;
      case (3 << 3) | kDelimited:
        ok = r.Delimited(&entry) && ReadEntry(entry, &entries_.emplace_back());
        break;
      case (4 << 3) | kVarint:
        ok = r.Varint(&value);
        request_id_ = value;
        break;
      default:
        ok = r.SkipField(tag, kGroupDepth);
    }
  }
  if (!ok) {
    ClearFields();
    slices_.clear();
    return absl::InvalidArgumentError("request: not a kvmem.v1.StepRequest");
  }
  return absl::OkStatus();
}

int64_t WireStepRequest::tensor_bytes() const {
  int64_t bytes = 0;
  for (const WireStepEntry& e : entries_) {
    bytes += int64_t(e.q.size() + e.k.size() + e.v.size());
  }
  return bytes;
}

absl::Status StepRequestFromWire(const WireStepRequest& request,
                                 StepRequestView* view) {
  KVMEM_ASSIGN_OR_RETURN(view->mode, StepModeFromWire(request.mode()));
  view->layer = request.layer();
  view->entries.clear();
  view->entries.reserve(request.entries().size());
  for (const WireStepEntry& e : request.entries()) {
    StepEntryView& entry = view->entries.emplace_back();
    entry.session_id = std::string(e.session_id);
    entry.position = e.position;
    entry.num_tokens = e.num_tokens;
    entry.q = e.q;
    entry.k = e.k;
    entry.v = e.v;
  }
  return absl::OkStatus();
}

grpc::ByteBuffer StepResponseWire(uint64_t request_id,
                                  std::vector<StepEntryResult> results,
                                  const StepRequestView& request) {
  return Encode(request_id, std::move(results), request, /*stream=*/false);
}

grpc::ByteBuffer StepStreamResponseWire(uint64_t request_id,
                                        std::vector<StepEntryResult> results,
                                        const StepRequestView& request) {
  return Encode(request_id, std::move(results), request, /*stream=*/true);
}

}  // namespace kvmem
