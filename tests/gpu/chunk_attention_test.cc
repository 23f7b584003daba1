// AttendChunk (kernels/cuda/chunk_attention.h) against the CPU oracles:
// cpu::AttendCausalChunk over each stream's occupied slots and the chunk,
// then CascadeStream::UpdateScores with the group-reduced probabilities.
// Histories come from the CPU cascade (empty, partly filled and overfull
// streams in one launch); empty slots' pool rows hold NaN, so a kernel that
// lets a masked row into its sums fails. Outputs are poisoned first.
// Tolerances: out within the dtype's STYLE.md tolerance (the kernel rounds
// p to the dtype before P·V); lse and scores within 1e-4 (fp32 sums in
// another order); the score exponent exactly.
#include "kernels/cuda/chunk_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cascade_policy.h"
#include "kernels/policy_math.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Download;
using testing::Poisoned;
using testing::RandomRows;
using testing::Upload;

constexpr int kD = kChunkHeadDim;
constexpr int kMaxReported = 10;

struct ChunkConfig {
  std::string name;
  DType dtype = DType::kBf16;
  int group = 4;
  int chunk = 16;
  CascadeParams params;
  ScoreReduction reduction = ScoreReduction::kMax;
  std::vector<int> histories;    // tokens each stream has seen; B = size
  bool stream_pointers = false;  // ChunkScoreState::streams, not flat arrays
  bool attend = true;            // false: no queries (APPEND)
  ChunkKernels kernels = ChunkKernels::kAuto;
  // Chunk token j's key drawn from ±(1 + key_growth·j), not ±1: logits
  // climb across the chunk's tiles.
  float key_growth = 0.0f;
};

// A stream's history through the CPU oracle: decode steps with random
// probabilities and rows.
CascadeStream MakeHistory(const ChunkConfig& c, int tokens, std::mt19937& rng) {
  const int row_bytes = kD * DTypeBytes(c.dtype);
  absl::StatusOr<CascadeStream> made =
      CascadeStream::Create(c.params, row_bytes);
  EXPECT_TRUE(made.ok()) << made.status();
  CascadeStream stream = std::move(*made);
  std::uniform_real_distribution<float> prob(0.0f, 1.0f);
  std::vector<float> probs(stream.num_slots());
  for (int t = 0; t < tokens; ++t) {
    for (float& p : probs) p = prob(rng);
    std::vector<float> self = {prob(rng)};
    std::vector<float> initial(1);
    EXPECT_TRUE(
        stream.UpdateScores(1, probs, self, absl::MakeSpan(initial)).ok());
    std::vector<uint8_t> key = RandomRows(kD, c.dtype, rng);
    std::vector<uint8_t> value = RandomRows(kD, c.dtype, rng);
    InsertResult result;
    EXPECT_TRUE(stream.InsertTokens(t, 1, key, value, initial, &result).ok());
  }
  return stream;
}

