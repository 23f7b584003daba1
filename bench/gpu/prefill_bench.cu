// Prefill through the cascade on the CUDA backend (specs/cascade.md § 5):
// one attention layer of 32 query / 8 KV heads × 128, bf16, S = 4 sinks,
// a budget S + C·W of 16K or 64K tokens, N tokens in chunks of T = 1024.
// Each chunk is the whole policy step: AttendChunk (factors, tensor-core
// attention over the resident slots and the chunk, the exact-probability
// score pass) and InsertChunk (the cascade insertion, with every evicted
// token's rows handed out as the service would spill them). Spilling to
// storage is not included. Inputs rotate over 16 chunks of random bf16
// (> 100 MB, beyond the 50 MB L2).
//
// --page_tokens=P (default 0: off) adds what the service does after each
// insertion, the refresh of the changed pages' Quest digests, with W
// rounded down to a multiple of P.
//
// Prints a table (median of --repeats runs after a warm-up) and one
// `RESULT tokens=… budget=… cascades=… seconds=…` line per cell for
// prefill_vs_sdpa.py, which measures the PyTorch SDPA baselines in the same
// run. The floor printed here is the tensor-core peak: the attention work
// 6·T·Hq·D·(slots + T/2) flops a chunk (QKᵀ and P·V, then QKᵀ again for
// the scores) over 989 TFLOP/s (H100 SXM dense bf16).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu/bench_util.cuh"
#include "kernels/cascade_policy.h"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/chunk_insert.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_policy.h"
#include "kernels/cuda/device_memory.h"

namespace kvmem::cuda {
namespace {

constexpr int kKvHeads = 8;
constexpr int kGroup = 4;
constexpr int kHeadDim = 128;
constexpr int kSinks = 4;
constexpr int kRotate = 16;  // chunks of inputs, rotated
constexpr double kPeakFlops = 989e12;

std::vector<int64_t> ParseList(const char* flag, int argc, char** argv,
                               const char* fallback) {
  std::string text = fallback;
  const std::string prefix = std::string("--") + flag + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      text = argv[i] + prefix.size();
    }
  }
  std::vector<int64_t> values;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    if (comma > start) {
      values.push_back(std::stoll(text.substr(start, comma - start)));
    }
    start = comma + 1;
  }
  return values;
}

void Fill(const DeviceBuffer& b, uint32_t seed, cudaStream_t stream) {
  FillRandomBf16<<<4096, 256, 0, stream>>>(b.as<uint16_t>(), b.bytes() / 2,
                                           seed);
  BENCH_CHECK(
      CudaStatus(cudaGetLastError(), "FillRandomBf16", __FILE__, __LINE__));
}

// One layer's cascade state for 8 KV-head streams, on the device.
// With page_tokens P > 0, W is rounded down to a multiple of P (as the
// service requires) and the changed pages' Quest digests are refreshed
// after each insertion, as the service does.
struct Layer {
  CascadeParams params;
  int64_t slots = 0;
  int page_tokens = 0;
  DeviceBuffer positions, scores, stored, head, exponent, tokens_seen;
  DeviceBuffer key_rows, value_rows, slot_rows;
  DeviceBuffer digests, policy;  // P > 0: [B, pages, 2, D], [B] pointers

  Layer(int budget, int cascades, int page, cudaStream_t stream)
      : page_tokens(page) {
    params.sinks = kSinks;
    params.cascades = cascades;
    params.window = (budget - kSinks) / cascades;
    if (page > 0) params.window -= params.window % page;
    slots = int64_t{kSinks} + int64_t{cascades} * params.window;
    const size_t b = kKvHeads;
    positions = Check(DeviceBuffer::Allocate(b * slots * 8));
    scores = Check(DeviceBuffer::Allocate(b * slots * 4));
    stored = Check(DeviceBuffer::Allocate(b * cascades * 4));
    head = Check(DeviceBuffer::Allocate(b * cascades * 4));
    exponent = Check(DeviceBuffer::Allocate(b * 8));
    tokens_seen = Check(DeviceBuffer::Allocate(b * 8));
    key_rows = Check(DeviceBuffer::Allocate(b * slots * kHeadDim * 2));
    value_rows = Check(DeviceBuffer::Allocate(b * slots * kHeadDim * 2));
    std::vector<int32_t> rows(b * slots);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = int32_t(i);
    slot_rows = Check(DeviceBuffer::Allocate(rows.size() * 4));
    BENCH_CHECK(
        CopyToDevice(slot_rows.get(), rows.data(), rows.size() * 4, stream));
    if (page > 0) {
      const DecodePolicyShape k = PolicyShape();
      const size_t per_stream = size_t(k.pages()) * 2 * kHeadDim;
      digests = Check(DeviceBuffer::Allocate(b * per_stream * 4));
      std::vector<PolicyStreamPointers> pointers(b);
      for (size_t i = 0; i < b; ++i) {
        pointers[i].positions = positions.as<int64_t>() + i * slots;
        pointers[i].stored = stored.as<int32_t>() + i * cascades;
        pointers[i].head = head.as<int32_t>() + i * cascades;
        pointers[i].slot_rows = slot_rows.as<int32_t>() + i * slots;
        pointers[i].digests = digests.as<float>() + i * per_stream;
      }
      policy = Check(DeviceBuffer::Allocate(b * sizeof(PolicyStreamPointers)));
      BENCH_CHECK(CopyToDevice(policy.get(), pointers.data(),
                               b * sizeof(PolicyStreamPointers), stream));
    }
    BENCH_CHECK(
        CudaStatus(cudaStreamSynchronize(stream), "sync", __FILE__, __LINE__));
  }

