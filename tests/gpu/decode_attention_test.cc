// DecodeAttention against cpu::Attend on fresh random inputs: outputs
// (fp32 and dtype), LSE and group-reduced probabilities, for every dtype,
// D 64/128 (vector path) and 8/96 (other lane layouts), G 1/3/4, stream
// lengths 0/1/7/65/4099 in one batch with rows scattered over a pool; and
// the CACHE_RANK rotation inside the kernel against cpu::RotateHead… on
// random positions (half-split and interleaved pairs, whole and partial
// rotary dims, both lane layouts).
#include "kernels/cuda/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cpu/dtype.h"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Close;
using testing::Download;
using testing::Poisoned;
using testing::Tolerance;
using testing::Upload;

struct Case {
  int head_dim;
  DType dtype;
  int group;
  ScoreReduction reduction;
  int rotated_dims = 0;  // > 0: CACHE_RANK rotation of keys and queries
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
};

void RunCase(const Case& c, std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message()
               << "D=" << c.head_dim << " " << testing::DTypeName(c.dtype)
               << " G=" << c.group << " R=" << c.rotated_dims << " pairing "
               << int(c.pairing));
  const std::vector<int> lengths = {1, 7, 0, 65, 4099};
  const int streams = static_cast<int>(lengths.size());
  const int d = c.head_dim;
  const size_t e = DTypeBytes(c.dtype);
  const int pool_rows = std::accumulate(lengths.begin(), lengths.end(), 0) + 13;
  const std::vector<uint8_t> keys =
      testing::RandomRows(size_t(pool_rows) * d, c.dtype, rng);
  const std::vector<uint8_t> values =
      testing::RandomRows(size_t(pool_rows) * d, c.dtype, rng);
  const std::vector<uint8_t> queries = testing::RandomRows(
      size_t(streams) * c.group * d, c.dtype, rng, -2.0f, 2.0f);
  // Rows: a random permutation of the pool, cut per stream, with gaps.
  std::vector<int32_t> order(pool_rows);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> rows;
  std::vector<int32_t> begin(streams);
  std::vector<int32_t> count(streams);
  int next = 0;
  for (int s = 0; s < streams; ++s) {
    rows.resize(rows.size() + 2, -1);  // gap: never read
    begin[s] = static_cast<int32_t>(rows.size());
    count[s] = lengths[s];
    for (int t = 0; t < lengths[s]; ++t) rows.push_back(order[next++]);
  }
  rows.resize(rows.size() + 3, -1);
  // CACHE_RANK: a random position a row (up to 10^5, angles of many turns)
  // and a stream; Llama 3 frequencies.
  const bool rotary = c.rotated_dims > 0;
  std::vector<double> inv_freq;
  std::vector<int32_t> row_positions(rows.size(), 0);
  std::vector<int32_t> query_positions(streams, 0);
  if (rotary) {
    RotaryParams params;
    params.base = 500000.0;
    params.rotary_dims = c.rotated_dims;
    params.pairing = c.pairing;
    params.scaling = RotaryScaling::kLlama3;
    params.factor = 8.0;
    absl::StatusOr<std::vector<double>> freq =
        RotaryInverseFrequencies(params, d);
    ASSERT_TRUE(freq.ok()) << freq.status();
    inv_freq = *freq;
    std::uniform_int_distribution<int32_t> position(0, 100000);
    for (int32_t& p : row_positions) p = position(rng);
    for (int32_t& p : query_positions) p = position(rng);
  }

  Stream stream = testing::MakeStream();
  DeviceBuffer d_keys = Upload(keys, stream.get());
  DeviceBuffer d_values = Upload(values, stream.get());
  DeviceBuffer d_queries = Upload(queries, stream.get());
  DeviceBuffer d_rows = Upload(rows, stream.get());
  DeviceBuffer d_begin = Upload(begin, stream.get());
  DeviceBuffer d_count = Upload(count, stream.get());
  DeviceBuffer d_row_positions = Upload(row_positions, stream.get());
  DeviceBuffer d_query_positions = Upload(query_positions, stream.get());
  DeviceBuffer d_freq =
      Upload(rotary ? inv_freq : std::vector<double>{0.0}, stream.get());
  const size_t out_elems = size_t(streams) * c.group * d;
  DeviceBuffer d_out32 = Poisoned<float>(out_elems, stream.get());
  DeviceBuffer d_out = Poisoned<uint8_t>(out_elems * e, stream.get());
  DeviceBuffer d_lse = Poisoned<float>(size_t(streams) * c.group, stream.get());
  DeviceBuffer d_probs = Poisoned<float>(rows.size(), stream.get());

  DecodeAttentionShape shape;
  shape.streams = streams;
  shape.group = c.group;
  shape.head_dim = d;
  shape.dtype = c.dtype;
  shape.max_rows_per_stream = 4099;
  shape.rows_capacity = static_cast<int64_t>(rows.size());
  shape.want_probs = true;
  absl::StatusOr<DecodeAttentionPlan> plan = PlanDecodeAttention(shape, 132);
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::StatusOr<DeviceBuffer> workspace =
      DeviceBuffer::Allocate(plan->workspace_bytes);
  ASSERT_TRUE(workspace.ok()) << workspace.status();
  DecodeAttentionInputs in;
  in.queries = d_queries.get();
  in.key_rows = d_keys.get();
  in.value_rows = d_values.get();
  in.rows = d_rows.as<int32_t>();
  in.row_begin = d_begin.as<int32_t>();
  in.row_count = d_count.as<int32_t>();
  in.softmax_scale = 1.0f / std::sqrt(static_cast<float>(d));
  in.reduction = c.reduction;
  if (rotary) {
    in.row_positions = d_row_positions.as<int32_t>();
    in.query_positions = d_query_positions.as<int32_t>();
    in.inv_freq = d_freq.as<double>();
    in.rotated_dims = c.rotated_dims;
    in.pairing = c.pairing;
  }
  DecodeAttentionOutputs out;
  out.out_fp32 = d_out32.as<float>();
  out.out = d_out.get();
  out.lse = d_lse.as<float>();
  out.reduced_probs = d_probs.as<float>();
  ASSERT_TRUE(DecodeAttention(shape, in, out, *plan, workspace->get(),
                              workspace->bytes(), stream.get())
                  .ok());
  const std::vector<float> out32 = Download<float>(d_out32, out_elems, stream);
  const std::vector<uint8_t> out_dtype =
      Download<uint8_t>(d_out, out_elems * e, stream);
  const std::vector<float> lse =
      Download<float>(d_lse, size_t(streams) * c.group, stream);
  const std::vector<float> probs =
      Download<float>(d_probs, rows.size(), stream);

  const double tol = Tolerance(c.dtype);
  const size_t row_bytes = size_t(d) * e;
  for (int s = 0; s < streams; ++s) {
    const int n = lengths[s];
    std::vector<uint8_t> k(size_t(n) * row_bytes);
    std::vector<uint8_t> v(size_t(n) * row_bytes);
    for (int t = 0; t < n; ++t) {
      const size_t row = size_t(rows[begin[s] + t]);
      std::copy_n(keys.data() + row * row_bytes, row_bytes,
                  k.data() + t * row_bytes);
      std::copy_n(values.data() + row * row_bytes, row_bytes,
                  v.data() + t * row_bytes);
    }
    std::vector<float> ref_out(size_t(c.group) * d);
    std::vector<float> ref_lse(c.group);
    std::vector<float> ref_probs(size_t(c.group) * n);
    HeadRowsView q_view{
        absl::MakeConstSpan(queries.data() + size_t(s) * c.group * row_bytes,
                            c.group * row_bytes),
        c.dtype};
    HeadRowsView k_view{absl::MakeConstSpan(k), c.dtype};
    // CACHE_RANK: the oracle rotates fp32 copies (kernels/rotary.h).
    std::vector<float> q_rotated, k_rotated;
    if (rotary) {
      q_rotated.resize(size_t(c.group) * d);
      cpu::LoadFloats(q_view.bytes.data(), c.dtype, absl::MakeSpan(q_rotated));
      for (int g = 0; g < c.group; ++g) {
        cpu::RotateHeadWithFrequencies(
            inv_freq, c.pairing, query_positions[s],
            absl::MakeSpan(&q_rotated[size_t(g) * d], size_t(d)));
      }
      k_rotated.resize(size_t(n) * d);
      cpu::LoadFloats(k.data(), c.dtype, absl::MakeSpan(k_rotated));
      for (int t = 0; t < n; ++t) {
        cpu::RotateHeadWithFrequencies(
            inv_freq, c.pairing, row_positions[begin[s] + t],
            absl::MakeSpan(&k_rotated[size_t(t) * d], size_t(d)));
      }
      q_view = HeadRowsView::Fp32(q_rotated);
      k_view = HeadRowsView::Fp32(k_rotated);
    }
    ASSERT_TRUE(cpu::Attend(q_view, k_view, {absl::MakeConstSpan(v), c.dtype},
                            d, in.softmax_scale, absl::MakeSpan(ref_out),
                            absl::MakeSpan(ref_lse), absl::MakeSpan(ref_probs))
                    .ok());
    int bad = 0;
    for (int g = 0; g < c.group; ++g) {
      const float got_lse = lse[size_t(s) * c.group + g];
      if (!Close(got_lse, ref_lse[g], tol) && ++bad <= 5) {
        ADD_FAILURE() << "stream " << s << " lse[" << g << "] " << got_lse
                      << " vs " << ref_lse[g];
      }
      for (int i = 0; i < d; ++i) {
        const size_t at = (size_t(s) * c.group + g) * d + i;
        const float ref = ref_out[size_t(g) * d + i];
        const float got = out32[at];
        const float got_dtype =
            LoadElement(out_dtype.data(), c.dtype, int64_t(at));
        // The dtype output is the fp32 output rounded once more.
        if ((!Close(got, ref, tol) || !Close(got_dtype, ref, 2 * tol)) &&
            ++bad <= 5) {
          ADD_FAILURE() << "stream " << s << " out[" << g << "][" << i << "] "
                        << got << " / " << got_dtype << " vs " << ref;
        }
      }
    }
    for (int t = 0; t < n; ++t) {
      const float ref =
          ReduceGroupProbability(ref_probs.data() + t, c.group, n, c.reduction);
      const float got = probs[begin[s] + t];
      if (!Close(got, ref, tol) && ++bad <= 5) {
        ADD_FAILURE() << "stream " << s << " prob[" << t << "] " << got
                      << " vs " << ref;
      }
    }
    EXPECT_EQ(bad, 0) << "stream " << s << " (" << n << " rows)";
  }
  // Gaps between the streams' ranges are never written.
  for (int s = 0; s < streams; ++s) {
    EXPECT_TRUE(std::isnan(probs[begin[s] - 1])) << "gap before stream " << s;
  }
}