void RunKernels(const ChunkConfig& c) {
  SCOPED_TRACE(c.name);
  const uint32_t seed = testing::FreshSeed();
  std::mt19937 rng(seed);
  const int streams = int(c.histories.size());
  const int chunk = c.chunk;
  const int group = c.group;
  const int64_t slots =
      int64_t{c.params.sinks} + int64_t{c.params.cascades} * c.params.window;
  const size_t elem = size_t(DTypeBytes(c.dtype));
  const size_t row_bytes = kD * elem;
  const float scale = 1.0f / std::sqrt(float(kD));

  std::vector<CascadeStream> cpu;
  for (int h : c.histories) cpu.push_back(MakeHistory(c, h, rng));

  // Pool: every slot of every stream on a shuffled row, plus spare rows;
  // rows of empty slots and spare rows hold NaN.
  const int64_t pool_rows = streams * slots + 7;
  std::vector<int32_t> order(pool_rows);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<uint8_t> key_pool(pool_rows * row_bytes, 0xff);
  std::vector<uint8_t> value_pool(pool_rows * row_bytes, 0xff);
  std::vector<int32_t> slot_rows(streams * slots);
  std::vector<int64_t> positions(streams * slots);
  std::vector<float> scores(streams * slots);
  std::vector<int64_t> exponents(streams);
  for (int b = 0; b < streams; ++b) {
    for (int64_t s = 0; s < slots; ++s) {
      const int32_t row = order[b * slots + s];
      slot_rows[b * slots + s] = row;
      positions[b * slots + s] = cpu[b].slot_position(int(s));
      scores[b * slots + s] = cpu[b].slot_score(int(s));
      if (cpu[b].slot_position(int(s)) >= 0) {
        std::copy_n(cpu[b].key_row(int(s)).data(), row_bytes,
                    key_pool.data() + row * row_bytes);
        std::copy_n(cpu[b].value_row(int(s)).data(), row_bytes,
                    value_pool.data() + row * row_bytes);
      }
    }
    exponents[b] = cpu[b].score_exponent();
  }
  // The chunk: queries [T, B·G, D], keys/values [T, B, D].
  const std::vector<uint8_t> queries =
      RandomRows(size_t(chunk) * streams * group * kD, c.dtype, rng);
  std::vector<uint8_t> keys;
  for (int t = 0; t < chunk; ++t) {
    const float bound = 1.0f + c.key_growth * float(t);
    const std::vector<uint8_t> token =
        RandomRows(size_t(streams) * kD, c.dtype, rng, -bound, bound);
    keys.insert(keys.end(), token.begin(), token.end());
  }
  const std::vector<uint8_t> values =
      RandomRows(size_t(chunk) * streams * kD, c.dtype, rng);

  cuda::Stream stream = testing::MakeStream();
  DeviceBuffer d_queries = Upload(queries, stream.get());
  DeviceBuffer d_keys = Upload(keys, stream.get());
  DeviceBuffer d_values = Upload(values, stream.get());
  DeviceBuffer d_key_pool = Upload(key_pool, stream.get());
  DeviceBuffer d_value_pool = Upload(value_pool, stream.get());
  DeviceBuffer d_slot_rows = Upload(slot_rows, stream.get());
  DeviceBuffer d_positions = Upload(positions, stream.get());
  DeviceBuffer d_scores = Upload(scores, stream.get());
  DeviceBuffer d_exponents = Upload(exponents, stream.get());
  const size_t query_rows = size_t(chunk) * streams * group;
  DeviceBuffer d_out = Poisoned<float>(query_rows * kD, stream.get());
  DeviceBuffer d_lse = Poisoned<float>(query_rows, stream.get());
  DeviceBuffer d_initial =
      Poisoned<float>(size_t(streams) * chunk, stream.get());

  ChunkShape shape;
  shape.streams = streams;
  shape.group = group;
  shape.chunk = chunk;
  shape.params = c.params;
  shape.dtype = c.dtype;
  shape.reduction = c.reduction;
  shape.softmax_scale = scale;
  shape.kernels = c.kernels;
  absl::StatusOr<DeviceBuffer> workspace =
      DeviceBuffer::Allocate(ChunkWorkspaceBytes(shape));
  ASSERT_TRUE(workspace.ok()) << workspace.status();
  ChunkInputs in;
  in.queries = c.attend ? d_queries.get() : nullptr;
  in.keys = d_keys.get();
  in.values = d_values.get();
  in.key_rows = d_key_pool.get();
  in.value_rows = d_value_pool.get();
  in.slot_rows = static_cast<const int32_t*>(d_slot_rows.get());
  in.positions = static_cast<const int64_t*>(d_positions.get());
  ChunkScoreState state{static_cast<float*>(d_scores.get()),
                        static_cast<int64_t*>(d_exponents.get())};
  // The same arrays through per-stream pointers, with the flat pointers
  // null, so that a kernel reading the flat layout by mistake faults.
  DeviceBuffer d_streams;
  if (c.stream_pointers) {
    std::vector<CascadeStreamPointers> pointers(streams);
    for (int b = 0; b < streams; ++b) {
      CascadeStreamPointers& p = pointers[b];
      p.positions = static_cast<int64_t*>(d_positions.get()) + b * slots;
      p.scores = static_cast<float*>(d_scores.get()) + b * slots;
      p.slot_rows = static_cast<const int32_t*>(d_slot_rows.get()) + b * slots;
      p.score_exponent = static_cast<int64_t*>(d_exponents.get()) + b;
    }
    d_streams = Upload(pointers, stream.get());
    state = ChunkScoreState();
    state.streams = static_cast<const CascadeStreamPointers*>(d_streams.get());
    in.positions = nullptr;
    in.slot_rows = nullptr;
  }
  ChunkOutputs out{static_cast<float*>(d_out.get()),
                   static_cast<float*>(d_lse.get()),
                   static_cast<float*>(d_initial.get())};
  ASSERT_TRUE(AttendChunk(shape, in, state, out, workspace->get(),
                          ChunkWorkspaceBytes(shape), stream.get())
                  .ok());
  const std::vector<float> got_out =
      Download<float>(d_out, query_rows * kD, stream);
  const std::vector<float> got_lse = Download<float>(d_lse, query_rows, stream);
  const std::vector<float> got_initial =
      Download<float>(d_initial, size_t(streams) * chunk, stream);
  const std::vector<float> got_scores =
      Download<float>(d_scores, size_t(streams) * slots, stream);
  const std::vector<int64_t> got_exponents =
      Download<int64_t>(d_exponents, streams, stream);

  int failures = 0;
  auto report = [&](bool ok, const std::string& what) {
    if (!ok && ++failures <= kMaxReported) ADD_FAILURE() << what;
  };
  const double out_tol = testing::Tolerance(c.dtype);
  // Stream b's scores after the step: cascade slots' u within `tol` of the
  // CPU's, sinks and empty slots with their bits kept; n exactly.
  auto compare_scores = [&](int b, double tol) {
    for (int s = 0; s < slots; ++s) {
      const float got = got_scores[size_t(b) * slots + s];
      const bool scored = s >= c.params.sinks && cpu[b].slot_position(s) >= 0;
      report(scored ? testing::Close(got, cpu[b].slot_score(s), tol)
                    : std::memcmp(&got, &scores[size_t(b) * slots + s],
                                  sizeof(float)) == 0,
             absl::StrCat("stream ", b, " slot ", s, " u ", got, " want ",
                          cpu[b].slot_score(s)));
    }
    EXPECT_EQ(got_exponents[b], cpu[b].score_exponent()) << "stream " << b;
  };
  for (int b = 0; b < streams; ++b) {
    // The CPU oracle: the occupied slots in slot order, then the chunk.
    std::vector<int> occupied;
    for (int s = 0; s < slots; ++s) {
      if (cpu[b].slot_position(s) >= 0) occupied.push_back(s);
    }
    const int64_t n = int64_t(occupied.size()) + chunk;
    std::vector<uint8_t> q_b, k_b, v_b;
    for (int t = 0; t < chunk; ++t) {
      const size_t first = (size_t(t) * streams + b) * group * row_bytes;
      q_b.insert(q_b.end(), queries.begin() + first,
                 queries.begin() + first + group * row_bytes);
    }
    for (int s : occupied) {
      k_b.insert(k_b.end(), cpu[b].key_row(s).begin(), cpu[b].key_row(s).end());
      v_b.insert(v_b.end(), cpu[b].value_row(s).begin(),
                 cpu[b].value_row(s).end());
    }
    for (int t = 0; t < chunk; ++t) {
      const size_t first = (size_t(t) * streams + b) * row_bytes;
      k_b.insert(k_b.end(), keys.begin() + first,
                 keys.begin() + first + row_bytes);
      v_b.insert(v_b.end(), values.begin() + first,
                 values.begin() + first + row_bytes);
    }
    if (!c.attend) {
      // UpdateScores without probabilities; only scores can be compared.
      std::vector<float> want_initial(chunk);
      ASSERT_TRUE(cpu[b]
                      .UpdateScores(chunk, {}, {}, absl::MakeSpan(want_initial))
                      .ok());
      for (int t = 0; t < chunk; ++t) {
        report(got_initial[size_t(b) * chunk + t] == 0.0f &&
                   want_initial[t] == 0.0f,
               absl::StrCat("stream ", b, " initial score ", t, " ",
                            got_initial[size_t(b) * chunk + t]));
      }
      compare_scores(b, 1e-5);
      continue;
    }
    std::vector<float> want_out(size_t(chunk) * group * kD);
    std::vector<float> want_lse(size_t(chunk) * group);
    std::vector<float> probs(size_t(chunk) * group * n);
    ASSERT_TRUE(cpu::AttendCausalChunk(
                    {q_b, c.dtype}, {k_b, c.dtype}, {v_b, c.dtype}, kD, group,
                    int64_t(occupied.size()), scale, absl::MakeSpan(want_out),
                    absl::MakeSpan(want_lse), absl::MakeSpan(probs))
                    .ok());
    std::vector<float> slot_probs(size_t(chunk) * slots, 0.0f);
    std::vector<float> self_probs(size_t(chunk) * chunk, 0.0f);
    for (int t = 0; t < chunk; ++t) {
      const float* row = probs.data() + size_t(t) * group * n;
      for (size_t i = 0; i < occupied.size(); ++i) {
        slot_probs[size_t(t) * slots + occupied[i]] =
            ReduceGroupProbability(row + i, group, n, c.reduction);
      }
      for (int i = 0; i <= t; ++i) {
        self_probs[size_t(t) * chunk + i] = ReduceGroupProbability(
            row + occupied.size() + i, group, n, c.reduction);
      }
    }
    std::vector<float> want_initial(chunk);
    ASSERT_TRUE(cpu[b]
                    .UpdateScores(chunk, slot_probs, self_probs,
                                  absl::MakeSpan(want_initial))
                    .ok());

    for (int t = 0; t < chunk; ++t) {
      for (int g = 0; g < group; ++g) {
        const size_t got_row = (size_t(t) * streams + b) * group + g;
        const size_t want_row = size_t(t) * group + g;
        report(testing::Close(got_lse[got_row], want_lse[want_row], 1e-4),
               absl::StrCat("stream ", b, " token ", t, " head ", g, " lse ",
                            got_lse[got_row], " want ", want_lse[want_row]));
        for (int d = 0; d < kD; ++d) {
          const float got = got_out[got_row * kD + d];
          const float want = want_out[want_row * kD + d];
          report(testing::Close(got, want, out_tol),
                 absl::StrCat("stream ", b, " token ", t, " head ", g, " out[",
                              d, "] ", got, " want ", want));
        }
      }
      report(testing::Close(got_initial[size_t(b) * chunk + t], want_initial[t],
                            1e-4),
             absl::StrCat("stream ", b, " initial score ", t, " ",
                          got_initial[size_t(b) * chunk + t], " want ",
                          want_initial[t]));
    }
    compare_scores(b, 1e-4);
  }
  EXPECT_EQ(failures, 0) << "seed " << seed;
}

