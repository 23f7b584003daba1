// The decode step of specs/quest.md §6 on the CUDA backend: Quest page
// scores over every candidate page, the greedy selection with row
// compaction, and split-K attention over the selected rows, for one layer
// of a batch of sessions (8 KV heads × 128, 32 query heads, bf16, B 2048,
// P 16). Timed with CUDA events after a warm-up; the inputs of small cells
// are rotated over copies so that every step reads more than the L2 holds.
// Prints `workload | measured | floor | x floor`, floor = the bytes the
// step must read (§6) over the device-to-device copy bandwidth measured in
// the same run. "attention, CACHE_RANK" cells time the attention with keys
// and queries rotated inside the kernel, against the same floor.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/gpu/bench_util.cuh"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/page_digests.h"
#include "kernels/cuda/page_scores.h"
#include "kernels/cuda/select_pages.h"

namespace kvmem::cuda {
namespace {

constexpr int kHeads = 8;
constexpr int kGroup = 4;
constexpr int kHeadDim = 128;
constexpr int kPage = 16;
constexpr int kBudget = 2048;
constexpr int kMaxBatch = 32;
constexpr int kMaxResident = 65536;
constexpr size_t kRowBytes = kHeadDim * 2;          // bf16
constexpr size_t kDigestBytes = 2 * kHeadDim * 2;   // bf16 [2, D]
constexpr size_t kRotateBytes = size_t{256} << 20;  // > 5× the 50 MB L2
constexpr int kWarmup = 5;
constexpr int kTimed = 50;

// Everything allocated once, for the largest cell.
struct Device {
  Stream stream;
  DeviceBuffer keys, values, digests, queries;
  int multiprocessors = 0;
  double copy_bytes_per_s = 0;  // measured: bytes read + written per second
  std::string name;
};

Device* device = nullptr;

void Fill(const DeviceBuffer& b, uint32_t seed) {
  FillRandomBf16<<<4096, 256, 0, device->stream.get()>>>(b.as<uint16_t>(),
                                                         b.bytes() / 2, seed);
  BENCH_CHECK(
      CudaStatus(cudaGetLastError(), "FillRandomBf16", __FILE__, __LINE__));
}

void SetUpDevice() {
  device = new Device;
  device->stream = Check(Stream::Create());
  int dev = 0;
  BENCH_CHECK(
      CudaStatus(cudaGetDevice(&dev), "cudaGetDevice", __FILE__, __LINE__));
  cudaDeviceProp prop;
  BENCH_CHECK(CudaStatus(cudaGetDeviceProperties(&prop, dev), "props", __FILE__,
                         __LINE__));
  device->name = prop.name;
  device->multiprocessors = prop.multiProcessorCount;
  const size_t rows = size_t(kMaxBatch) * kHeads * kMaxResident;
  device->keys = Check(DeviceBuffer::Allocate(rows * kRowBytes));
  device->values = Check(DeviceBuffer::Allocate(rows * kRowBytes));
  device->digests = Check(DeviceBuffer::Allocate(rows / kPage * kDigestBytes));
  device->queries = Check(
      DeviceBuffer::Allocate(size_t(kMaxBatch) * kHeads * kGroup * kRowBytes));
  // Copy bandwidth: 2 GiB from keys into values, median of 10.
  const size_t copy = size_t{2} << 30;
  Event start = Check(Event::Create(true));
  Event stop = Check(Event::Create(true));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    BENCH_CHECK(start.Record(device->stream.get()));
    BENCH_CHECK(CudaStatus(
        cudaMemcpyAsync(device->values.get(), device->keys.get(), copy,
                        cudaMemcpyDeviceToDevice, device->stream.get()),
        "copy", __FILE__, __LINE__));
    BENCH_CHECK(stop.Record(device->stream.get()));
    BENCH_CHECK(stop.Synchronize());
    if (i >= 2) ms.push_back(Check(stop.ElapsedMsSince(start)));
  }
  device->copy_bytes_per_s = 2.0 * copy / (Median(ms) * 1e-3);
  Fill(device->keys, 1);
  Fill(device->values, 2);
  Fill(device->queries, 3);
  // Digests of every page (ABSOLUTE, bf16: exact min/max), one launch per
  // 1M pages.
  const int pages = int(rows / kPage);
  std::vector<int32_t> first(pages), occupied(pages, kPage), index(pages);
  for (int p = 0; p < pages; ++p) first[p] = p * kPage, index[p] = p;
  DeviceBuffer d_first = Check(DeviceBuffer::Allocate(pages * 4));
  DeviceBuffer d_occ = Check(DeviceBuffer::Allocate(pages * 4));
  DeviceBuffer d_index = Check(DeviceBuffer::Allocate(pages * 4));
  BENCH_CHECK(CopyToDevice(d_first.get(), first.data(), pages * 4,
                           device->stream.get()));
  BENCH_CHECK(CopyToDevice(d_occ.get(), occupied.data(), pages * 4,
                           device->stream.get()));
  BENCH_CHECK(CopyToDevice(d_index.get(), index.data(), pages * 4,
                           device->stream.get()));
  PageDigestShape shape;
  shape.pages = pages;
  shape.head_dim = kHeadDim;
  shape.key_dtype = DType::kBf16;
  shape.digest_dtype = DType::kBf16;
  BENCH_CHECK(ComputePageDigests(shape,
                                 {device->keys.get(), d_first.as<int32_t>(),
                                  d_occ.as<int32_t>(), d_index.as<int32_t>()},
                                 device->digests.get(), device->stream.get()));
  BENCH_CHECK(device->stream.Synchronize());
}

struct Row {
  std::string workload;
  double measured_us;
  double floor_us;
  double bytes;
};
std::vector<Row>* table = nullptr;

template <typename T>
DeviceBuffer UploadVector(const std::vector<T>& v) {
  DeviceBuffer b = Check(DeviceBuffer::Allocate(v.size() * sizeof(T)));
  BENCH_CHECK(CopyToDevice(b.get(), v.data(), v.size() * sizeof(T),
                           device->stream.get()));
  return b;
}

// What part of the step a cell times.
// kRotaryAttentionOnly: the attention of a CACHE_RANK step, keys and queries
// rotated inside the kernel (Llama 3 frequencies, half-split pairs over all
// 128 channels; a row's position is its index, the query's the budget).
enum Part {
  kStep = 0,
  kScoresOnly = 1,
  kSelectOnly = 2,
  kAttentionOnly = 3,
  kRotaryAttentionOnly = 4,
};

void BM_DecodeStep(benchmark::State& state) {
  const int batch = int(state.range(0));
  const int resident = int(state.range(1));
  const Part part = Part(state.range(2));
  // Attention splits a stream; 0: PlanDecodeAttention's choice.
  const int splits = state.range(3);
  const int streams = batch * kHeads;
  const int pages = resident / kPage;  // Np (resident is a multiple of P)
  const int candidates = pages - 1;    // the last page is always in
  const int last = resident - candidates * kPage;  // ℓ
  const size_t stream_rows = size_t(streams) * resident;
  const double ws_bytes = double(stream_rows) * kRowBytes * 2 +
                          double(stream_rows / kPage) * kDigestBytes;
  int copies = int(std::max(1.0, kRotateBytes / ws_bytes + 1));
  const size_t pool_rows = size_t(kMaxBatch) * kHeads * kMaxResident;
  copies = int(std::min<size_t>(copies, pool_rows / stream_rows));

  // Per copy: candidate pages, their first rows, the always-in rows.
  std::vector<std::vector<int32_t>> cand_pages(copies), cand_first(copies),
      always_rows(copies);
  std::vector<int32_t> cand_begin(streams), cand_count(streams, candidates);
  std::vector<int32_t> fresh(size_t(streams) * candidates, kPage);
  std::vector<uint64_t> masks(size_t(streams) * candidates,
                              (uint64_t{1} << kPage) - 1);
  std::vector<int32_t> always_in(streams, last), budget(streams, kBudget);
  std::vector<int32_t> always_begin(streams), rows_begin(streams);
  for (int s = 0; s < streams; ++s) {
    cand_begin[s] = s * candidates;
    always_begin[s] = s * last;
    rows_begin[s] = s * kBudget;
  }
  for (int c = 0; c < copies; ++c) {
    for (int s = 0; s < streams; ++s) {
      const int64_t base = (int64_t(c) * streams + s) * resident;
      for (int p = 0; p < candidates; ++p) {
        cand_pages[c].push_back(int32_t(base / kPage + p));
        cand_first[c].push_back(int32_t(base + int64_t(p) * kPage));
      }
      for (int j = 0; j < last; ++j)
        always_rows[c].push_back(int32_t(base + candidates * kPage + j));
    }
  }
  std::vector<DeviceBuffer> d_pages, d_first, d_always;
  for (int c = 0; c < copies; ++c) {
    d_pages.push_back(UploadVector(cand_pages[c]));
    d_first.push_back(UploadVector(cand_first[c]));
    d_always.push_back(UploadVector(always_rows[c]));
  }
  DeviceBuffer d_begin = UploadVector(cand_begin),
               d_count = UploadVector(cand_count);
  DeviceBuffer d_fresh = UploadVector(fresh), d_masks = UploadVector(masks);
  DeviceBuffer d_always_in = UploadVector(always_in),
               d_budget = UploadVector(budget);
  DeviceBuffer d_always_begin = UploadVector(always_begin),
               d_rows_begin = UploadVector(rows_begin);
  DeviceBuffer d_scores = Check(DeviceBuffer::Allocate(fresh.size() * 4));
  DeviceBuffer d_selected = Check(DeviceBuffer::Allocate(fresh.size()));
  DeviceBuffer d_tokens = Check(DeviceBuffer::Allocate(streams * 4));
  DeviceBuffer d_rows =
      Check(DeviceBuffer::Allocate(size_t(streams) * kBudget * 4));
  DeviceBuffer d_rows_count = Check(DeviceBuffer::Allocate(streams * 4));
  DeviceBuffer d_out =
      Check(DeviceBuffer::Allocate(size_t(streams) * kGroup * kRowBytes));
  DeviceBuffer d_lse =
      Check(DeviceBuffer::Allocate(size_t(streams) * kGroup * 4));

  PageScoreShape score_shape;
  score_shape.streams = streams;
  score_shape.group = kGroup;
  score_shape.head_dim = kHeadDim;
  score_shape.query_dtype = DType::kBf16;
  score_shape.digest_dtype = DType::kBf16;
  score_shape.max_candidates_per_stream = candidates;
  SelectPagesShape select_shape;
  select_shape.streams = streams;
  select_shape.max_candidates_per_stream = candidates;
  select_shape.compact_rows = true;
  DecodeAttentionShape attn_shape;
  attn_shape.streams = streams;
  attn_shape.group = kGroup;
  attn_shape.head_dim = kHeadDim;
  attn_shape.dtype = DType::kBf16;
  attn_shape.max_rows_per_stream = kBudget;
  attn_shape.rows_capacity = int64_t(streams) * kBudget;
  const DecodeAttentionPlan plan =
      splits > 0
          ? Check(PlanDecodeAttentionSplits(attn_shape, splits))
          : Check(PlanDecodeAttention(attn_shape, device->multiprocessors));
  DeviceBuffer workspace = Check(DeviceBuffer::Allocate(plan.workspace_bytes));
  cudaStream_t stream = device->stream.get();
  const bool rotary = part == kRotaryAttentionOnly;
  std::vector<int32_t> row_positions(size_t(streams) * kBudget);
  for (size_t i = 0; i < row_positions.size(); ++i) {
    row_positions[i] = int32_t(i % kBudget);
  }
  RotaryParams rotary_params;
  rotary_params.base = 500000.0;
  rotary_params.scaling = RotaryScaling::kLlama3;
  rotary_params.factor = 8.0;
  DeviceBuffer d_row_positions = UploadVector(row_positions);
  DeviceBuffer d_query_positions =
      UploadVector(std::vector<int32_t>(streams, kBudget));
  DeviceBuffer d_inv_freq =
      UploadVector(Check(RotaryInverseFrequencies(rotary_params, kHeadDim)));

  auto run = [&](int c, bool scores, bool select, bool attend) {
    if (scores) {
      PageScoreInputs in{device->queries.get(), device->digests.get(),
                         d_pages[c].as<int32_t>(), d_begin.as<int32_t>(),
                         d_count.as<int32_t>()};
      BENCH_CHECK(ScorePages(score_shape, in, d_scores.as<float>(), stream));
    }
    if (select) {
      SelectPagesInputs in{d_scores.as<float>(),      d_fresh.as<int32_t>(),
                           d_begin.as<int32_t>(),     d_count.as<int32_t>(),
                           d_always_in.as<int32_t>(), d_budget.as<int32_t>()};
      SelectPagesOutputs out{d_selected.as<uint8_t>(), d_tokens.as<int32_t>(),
                             nullptr};
      SelectPagesRows rows{
          d_always[c].as<int32_t>(),  d_always_begin.as<int32_t>(),
          d_first[c].as<int32_t>(),   d_masks.as<uint64_t>(),
          d_rows_begin.as<int32_t>(), d_rows.as<int32_t>(),
          d_rows_count.as<int32_t>()};
      BENCH_CHECK(SelectPages(select_shape, in, out, rows, stream));
    }
    if (attend) {
      DecodeAttentionInputs in;
      in.queries = device->queries.get();
      in.key_rows = device->keys.get();
      in.value_rows = device->values.get();
      in.rows = d_rows.as<int32_t>();
      in.row_begin = d_rows_begin.as<int32_t>();
      in.row_count = d_rows_count.as<int32_t>();
      in.softmax_scale = 0.08838834764831845f;  // 1/√128
      if (rotary) {
        in.row_positions = d_row_positions.as<int32_t>();
        in.query_positions = d_query_positions.as<int32_t>();
        in.inv_freq = d_inv_freq.as<double>();
        in.rotated_dims = kHeadDim;
      }
      DecodeAttentionOutputs out;
      out.out = d_out.get();
      out.lse = d_lse.as<float>();
      BENCH_CHECK(DecodeAttention(attn_shape, in, out, plan, workspace.get(),
                                  workspace.bytes(), stream));
    }
  };
  // Warm-up, which also leaves valid rows for the parts timed alone.
  for (int i = 0; i < kWarmup; ++i) {
    for (int c = 0; c < copies; ++c) run(c, true, true, true);
  }
  BENCH_CHECK(device->stream.Synchronize());
  Event start = Check(Event::Create(true));
  Event stop = Check(Event::Create(true));
  std::vector<float> times_ms;
  int c = 0;
  for (auto _ : state) {
    c = (c + 1) % copies;
    const bool attention_only =
        part == kAttentionOnly || part == kRotaryAttentionOnly;
    if (attention_only || part == kSelectOnly) {
      run(c, part == kSelectOnly, true, false);  // rows for this copy
    }
    BENCH_CHECK(start.Record(stream));
    run(c, part == kStep || part == kScoresOnly,
        part == kStep || part == kSelectOnly, part == kStep || attention_only);
    BENCH_CHECK(stop.Record(stream));
    BENCH_CHECK(stop.Synchronize());
    const float ms = Check(stop.ElapsedMsSince(start));
    times_ms.push_back(ms);
    state.SetIterationTime(ms * 1e-3);
  }
  // Bytes the step must read (§6): digests of the candidates, K and V of
  // the selected tokens, per KV head.
  const double digest_bytes =
      double(batch) * candidates * kHeads * kDigestBytes;
  const double kv_bytes = double(batch) * kBudget * kHeads * 2 * kRowBytes;
  const double bytes = part == kScoresOnly   ? digest_bytes
                       : part == kSelectOnly ? 0.0
                       : part == kAttentionOnly || part == kRotaryAttentionOnly
                           ? kv_bytes
                           : digest_bytes + kv_bytes;
  const double median_us = Median(times_ms) * 1e3;
  state.counters["median_us"] = median_us;
  state.counters["bytes"] = bytes;
  static const char* kPartNames[] = {"step", "  scores only", "  select only",
                                     "  attention only",
                                     "  attention, CACHE_RANK"};
  char name[128];
  char split_note[32] = "";
  if (splits > 0)
    std::snprintf(split_note, sizeof(split_note), ", %d splits", splits);
  std::snprintf(name, sizeof(name), "%s b%d x %dK%s", kPartNames[part], batch,
                resident / 1024, split_note);
  table->push_back(
      {name, median_us, bytes / device->copy_bytes_per_s * 1e6, bytes});
}

void Register() {
  for (int resident : {4096, 32768, 65536}) {
    for (int batch : {1, 8, 32}) {
      benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
          ->Args({batch, resident, kStep, 0})
          ->UseManualTime()
          ->Iterations(kTimed)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (int part : {kScoresOnly, kSelectOnly, kAttentionOnly}) {
    for (int resident : {4096, 65536}) {
      benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
          ->Args({32, resident, part, 0})
          ->UseManualTime()
          ->Iterations(kTimed)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (int batch : {1, 8, 32}) {
    benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
        ->Args({batch, 4096, kRotaryAttentionOnly, 0})
        ->UseManualTime()
        ->Iterations(kTimed)
        ->Unit(benchmark::kMicrosecond);
  }
  // The planner's split count against others, where the grid's last wave
  // is fuller or emptier (--benchmark_filter=BM_DecodeStep/32/4096/3/).
  for (int splits : {3, 4, 5, 6, 7, 8, 10, 12, 14, 16}) {
    benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
        ->Args({32, 4096, kAttentionOnly, splits})
        ->UseManualTime()
        ->Iterations(kTimed)
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace
}  // namespace kvmem::cuda

int main(int argc, char** argv) {
  using namespace kvmem::cuda;
  benchmark::Initialize(&argc, argv);
  SetUpDevice();
  table = new std::vector<Row>;
  Register();
  benchmark::RunSpecifiedBenchmarks();
  std::printf(
      "\ndevice: %s, %d SMs; measured D2D copy %.2f TB/s (read + write)\n",
      device->name.c_str(), device->multiprocessors,
      device->copy_bytes_per_s / 1e12);
  std::printf(
      "decode step, one layer: 8 KV heads x 128, G 4, bf16, B 2048, P 16; "
      "median of %d after %d warm-up\n",
      kTimed, kWarmup);
  std::printf("%-26s | %12s | %10s | %9s | %12s\n", "workload", "measured us",
              "floor us", "x floor", "bytes");
  for (const Row& r : *table) {
    if (r.bytes > 0) {
      std::printf("%-26s | %12.1f | %10.1f | %9.2f | %12.0f\n",
                  r.workload.c_str(), r.measured_us, r.floor_us,
                  r.measured_us / r.floor_us, r.bytes);
    } else {
      std::printf("%-26s | %12.1f | %10s | %9s | %12s\n", r.workload.c_str(),
                  r.measured_us, "-", "-", "-");
    }
  }
  benchmark::Shutdown();
  return 0;
}