TEST(DecodeAttentionTest, MatchesCpuAcrossShapes) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  for (int d : {64, 128}) {
    for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
      for (int g : {1, 4}) {
        RunCase(
            {d, t, g, g == 1 ? ScoreReduction::kMax : ScoreReduction::kMean},
            rng);
        RunCase({d, t, g, ScoreReduction::kMax}, rng);
      }
    }
  }
}

TEST(DecodeAttentionTest, OtherLaneLayoutsAndGroups) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  RunCase({8, DType::kBf16, 3, ScoreReduction::kMax}, rng);    // 1 lane a row
  RunCase({96, DType::kFp16, 3, ScoreReduction::kMean}, rng);  // strided
  RunCase({4, DType::kFp32, 8, ScoreReduction::kMax}, rng);    // golden size
  RunCase({256, DType::kBf16, 8, ScoreReduction::kMax}, rng);  // largest
}

// D 128 in bf16/fp16 runs its own kernel (warps with their own softmax,
// a reduce-scatter of the G dot products): every group size it handles.
TEST(DecodeAttentionTest, WarpKernelGroups) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  RunCase({128, DType::kBf16, 2, ScoreReduction::kMean}, rng);
  RunCase({128, DType::kFp16, 3, ScoreReduction::kMax}, rng);
  RunCase({128, DType::kBf16, 8, ScoreReduction::kMean}, rng);
  RunCase({128, DType::kFp16, 8, ScoreReduction::kMax}, rng);
  RunCase({128, DType::kBf16, 5, ScoreReduction::kMax}, rng);
}