// Each configuration on both kernel families (chunk_attention.h), from
// fresh seeds.
void RunConfig(ChunkConfig c) {
  for (ChunkKernels kernels :
       {ChunkKernels::kMmaSync, ChunkKernels::kWarpGroup}) {
    SCOPED_TRACE(kernels == ChunkKernels::kMmaSync ? "mma.sync" : "wgmma");
    c.kernels = kernels;
    RunKernels(c);
  }
}

CascadeParams Params(int sinks, int cascades, int window, double beta) {
  CascadeParams p;
  p.sinks = sinks;
  p.cascades = cascades;
  p.window = window;
  p.beta = beta;
  return p;
}

TEST(ChunkAttention, MatchesTheCpuOracleOnEmptyPartialAndFullCascades) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c;
  c.name = "bf16 G4 S4 C2 W64 T100";
  c.params = Params(4, 2, 64, 0.9999999);
  c.chunk = 100;
  c.histories = {0, 37, 500};
  RunConfig(c);
}

TEST(ChunkAttention, MatchesTheCpuOracleInFp16WithMeanReductionPerStream) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c;
  c.name = "fp16 G8 S2 C3 W40 T37 mean";
  c.dtype = DType::kFp16;
  c.group = 8;
  c.params = Params(2, 3, 40, 0.9999999);
  c.chunk = 37;
  c.reduction = ScoreReduction::kMean;
  c.histories = {130, 9};
  c.stream_pointers = true;
  RunConfig(c);
}