  DecodePolicyShape PolicyShape() const {
    DecodePolicyShape k;
    k.streams = kKvHeads;
    k.sinks = params.sinks;
    k.cascades = params.cascades;
    k.window = params.window;
    k.page_tokens = page_tokens;
    k.recent_tokens = page_tokens;
    k.group = kGroup;
    k.head_dim = kHeadDim;
    k.dtype = DType::kBf16;
    return k;
  }

  // An empty stream: no token seen (positions −1, counters 0).
  void Reset(cudaStream_t stream) {
    BENCH_CHECK(FillDevice(positions.get(), 0xff, positions.bytes(), stream));
    BENCH_CHECK(FillDevice(scores.get(), 0, scores.bytes(), stream));
    BENCH_CHECK(FillDevice(stored.get(), 0, stored.bytes(), stream));
    BENCH_CHECK(FillDevice(head.get(), 0, head.bytes(), stream));
    BENCH_CHECK(FillDevice(exponent.get(), 0, exponent.bytes(), stream));
    BENCH_CHECK(FillDevice(tokens_seen.get(), 0, tokens_seen.bytes(), stream));
  }
};

// The chunk inputs (rotated) and every per-chunk output.
struct Buffers {
  DeviceBuffer queries, keys, values;  // [kRotate][T, ·, D]
  DeviceBuffer out, lse, initial_scores, workspace;
  DeviceBuffer evicted_positions, evicted_counts, evicted_keys, evicted_values;
  DeviceBuffer changed_slots, changed_counts, insert_scratch;
};

}  // namespace
}  // namespace kvmem::cuda