// CACHE_RANK: keys and queries rotated inside the kernel, each to its own
// position, agree with the oracle's fp32 rotation then attention.
TEST(DecodeAttentionTest, RotatesKeysAndQueriesLikeTheCpu) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  using P = RotaryPairing;
  const ScoreReduction kMax = ScoreReduction::kMax;
  // Vector layouts: a pair across two lanes (half-split), in one lane
  // (interleaved), partial dims.
  RunCase({128, DType::kBf16, 4, kMax, 128, P::kHalfSplit}, rng);
  RunCase({128, DType::kFp16, 8, ScoreReduction::kMean, 128, P::kHalfSplit},
          rng);
  RunCase({64, DType::kFp32, 1, kMax, 64, P::kInterleaved}, rng);
  RunCase({128, DType::kBf16, 2, kMax, 32, P::kHalfSplit}, rng);
  RunCase({64, DType::kFp32, 4, kMax, 24, P::kHalfSplit}, rng);
  // Strided layout (D 96 in 16-bit): half-split across slots of one lane,
  // interleaved across neighbouring lanes.
  RunCase({96, DType::kBf16, 4, kMax, 64, P::kHalfSplit}, rng);
  RunCase({96, DType::kFp16, 3, kMax, 96, P::kInterleaved}, rng);
}