TEST(ChunkAttention, MatchesTheCpuOracleForOneTokenAndOneHead) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c;
  c.name = "bf16 G1 S0 C1 W128 T1";
  c.group = 1;
  c.params = Params(0, 1, 128, 0.9999999);
  c.chunk = 1;
  c.histories = {300, 5};
  RunConfig(c);
}

TEST(ChunkAttention, RenormalisesMidChunkLikeTheCpuOracle) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c;
  c.name = "bf16 G4 beta 1/2 T150 (mid-step renormalisation)";
  c.params = Params(4, 2, 32, 0.5);
  c.chunk = 150;
  c.histories = {80, 3};
  RunConfig(c);
}

// Streams over many key tiles: bf16 G4 with an overfull and a partial
// cascade; fp16 G2 under MEAN with three histories.
ChunkConfig ManyTilesBf16() {
  ChunkConfig c;
  c.name = "bf16 G4 S4 C4 W256 T300";
  c.params = Params(4, 4, 256, 0.9999999);
  c.chunk = 300;
  c.histories = {2000, 100};
  return c;
}
ChunkConfig ManyTilesFp16() {
  ChunkConfig c;
  c.name = "fp16 G2 S3 C3 W300 T200 mean";
  c.dtype = DType::kFp16;
  c.group = 2;
  c.params = Params(3, 3, 300, 0.9999999);
  c.chunk = 200;
  c.reduction = ScoreReduction::kMean;
  c.histories = {1500, 40, 700};
  return c;
}