int main(int argc, char** argv) {
  using namespace kvmem;
  using namespace kvmem::cuda;
  const std::vector<int64_t> token_counts =
      ParseList("tokens", argc, argv, "131072,524288,1048576");
  const std::vector<int64_t> budgets =
      ParseList("budgets", argc, argv, "16384,65536");
  const std::vector<int64_t> cascade_counts =
      ParseList("cascades", argc, argv, "1,4");
  const int chunk = int(ParseList("chunk", argc, argv, "1024")[0]);
  const int repeats = int(ParseList("repeats", argc, argv, "3")[0]);
  const int page_tokens = int(ParseList("page_tokens", argc, argv, "0")[0]);
  // The attention passes' kernels (ChunkKernels): 0 auto, 1 mma.sync,
  // 2 wgmma; several run one after the other, for a
  // comparison in one run.
  const std::vector<int64_t> kernel_families =
      ParseList("kernels", argc, argv, "0");

  Stream stream = Check(Stream::Create());
  cudaStream_t s = stream.get();
  cudaDeviceProp prop;
  BENCH_CHECK(CudaStatus(cudaGetDeviceProperties(&prop, 0), "props", __FILE__,
                         __LINE__));
  std::printf(
      "# prefill through the cascade: 32 query / 8 KV heads x %d, bf16, "
      "S=%d, T=%d, device %s; median of %d after a warm-up; digests of "
      "pages of %d tokens refreshed: %s\n",
      kHeadDim, kSinks, chunk, prop.name, repeats, page_tokens,
      page_tokens > 0 ? "yes" : "no");
  std::printf("%8s | %7s | %2s | %6s | %10s | %8s | %9s | %10s | %8s\n",
              "tokens", "budget", "C", "W", "seconds", "ms/chunk", "TFLOP/s",
              "floor s", "x floor");

  const size_t row = kHeadDim * 2;
  const size_t q_rows = size_t(chunk) * kKvHeads * kGroup;
  const size_t kv_rows = size_t(chunk) * kKvHeads;
  Buffers buf;
  buf.queries = Check(DeviceBuffer::Allocate(kRotate * q_rows * row));
  buf.keys = Check(DeviceBuffer::Allocate(kRotate * kv_rows * row));
  buf.values = Check(DeviceBuffer::Allocate(kRotate * kv_rows * row));
  Fill(buf.queries, 11, s);
  Fill(buf.keys, 12, s);
  Fill(buf.values, 13, s);
  buf.out = Check(DeviceBuffer::Allocate(q_rows * kHeadDim * 4));
  buf.lse = Check(DeviceBuffer::Allocate(q_rows * 4));
  buf.initial_scores = Check(DeviceBuffer::Allocate(kv_rows * 4));

  for (const int64_t family : kernel_families) {
    const ChunkKernels kernels = static_cast<ChunkKernels>(family);
    const char* kernels_name = kernels == ChunkKernels::kMmaSync ? "mma.sync"
                               : kernels == ChunkKernels::kWarpGroup ? "wgmma"
                                                                     : "auto";
    std::printf("# attention kernels: %s\n", kernels_name);
    for (int64_t budget : budgets) {
      for (int64_t cascades : cascade_counts) {
        Layer layer(int(budget), int(cascades), page_tokens, s);
        ChunkShape shape;
        shape.streams = kKvHeads;
        shape.group = kGroup;
        shape.chunk = chunk;
        shape.params = layer.params;
        shape.dtype = DType::kBf16;
        shape.softmax_scale = 1.0f / std::sqrt(float(kHeadDim));
        shape.kernels = kernels;
        buf.workspace =
            Check(DeviceBuffer::Allocate(ChunkWorkspaceBytes(shape)));
        ChunkInsertShape insert_shape;
        insert_shape.batch.streams = kKvHeads;
        insert_shape.batch.params = layer.params;
        insert_shape.batch.head_dim = kHeadDim;
        insert_shape.batch.dtype = DType::kBf16;
        insert_shape.chunk_tokens = chunk;
        buf.insert_scratch = Check(
            DeviceBuffer::Allocate(ChunkInsertScratchBytes(insert_shape)));
        const size_t max_changed = size_t(chunk) * cascades;
        buf.evicted_positions = Check(DeviceBuffer::Allocate(kv_rows * 8));
        buf.evicted_counts = Check(DeviceBuffer::Allocate(kKvHeads * 4));
        buf.evicted_keys = Check(DeviceBuffer::Allocate(kv_rows * row));
        buf.evicted_values = Check(DeviceBuffer::Allocate(kv_rows * row));
        buf.changed_slots =
            Check(DeviceBuffer::Allocate(size_t(kKvHeads) * max_changed * 4));
        buf.changed_counts = Check(DeviceBuffer::Allocate(kKvHeads * 4));

        // Chunk c of the prompt; `mid` (if any) is recorded between the
        // attention and the insertion.
        auto step = [&](int64_t c, const Event* mid,
                        const ChunkPhaseEvents& phases = {},
                        const Event* inserted = nullptr) {
          {
            const int r = int(c % kRotate);
            ChunkInputs in;
            in.queries = buf.queries.as<uint8_t>() + r * q_rows * row;
            in.keys = buf.keys.as<uint8_t>() + r * kv_rows * row;
            in.values = buf.values.as<uint8_t>() + r * kv_rows * row;
            in.key_rows = layer.key_rows.get();
            in.value_rows = layer.value_rows.get();
            in.slot_rows = layer.slot_rows.as<int32_t>();
            in.positions = layer.positions.as<int64_t>();
            ChunkScoreState state{layer.scores.as<float>(),
                                  layer.exponent.as<int64_t>()};
            ChunkOutputs out{buf.out.as<float>(), buf.lse.as<float>(),
                             buf.initial_scores.as<float>()};
            BENCH_CHECK(AttendChunk(shape, in, state, out, buf.workspace.get(),
                                    buf.workspace.bytes(), s, phases));
            if (mid != nullptr) BENCH_CHECK(mid->Record(s));
            CascadeDeviceState cascade;
            cascade.positions = layer.positions.as<int64_t>();
            cascade.scores = layer.scores.as<float>();
            cascade.stored = layer.stored.as<int32_t>();
            cascade.head = layer.head.as<int32_t>();
            cascade.score_exponent = layer.exponent.as<int64_t>();
            cascade.tokens_seen = layer.tokens_seen.as<int64_t>();
            cascade.key_rows = layer.key_rows.get();
            cascade.value_rows = layer.value_rows.get();
            cascade.slot_rows = layer.slot_rows.as<int32_t>();
            ChunkInsertInputs insert_in;
            insert_in.initial_scores = buf.initial_scores.as<float>();
            insert_in.keys = in.keys;
            insert_in.values = in.values;
            insert_in.stream_stride = kHeadDim;
            insert_in.token_stride = int64_t{kKvHeads} * kHeadDim;
            ChunkInsertOutputs insert_out;
            insert_out.evicted_positions = buf.evicted_positions.as<int64_t>();
            insert_out.evicted_counts = buf.evicted_counts.as<int32_t>();
            insert_out.evicted_keys = buf.evicted_keys.get();
            insert_out.evicted_values = buf.evicted_values.get();
            insert_out.changed_slots = buf.changed_slots.as<int32_t>();
            insert_out.changed_counts = buf.changed_counts.as<int32_t>();
            BENCH_CHECK(InsertChunks(insert_shape, cascade, insert_in,
                                     insert_out, buf.insert_scratch.get(),
                                     buf.insert_scratch.bytes(), s));
            if (inserted != nullptr) BENCH_CHECK(inserted->Record(s));
            if (layer.page_tokens > 0) {
              RefreshDigestsArgs refresh;
              refresh.streams = layer.policy.as<PolicyStreamPointers>();
              refresh.key_rows = layer.key_rows.get();
              refresh.changed_slots = insert_out.changed_slots;
              refresh.changed_counts = insert_out.changed_counts;
              refresh.changed_capacity = int(max_changed);
              BENCH_CHECK(
                  RefreshChangedDigests(layer.PolicyShape(), refresh, s));
            }
          }
        };
        auto run = [&](int64_t tokens) {
          layer.Reset(s);
          for (int64_t c = 0; c < tokens / chunk; ++c) step(c, nullptr);
        };

        Event start = Check(Event::Create(true));
        Event stop = Check(Event::Create(true));
        run(int64_t{chunk} * 8);  // warm-up
        for (int64_t tokens : token_counts) {
          std::vector<float> ms;
          for (int i = 0; i < repeats; ++i) {
            BENCH_CHECK(start.Record(s));
            run(tokens);
            BENCH_CHECK(stop.Record(s));
            BENCH_CHECK(stop.Synchronize());
            ms.push_back(Check(stop.ElapsedMsSince(start)));
          }
          const double seconds = Median(ms) * 1e-3;
          const int64_t chunks = tokens / chunk;
          const double flops = 6.0 * chunk * kKvHeads * kGroup * kHeadDim *
                               (double(layer.slots) + chunk / 2.0) * chunks;
          const double floor = flops / kPeakFlops;
          std::printf(
              "%8lld | %7lld | %2lld | %6d | %10.3f | %8.3f | %9.1f | %10.3f | "
              "%8.2f\n",
              static_cast<long long>(tokens), static_cast<long long>(budget),
              static_cast<long long>(cascades), layer.params.window, seconds,
              seconds * 1e3 / chunks, flops / seconds * 1e-12, floor,
              seconds / floor);
          std::printf(
              "RESULT tokens=%lld budget=%lld cascades=%lld seconds=%.6f "
              "kernels=%s\n",
              static_cast<long long>(tokens), static_cast<long long>(budget),
              static_cast<long long>(cascades), seconds, kernels_name);
          std::fflush(stdout);
        }
        // Where a chunk's time goes once the cache is full: the attention
        // (three launches) and the insertion (two), medians over 32 chunks.
        {
          const int64_t full = (layer.slots + chunk - 1) / chunk + 1;
          run(full * chunk);
          Event mid = Check(Event::Create(true));
          Event factors = Check(Event::Create(true));
          Event forward = Check(Event::Create(true));
          Event inserted = Check(Event::Create(true));
          std::vector<float> factor_ms, forward_ms, score_ms, insert_ms,
              digest_ms;
          for (int64_t c = full; c < full + 32; ++c) {
            BENCH_CHECK(start.Record(s));
            step(c, &mid, {factors.get(), forward.get()}, &inserted);
            BENCH_CHECK(stop.Record(s));
            BENCH_CHECK(stop.Synchronize());
            factor_ms.push_back(Check(factors.ElapsedMsSince(start)));
            forward_ms.push_back(Check(forward.ElapsedMsSince(factors)));
            score_ms.push_back(Check(mid.ElapsedMsSince(forward)));
            insert_ms.push_back(Check(inserted.ElapsedMsSince(mid)));
            digest_ms.push_back(Check(stop.ElapsedMsSince(inserted)));
          }
          const double forward_flops = 4.0 * chunk * kKvHeads * kGroup *
                                       kHeadDim *
                                       (double(layer.slots) + chunk / 2.0);
          std::printf(
              "#   budget %lld C %lld, full cache, ms a chunk: factors %.3f, "
              "forward %.3f (%.0f TFLOP/s), scores %.3f (%.0f TFLOP/s), "
              "insertion %.3f, digests %.3f\n",
              static_cast<long long>(budget), static_cast<long long>(cascades),
              Median(factor_ms), Median(forward_ms),
              forward_flops / (Median(forward_ms) * 1e-3) * 1e-12,
              Median(score_ms),
              forward_flops / 2 / (Median(score_ms) * 1e-3) * 1e-12,
              Median(insert_ms), Median(digest_ms));
        }
      }
    }
  }
  return 0;
}
