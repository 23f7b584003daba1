#include "service/grpc/step_wire.h"

#include <atomic>
#include <string>
#include <utility>

#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/slice.h"

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

absl::Status StepRequestFromWire(grpc::ByteBuffer* wire,
                                 v1::StepRequest* request) {
  if (grpc::SerializationTraits<v1::StepRequest>::Deserialize(wire, request)
          .ok()) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError("request: not a kvmem.v1.StepRequest");
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