TEST(ChunkAttention, MatchesTheCpuOracleOverManyTiles) {
  KVMEM_REQUIRE_DEVICE();
  RunConfig(ManyTilesBf16());
}

TEST(ChunkAttention, MatchesTheCpuOracleOverManyTilesInFp16WithGroupsOf2) {
  KVMEM_REQUIRE_DEVICE();
  RunConfig(ManyTilesFp16());
}

// Logits that climb by more than 2^8 between tiles move the forward pass's
// running max (which moves only past that slack: SoftmaxTile), rescaling o
// and Σp; between moves p exceeds 1 (up to 2^8, in bf16/fp16 for P·V).
// Uniform ±1 rows never leave the first tile's max that far behind.
TEST(ChunkAttention, MatchesTheCpuOracleWhenLogitsClimbAcrossTiles) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c = ManyTilesBf16();
  c.name += ", chunk keys growing 0.1 a token";
  c.key_growth = 0.1f;
  RunConfig(c);
  c = ManyTilesFp16();
  c.name += ", chunk keys growing 0.2 a token";
  c.key_growth = 0.2f;
  RunConfig(c);
}

TEST(ChunkAttention, WithoutQueriesOnlyRescalesLikeTheCpuOracle) {
  KVMEM_REQUIRE_DEVICE();
  ChunkConfig c;
  c.name = "no queries, beta 1/2 T100 (renormalisations)";
  c.params = Params(4, 2, 32, 0.5);
  c.chunk = 100;
  c.histories = {80, 3, 0};
  c.attend = false;
  RunConfig(c);
  c.name = "no queries, beta near 1";
  c.params = Params(4, 2, 64, 0.9999999);
  c.chunk = 64;
  c.histories = {500, 10};
  RunConfig(c);
}

// The launcher validates before touching the device, so this runs anywhere.
TEST(ChunkAttention, RefusesBadShapesNamingTheField) {
  ChunkShape shape;
  shape.streams = 1;
  shape.group = 4;
  shape.chunk = 8;
  shape.params = Params(4, 1, 64, 0.9999999);
  shape.softmax_scale = 0.1f;
  // Queries are set (never read: validation fails first), so that the
  // attention fields are checked; every other pointer is null.
  const uint8_t never_read = 0;
  ChunkInputs in;
  in.queries = &never_read;
  ChunkScoreState state;
  ChunkOutputs out;
  auto refused = [&](const ChunkShape& s, const std::string& field) {
    const absl::Status status =
        AttendChunk(s, in, state, out, nullptr, 0, nullptr);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(std::string(status.message()).find(field), std::string::npos)
        << status;
  };
  ChunkShape bad = shape;
  bad.group = 3;
  refused(bad, "group");
  bad = shape;
  bad.chunk = 0;
  refused(bad, "chunk");
  bad = shape;
  bad.dtype = DType::kFp32;
  refused(bad, "dtype");
  bad = shape;
  bad.softmax_scale = -1.0f;
  refused(bad, "softmax_scale");
  bad = shape;
  bad.params.window = 0;
  refused(bad, "window");
  bad = shape;
  bad.kernels = static_cast<ChunkKernels>(7);
  refused(bad, "kernels");
  refused(shape, "keys");  // the first pointer a step with queries needs
  in.queries = nullptr;    // without queries: the state comes first
  refused(shape, "slot_rows");
}

}  // namespace
}  // namespace kvmem::cuda
