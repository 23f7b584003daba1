// StepResponseWire and StepStreamResponseWire against protobuf's own
// serializer: the same bytes for random replies of every shape, the large
// fields sent from the results' own memory.
#include "service/grpc/step_wire.h"

#include <cstdio>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "service/grpc/convert.h"
#include "tests/random_bytes.h"

namespace kvmem {
namespace {

using testing::RandomBytes;

// A reply of `entries` results, ATTEND-like or FETCH-like, with field
// sizes on both sides of kMinSharedBytes and values of every varint length
// (negative ones included: protobuf writes them as 10-byte varints).
void RandomReply(std::mt19937_64& rng, int entries, bool fetch,
                 std::vector<StepEntryResult>* results,
                 StepRequestView* request) {
  std::uniform_int_distribution<int> size(0, 3000);
  auto position = [&]() -> int64_t {
    switch (rng() % 4) {
      case 0:
        return 0;
      case 1:
        return int64_t(rng() % 128);
      case 2:
        return -int64_t(rng() % 1000) - 1;
      default:
        return int64_t(rng() >> 2);
    }
  };
  for (int i = 0; i < entries; ++i) {
    StepEntryView e;
    e.session_id = i % 5 == 4 ? "" : "s-" + std::to_string(rng() % 100000);
    request->entries.push_back(e);
    StepEntryResult r;
    r.next_position = position();
    r.durable_position = position();
    if (fetch) {
      const int heads = int(rng() % 4);
      for (int h = 0; h < heads; ++h) {
        FetchedHead head;
        for (size_t n = rng() % 40; n > 0; --n) {
          head.positions.push_back(position());
        }
        head.k = RandomBytes(rng, size_t(size(rng)));
        head.v = RandomBytes(rng, size_t(size(rng)));
        if (rng() % 2) head.query_rotary_positions = {position(), position()};
        r.heads.push_back(std::move(head));
      }
    } else {
      r.output = RandomBytes(rng, size_t(size(rng)));
      r.lse = RandomBytes(rng, size_t(rng() % 200));
    }
    results->push_back(std::move(r));
  }
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

TEST(StepWire, WritesProtobufsOwnBytes) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    SCOPED_TRACE(round);
    std::vector<StepEntryResult> results;
    StepRequestView request;
    RandomReply(rng, 1 + int(rng() % 6), round % 2 == 1, &results, &request);
    const uint64_t request_id = round % 3 == 0 ? 0 : rng();

    v1::StepResponse proto;
    StepResultsToProto(results, request, &proto);
    proto.set_request_id(request_id);
    const std::string want = proto.SerializeAsString();

    // StepStream's envelope around the same reply.
    v1::StepStreamResponse stream;
    *stream.mutable_response() = proto;
    stream.set_request_id(request_id);
    const std::string want_stream = stream.SerializeAsString();

    const std::string got_stream =
        Flatten(StepStreamResponseWire(request_id, results, request));
    const std::string got =
        Flatten(StepResponseWire(request_id, std::move(results), request));
    ASSERT_EQ(got.size(), want.size());
    ASSERT_EQ(got, want);
    ASSERT_EQ(got_stream, want_stream);
    v1::StepResponse parsed;
    ASSERT_TRUE(parsed.ParseFromString(got));
  }
}

TEST(StepWire, SendsLargeFieldsFromTheResultsOwnMemory) {
  std::mt19937_64 rng(7);
  StepRequestView request;
  request.entries.resize(2);
  request.entries[0].session_id = "a";
  request.entries[1].session_id = "b";
  std::vector<StepEntryResult> results(2);
  results[0].output = RandomBytes(rng, 8192);  // ATTEND's [1, 32, 128] bf16
  results[0].lse = RandomBytes(rng, 128);
  FetchedHead head;
  head.positions = {1, 2, 3};
  head.k = RandomBytes(rng, 1 << 20);
  head.v = RandomBytes(rng, 1 << 20);
  results[1].heads.push_back(std::move(head));
  const std::set<const void*> large = {results[0].output.data(),
                                       results[1].heads[0].k.data(),
                                       results[1].heads[0].v.data()};

  grpc::ByteBuffer wire = StepResponseWire(5, std::move(results), request);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(wire.Dump(&slices).ok());
  std::set<const void*> shared;
  for (const grpc::Slice& s : slices) {
    if (large.count(s.begin())) shared.insert(s.begin());
  }
  // Every large field is a slice of its own string: not one byte copied.
  EXPECT_EQ(shared, large);
  // The small ones (session ids, lse, tags) travel in the reply's buffer.
  EXPECT_LE(slices.size(), 2 * large.size() + 1);
}

}  // namespace
}  // namespace kvmem
