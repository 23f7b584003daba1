// WireStepRequest against protobuf's own parser: on random requests (fields
// repeated and out of order, unknown fields and groups among them) and on
// random corruptions of them, it accepts exactly what protobuf accepts and
// reads the same values; its tensors are views into the received bytes.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvmem/v1/kvmem.pb.h"
#include "service/grpc/convert.h"
#include "service/grpc/step_wire.h"
#include "tests/random_bytes.h"

namespace kvmem {
namespace {

using testing::RandomBytes;

void PutVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(char(v | 0x80));
    v >>= 7;
  }
  out->push_back(char(v));
}

// An unknown field of any wire type (a group with fields inside, too).
std::string UnknownField(std::mt19937_64& rng, int depth = 0) {
  std::string out;
  const uint32_t field = 7 + uint32_t(rng() % 200);
  const int type = int(rng() % 5);
  const int wire = type == 4 ? 3 : (type == 3 ? 5 : type);
  PutVarint(&out, (uint64_t(field) << 3) | uint64_t(wire));
  switch (wire) {
    case 0:
      PutVarint(&out, rng() >> (rng() % 64));
      break;
    case 1:
      out += RandomBytes(rng, 8);
      break;
    case 2: {
      const std::string payload = RandomBytes(rng, rng() % 20);
      PutVarint(&out, payload.size());
      out += payload;
      break;
    }
    case 3:
      if (depth < 2) out += UnknownField(rng, depth + 1);
      PutVarint(&out, (uint64_t(field) << 3) | 4);
      break;
    default:
      out += RandomBytes(rng, 4);
  }
  return out;
}

// A serialized StepRequest: protobuf's bytes of one or two messages back to
// back (the second's scalars win, its entries follow), unknown fields
// between, and entries with unknown fields of their own.
std::string RandomRequest(std::mt19937_64& rng, size_t max_tensor) {
  std::string wire;
  const int parts = 1 + int(rng() % 2);
  for (int part = 0; part < parts; ++part) {
    v1::StepRequest r;
    if (rng() % 4)
      r.set_layer(int32_t(rng() % 3 == 0 ? -int(rng() % 9) : int(rng() % 80)));
    if (rng() % 4) r.set_mode(v1::StepMode(rng() % 5));
    if (rng() % 2) r.set_request_id(rng() >> (rng() % 64));
    const int entries = int(rng() % 4);
    for (int i = 0; i < entries; ++i) {
      v1::StepEntry* e = r.add_entries();
      if (rng() % 5)
        e->set_session_id("s-" + std::to_string(rng() % 1000) +
                          (rng() % 7 == 0 ? "é" : ""));
      if (rng() % 3)
        e->set_position(int64_t(rng() >> (rng() % 64)) *
                        (rng() % 5 == 0 ? -1 : 1));
      if (rng() % 3) e->set_num_tokens(int32_t(rng() % 40) - 2);
      if (rng() % 4) e->set_q(RandomBytes(rng, rng() % (max_tensor + 1)));
      if (rng() % 4) e->set_k(RandomBytes(rng, rng() % (max_tensor + 1)));
      if (rng() % 4) e->set_v(RandomBytes(rng, rng() % (max_tensor + 1)));
    }
    std::string bytes = r.SerializeAsString();
    if (rng() % 3 == 0) {
      // An entry with an unknown field inside, appended as field 3.
      v1::StepEntry e;
      e.set_session_id("u-" + std::to_string(rng() % 100));
      std::string entry = e.SerializeAsString() + UnknownField(rng);
      PutVarint(&bytes, (3 << 3) | 2);
      PutVarint(&bytes, entry.size());
      bytes += entry;
    }
    wire += bytes;
    if (rng() % 2) wire += UnknownField(rng);
  }
  return wire;
}

// One of: a byte changed, bytes cut off, random bytes put in, bytes taken
// out; a few at once now and then.
std::string Corrupt(std::mt19937_64& rng, std::string s) {
  const int edits = 1 + int(rng() % 3 == 0 ? rng() % 4 : 0);
  for (int n = 0; n < edits && !s.empty(); ++n) {
    const size_t at = size_t(rng() % s.size());
    switch (rng() % 4) {
      case 0:
        s[at] = char(rng());
        break;
      case 1:
        s.resize(at);
        break;
      case 2:
        s.insert(at, RandomBytes(rng, 1 + rng() % 4));
        break;
      default:
        s.erase(at, 1 + rng() % 4);
    }
  }
  return s;
}

