// The Step reply's encoding: StepResponseWire (service/grpc/step_wire.h,
// the server's) against protobuf's serialization of the same reply, the
// baseline, in the same run; and a copy of the reply's tensor bytes, what
// protobuf pays on top of the tags and varints. Shapes of the loopback
// bench: 32 query / 8 KV heads × 128, bf16, budget 2048; ATTEND replies an
// [Hq, D] output and [Hq] LSEs an entry, FETCH 2048 positions, keys and
// values a KV head.
//   build/release/bench/kvmem_reply_wire_bench
#include <cstring>
#include <random>

#include "benchmark/benchmark.h"
#include "service/grpc/convert.h"
#include "service/grpc/step_wire.h"

namespace kvmem {
namespace {

constexpr int kQueryHeads = 32, kKvHeads = 8, kHeadDim = 128, kBudget = 2048;

std::string Bytes(size_t n, std::mt19937_64& rng) {
  std::string s(n, '\0');
  for (size_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t x = rng();
    std::memcpy(&s[i], &x, 8);
  }
  return s;
}

// One reply of `entries` entries; FETCH positions ascend from 4096 down in
// a 96K window (three varint bytes each, as at 96K resident).
void MakeReply(bool fetch, int entries, std::vector<StepEntryResult>* results,
               StepRequestView* request) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < entries; ++i) {
    StepEntryView e;
    e.session_id = "bench-" + std::to_string(i);
    request->entries.push_back(e);
    StepEntryResult r;
    r.next_position = 98305;
    r.durable_position = 98000;
    if (fetch) {
      for (int h = 0; h < kKvHeads; ++h) {
        FetchedHead head;
        for (int t = 0; t < kBudget; ++t) head.positions.push_back(47 * t + 3);
        head.k = Bytes(size_t(kBudget) * kHeadDim * 2, rng);
        head.v = Bytes(size_t(kBudget) * kHeadDim * 2, rng);
        r.heads.push_back(std::move(head));
      }
    } else {
      r.output = Bytes(size_t(kQueryHeads) * kHeadDim * 2, rng);
      r.lse = Bytes(size_t(kQueryHeads) * 4, rng);
    }
    results->push_back(std::move(r));
  }
}

size_t TensorBytes(const std::vector<StepEntryResult>& results) {
  size_t n = 0;
  for (const StepEntryResult& r : results) {
    n += r.output.size() + r.lse.size();
    for (const FetchedHead& h : r.heads) n += h.k.size() + h.v.size();
  }
  return n;
}

// Each iteration encodes a fresh copy of the results, as the server does;
// making the copy and freeing the last encoding are outside the timing
// (on a VM, page faults and munmap would swamp what is measured).
void BM_Reply(benchmark::State& state) {
  const bool fetch = state.range(0) != 0;
  const int entries = int(state.range(1));
  const int how = int(state.range(2));  // 0 wire, 1 protobuf, 2 copy
  std::vector<StepEntryResult> results;
  StepRequestView request;
  MakeReply(fetch, entries, &results, &request);
  const size_t tensor_bytes = TensorBytes(results);
  std::vector<StepEntryResult> fresh;
  grpc::ByteBuffer wire;
  std::string out;
  out.reserve(tensor_bytes + (size_t(1) << 20));
  for (auto _ : state) {
    state.PauseTiming();
    wire.Clear();
    out.clear();
    fresh = results;
    state.ResumeTiming();
    if (how == 0) {
      wire = StepResponseWire(7, std::move(fresh), request);
      benchmark::DoNotOptimize(wire.Length());
    } else if (how == 1) {
      v1::StepResponse proto;
      StepResultsToProto(std::move(fresh), request, &proto);
      proto.set_request_id(7);
      proto.SerializeToString(&out);
      benchmark::DoNotOptimize(out.data());
      state.PauseTiming();  // the message's strings freed untimed
      proto.Clear();
      state.ResumeTiming();
    } else {
      for (const StepEntryResult& r : fresh) {
        for (const FetchedHead& h : r.heads) {
          out.append(h.k);
          out.append(h.v);
        }
        out.append(r.output);
        out.append(r.lse);
      }
      benchmark::DoNotOptimize(out.data());
    }
  }
  state.SetLabel(std::string(fetch ? "fetch" : "attend") + " b" +
                 std::to_string(entries) +
                 (how == 0   ? " StepResponseWire"
                  : how == 1 ? " protobuf (baseline)"
                             : " tensor bytes copied (floor of protobuf's "
                               "extra)"));
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(tensor_bytes));
}
BENCHMARK(BM_Reply)
    ->ArgsProduct({{0}, {1, 8, 32}, {0, 1, 2}})
    // FETCH at batch 32 is 512 MB a reply: left out (copying it per
    // iteration measures the machine's page faults, not the encoding).
    ->ArgsProduct({{1}, {1, 8}, {0, 1, 2}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace kvmem

BENCHMARK_MAIN();