TEST(DecodeAttentionTest, RejectsRotaryPairsTheLanesCannotReach) {
  // Half-split pairs 5 channels apart cut through a lane's 8 channels.
  EXPECT_FALSE(DecodeAttentionRotarySupported(128, DType::kBf16, 10,
                                              RotaryPairing::kHalfSplit));
  EXPECT_FALSE(DecodeAttentionRotarySupported(128, DType::kBf16, 130,
                                              RotaryPairing::kHalfSplit));
  EXPECT_FALSE(DecodeAttentionRotarySupported(96, DType::kBf16, 32,
                                              RotaryPairing::kHalfSplit));
  EXPECT_TRUE(DecodeAttentionRotarySupported(96, DType::kBf16, 32,
                                             RotaryPairing::kInterleaved));
  EXPECT_TRUE(DecodeAttentionRotarySupported(128, DType::kBf16, 128,
                                             RotaryPairing::kHalfSplit));
}

TEST(DecodeAttentionTest, RejectsBadArguments) {
  DecodeAttentionShape shape;
  shape.streams = 1;
  shape.group = 9;
  shape.head_dim = 128;
  shape.max_rows_per_stream = 16;
  EXPECT_EQ(PlanDecodeAttention(shape, 132).status().code(),
            absl::StatusCode::kInvalidArgument);
  shape.group = 4;
  absl::StatusOr<DecodeAttentionPlan> plan = PlanDecodeAttention(shape, 132);
  ASSERT_TRUE(plan.ok());
  DecodeAttentionInputs in;  // null pointers
  DecodeAttentionOutputs out;
  EXPECT_EQ(DecodeAttention(shape, in, out, *plan, nullptr, 0, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem::cuda