// The first 256 bytes, for a failure's message.
std::string Hex(const std::string& bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < bytes.size() && i < 256; ++i) {
    out += kDigits[uint8_t(bytes[i]) >> 4];
    out += kDigits[uint8_t(bytes[i]) & 15];
  }
  return out;
}

// Both parsers on `bytes`: the same answer, and the same values when both
// accept.
void ExpectSameAsProtobuf(const std::string& bytes, uint64_t seed,
                          int case_number) {
  v1::StepRequest typed;
  const bool protobuf_ok = typed.ParseFromString(bytes);
  WireStepRequest wire;
  const bool wire_ok = wire.Parse(bytes).ok();
  ASSERT_EQ(wire_ok, protobuf_ok)
      << "case " << case_number << " seed " << seed << " bytes " << bytes.size()
      << ": " << Hex(bytes);
  if (!wire_ok) {
    EXPECT_TRUE(wire.entries().empty());
    return;
  }
  ASSERT_EQ(wire.request_id(), typed.request_id()) << "case " << case_number;
  ASSERT_EQ(wire.layer(), typed.layer()) << "case " << case_number;
  ASSERT_EQ(wire.mode(), int32_t(typed.mode())) << "case " << case_number;
  ASSERT_EQ(wire.entries().size(), size_t(typed.entries_size()))
      << "case " << case_number;
  int64_t tensor_bytes = 0;
  for (size_t i = 0; i < wire.entries().size(); ++i) {
    const WireStepEntry& w = wire.entries()[i];
    const v1::StepEntry& t = typed.entries(int(i));
    ASSERT_EQ(w.session_id, t.session_id()) << "case " << case_number;
    ASSERT_EQ(w.position, t.position()) << "case " << case_number;
    ASSERT_EQ(w.num_tokens, t.num_tokens()) << "case " << case_number;
    ASSERT_EQ(w.q, t.q()) << "case " << case_number;
    ASSERT_EQ(w.k, t.k()) << "case " << case_number;
    ASSERT_EQ(w.v, t.v()) << "case " << case_number;
    tensor_bytes += int64_t(t.q().size() + t.k().size() + t.v().size());
  }
  EXPECT_EQ(wire.tensor_bytes(), tensor_bytes);
  // The engine's views: the same as those of the typed message.
  StepRequestView from_wire, from_typed;
  const absl::Status a = StepRequestFromWire(wire, &from_wire);
  const absl::Status b = StepRequestFromProto(typed, &from_typed);
  ASSERT_EQ(a, b) << "case " << case_number;
  if (!a.ok()) return;
  EXPECT_EQ(from_wire.mode, from_typed.mode);
  EXPECT_EQ(from_wire.layer, from_typed.layer);
  ASSERT_EQ(from_wire.entries.size(), from_typed.entries.size());
  for (size_t i = 0; i < from_wire.entries.size(); ++i) {
    EXPECT_EQ(from_wire.entries[i].session_id,
              from_typed.entries[i].session_id);
    EXPECT_EQ(from_wire.entries[i].q, from_typed.entries[i].q);
  }
}

TEST(WireStepRequestTest, RandomRequestsReadAsProtobufReadsThem) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  for (int c = 0; c < 2000; ++c) {
    ExpectSameAsProtobuf(RandomRequest(rng, 300), seed, c);
    if (HasFatalFailure()) return;
  }
}

TEST(WireStepRequestTest,
     CorruptedBytesAreRefusedExactlyWhereProtobufRefusesThem) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  int refused = 0;
  for (int c = 0; c < 20000; ++c) {
    const std::string bytes = Corrupt(rng, RandomRequest(rng, 24));
    v1::StepRequest typed;
    refused += typed.ParseFromString(bytes) ? 0 : 1;
    ExpectSameAsProtobuf(bytes, seed, c);
    if (HasFatalFailure()) return;
  }
  // Both outcomes were exercised many times.
  EXPECT_GT(refused, 2000);
  EXPECT_LT(refused, 18000);
}

TEST(WireStepRequestTest, EdgeCasesOfTheWireFormat) {
  auto check = [](const std::string& bytes, bool accepted) {
    v1::StepRequest typed;
    EXPECT_EQ(typed.ParseFromString(bytes), accepted) << "protobuf itself";
    ExpectSameAsProtobuf(bytes, 0, 0);
  };
  std::string s;
  // layer = -1: a 10-byte varint, truncated to int32.
  s.clear();
  PutVarint(&s, 1 << 3);
  PutVarint(&s, uint64_t(-1));
  check(s, true);
  // An 11-byte varint.
  s.assign("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12);
  check(s, false);
  // Tag 0, and an end-group tag with no start.
  check(std::string("\x00", 1), false);
  check(std::string("\x0c", 1), false);
  // A group skipped whole; one left open; one closed by another number.
  check(std::string("\x0b\x10\x05\x0c", 4), true);
  check(std::string("\x0b\x10\x05", 3), false);
  check(std::string("\x0b\x10\x05\x14", 4), false);
  // A known field of another wire type is an unknown field.
  check(std::string("\x0d\x01\x02\x03\x04", 5), true);
  // An entry whose session id is not UTF-8 (a lone continuation byte, an
  // overlong slash, a surrogate), and one that is (a 4-byte character).
  for (const std::string& id :
       {std::string("\x80", 1), std::string("\xc0\xaf", 2),
        std::string("\xed\xa0\x80", 3), std::string("\xf0\x9f\x98\x80", 4)}) {
    std::string entry = "\x0a" + std::string(1, char(id.size())) + id;
    check("\x1a" + std::string(1, char(entry.size())) + entry, id.size() == 4);
  }
  // A length past the end.
  check(std::string("\x1a\x05\x0a\x01", 4), false);
}

TEST(WireStepRequestTest, TensorsAreViewsIntoTheReceivedBytes) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  v1::StepRequest r;
  r.set_layer(3);
  r.set_mode(v1::STEP_MODE_ATTEND);
  for (int i = 0; i < 4; ++i) {
    v1::StepEntry* e = r.add_entries();
    e->set_session_id("s" + std::to_string(i));
    e->set_position(i);
    e->set_num_tokens(1);
    e->set_q(RandomBytes(rng, 8192));
    e->set_k(RandomBytes(rng, 2048));
    e->set_v(RandomBytes(rng, 2048));
  }
  const std::string bytes = r.SerializeAsString();
  // One slice: the views point into it.
  grpc::Slice one(bytes);
  grpc::ByteBuffer single(&one, 1);
  WireStepRequest wire;
  ASSERT_TRUE(wire.Parse(single).ok());
  const char* begin = reinterpret_cast<const char*>(one.begin());
  for (const WireStepEntry& e : wire.entries()) {
    EXPECT_GE(e.q.data(), begin);
    EXPECT_LE(e.q.data() + e.q.size(), begin + one.size());
  }
  ExpectSameAsProtobuf(bytes, seed, 0);
  // Random slices: gathered once, read alike; a reused reader forgets the
  // previous request.
  for (int round = 0; round < 20; ++round) {
    std::vector<grpc::Slice> slices;
    for (size_t at = 0; at < bytes.size();) {
      const size_t n = std::min(bytes.size() - at, size_t(1 + rng() % 5000));
      slices.emplace_back(bytes.data() + at, n);
      at += n;
    }
    grpc::ByteBuffer several(slices.data(), slices.size());
    ASSERT_TRUE(wire.Parse(several).ok()) << "round " << round;
    ASSERT_EQ(wire.entries().size(), 4u);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(wire.entries()[size_t(i)].q, r.entries(i).q());
      EXPECT_EQ(wire.entries()[size_t(i)].v, r.entries(i).v());
    }
    EXPECT_EQ(wire.layer(), 3);
  }
  // Junk after good bytes: refused, and nothing of the last request kept.
  grpc::Slice junk(std::string("\x1a\x7f", 2));
  grpc::ByteBuffer bad(&junk, 1);
  EXPECT_EQ(wire.Parse(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(wire.entries().empty());
  EXPECT_EQ(wire.layer(), 0);
}

}  // namespace
}  // namespace kvmem
