// The host side of device-owned layers (docs/ARCHITECTURE.md), which CI
// can check without a GPU: a stream that adopts a cascade handed back by
// the device (AdoptCascade) rebuilds the same digests and steps on exactly
// as the stream it came from, a bad snapshot changes nothing, and tokens
// the device evicted (SpillEvicted) fill and seal pages as the host's own
// evictions do; and a CACHE_RANK step given its attention from outside
// (as the CUDA backend computes it, keys and queries rotated to
// RotaryPositions) answers and moves on as the stream's own. Fresh random
// inputs, seed printed.
#include "service/engine/stream_state.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cpu/dtype.h"
#include "kernels/dtype.h"
#include "kernels/page_digest.h"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"

namespace kvmem {
namespace {

SessionConfig Config(bool recall) {
  SessionConfig c;
  c.tenant = "t";
  c.session_id = "s";
  c.shape.layers = 1;
  c.shape.kv_heads = 1;
  c.shape.query_heads = 2;
  c.shape.head_dim = 64;
  c.shape.dtype = DType::kBf16;
  c.policy.sinks = 4;
  c.policy.cascades = 2;
  c.policy.window = 32;
  c.policy.page_tokens = 8;
  c.policy.recent_tokens = 8;
  c.policy.step_budget_tokens = 40;  // sparse once past 39 tokens
  c.policy.ema_beta = 0.99;
  c.policy.recall = recall;
  c.policy.dense_layers = {};
  return c;
}

class StreamStateTest : public ::testing::Test {
 protected:
  StreamStateTest() : seed_(std::random_device{}()), rng_(seed_) {
    std::printf("seed %u\n", seed_);
  }

  // n values rounded to bf16: as floats, and as bytes in *bytes.
  std::vector<float> Random(size_t n, std::string* bytes) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    bytes->assign(n * 2, '\0');
    std::vector<float> values(n);
    for (size_t i = 0; i < n; ++i) {
      StoreElement(bytes->data(), DType::kBf16, int64_t(i), normal(rng_));
      values[i] = LoadElement(bytes->data(), DType::kBf16, int64_t(i));
    }
    return values;
  }

  // One decode step (ATTEND) of `stream` at its next position; its output.
  StreamStepOutput Step(StreamState* stream, const std::vector<float>& q,
                        const std::string& k, const std::string& v) {
    StreamStepInput in;
    in.position = stream->tokens_seen();
    in.num_tokens = 1;
    in.queries = q;
    in.keys = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(k.data()), k.size());
    in.values = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(v.data()), v.size());
    absl::StatusOr<StreamSelection> sel = stream->Select(false, in);
    EXPECT_TRUE(sel.ok()) << sel.status();
    StreamStepOutput out;
    EXPECT_TRUE(stream->Apply(StepMode::kAttend, in, *sel, {}, &out).ok());
    return out;
  }

  uint32_t seed_;
  std::mt19937 rng_;
};

TEST_F(StreamStateTest, AnAdoptedCascadeStepsOnExactlyLikeItsSource) {
  // Recall off: a step depends on the cascade and the digests alone.
  const SessionConfig session = Config(/*recall=*/false);
  absl::StatusOr<StreamConfig> c = StreamConfig::FromSession(session);
  ASSERT_TRUE(c.ok()) << c.status();
  const int D = c->head_dim, G = c->group;
  absl::StatusOr<StreamState> source = StreamState::Create(&*c);
  ASSERT_TRUE(source.ok());
  std::string q_bytes, k, v;
  for (int t = 0; t < 90; ++t) {  // past the cascades' capacity: evictions
    const std::vector<float> q = Random(size_t(G) * D, &q_bytes);
    Random(size_t(D), &k);
    Random(size_t(D), &v);
    Step(&*source, q, k, v);
  }
  // What the device would hand back: the whole cascade, rows included.
  absl::StatusOr<StreamState> adopted = StreamState::Create(&*c);
  ASSERT_TRUE(adopted.ok());
  ASSERT_TRUE(adopted->AdoptCascade(source->cascade().Export()).ok());
  EXPECT_EQ(adopted->tokens_seen(), source->tokens_seen());
  EXPECT_EQ(adopted->resident_tokens(), source->resident_tokens());
  // Digests of every page holding tokens are rebuilt bit for bit.
  const int P = c->page_tokens, S = c->cascade.sinks;
  const int pages =
      (S + P - 1) / P + c->cascade.cascades * (c->cascade.window / P);
  for (int p = 0; p < pages; ++p) {
    const int first =
        p < (S + P - 1) / P ? p * P : S + (p - (S + P - 1) / P) * P;
    const int count = p < (S + P - 1) / P ? std::min(P, S - first) : P;
    bool any = false;
    for (int s = first; s < first + count; ++s) {
      any = any || source->cascade().slot_position(s) >= 0;
    }
    if (!any) continue;
    for (int i = 0; i < 2 * D; ++i) {
      const size_t at = size_t(p) * 2 * D + size_t(i);
      ASSERT_EQ(std::memcmp(&adopted->resident_digests()[at],
                            &source->resident_digests()[at], 4),
                0)
          << "page " << p << " element " << i;
    }
  }
  // And the next steps answer alike, bit for bit.
  for (int t = 0; t < 40; ++t) {
    const std::vector<float> q = Random(size_t(G) * D, &q_bytes);
    Random(size_t(D), &k);
    Random(size_t(D), &v);
    const StreamStepOutput want = Step(&*source, q, k, v);
    const StreamStepOutput got = Step(&*adopted, q, k, v);
    ASSERT_EQ(want.out.size(), got.out.size());
    ASSERT_EQ(std::memcmp(want.out.data(), got.out.data(), want.out.size() * 4),
              0)
        << "step " << t;
    ASSERT_EQ(std::memcmp(want.lse.data(), got.lse.data(), want.lse.size() * 4),
              0);
  }
  const CascadeStream::Snapshot a = source->cascade().Export();
  const CascadeStream::Snapshot b = adopted->cascade().Export();
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(std::memcmp(a.scores.data(), b.scores.data(), a.scores.size() * 4),
            0);
}

TEST_F(StreamStateTest, AMalformedSnapshotIsRefusedAndChangesNothing) {
  const SessionConfig session = Config(/*recall=*/true);
  absl::StatusOr<StreamConfig> c = StreamConfig::FromSession(session);
  ASSERT_TRUE(c.ok());
  absl::StatusOr<StreamState> stream = StreamState::Create(&*c);
  ASSERT_TRUE(stream.ok());
  std::string q_bytes, k, v;
  for (int t = 0; t < 20; ++t) {
    const std::vector<float> q =
        Random(size_t(c->group) * c->head_dim, &q_bytes);
    Random(size_t(c->head_dim), &k);
    Random(size_t(c->head_dim), &v);
    Step(&*stream, q, k, v);
  }
  const CascadeStream::Snapshot before = stream->cascade().Export();
  CascadeStream::Snapshot bad = before;
  bad.positions.pop_back();  // one slot short
  const absl::Status st = stream->AdoptCascade(bad);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  const CascadeStream::Snapshot after = stream->cascade().Export();
  EXPECT_EQ(after.positions, before.positions);
  EXPECT_EQ(after.keys, before.keys);
  EXPECT_EQ(stream->tokens_seen(), 20);
}

TEST_F(StreamStateTest, TokensTheDeviceEvictedFillAndSealPages) {
  const SessionConfig session = Config(/*recall=*/true);
  absl::StatusOr<StreamConfig> c = StreamConfig::FromSession(session);
  ASSERT_TRUE(c.ok());
  absl::StatusOr<StreamState> stream = StreamState::Create(&*c);
  ASSERT_TRUE(stream.ok());
  const int P = c->page_tokens, D = c->head_dim;
  std::string keys, values;  // every evicted token's rows, in order
  std::vector<int64_t> positions;
  std::vector<StreamStepOutput> outputs;
  for (int t = 0; t < 2 * P + 3; ++t) {
    std::string k, v;
    Random(size_t(D), &k);
    Random(size_t(D), &v);
    const int64_t position = 1000 + 7 * t;  // any order of positions
    StreamStepOutput out;
    stream->SpillEvicted(position, k, v, &out);
    keys += k;
    values += v;
    positions.push_back(position);
    outputs.push_back(std::move(out));
  }
  // Two full pages sealed, by the P-th and 2P-th tokens; three open.
  EXPECT_EQ(stream->spilled_tokens(), 2 * P + 3);
  ASSERT_EQ(stream->sealed_pages().size(), 2u);
  EXPECT_EQ(stream->open_page().positions.size(), 3u);
  const size_t row = size_t(D) * 2;
  for (int page = 0; page < 2; ++page) {
    const StreamStepOutput& out = outputs[size_t((page + 1) * P - 1)];
    ASSERT_EQ(out.sealed.size(), 1u) << "page " << page;
    ASSERT_EQ(out.sealed_seqs, std::vector<uint64_t>{uint64_t(page)});
    const storage::SpillPage& sealed = *out.sealed[0];
    EXPECT_EQ(sealed.positions,
              std::vector<int64_t>(positions.begin() + page * P,
                                   positions.begin() + (page + 1) * P));
    EXPECT_EQ(sealed.keys, keys.substr(size_t(page) * P * row, P * row));
    EXPECT_EQ(sealed.values, values.substr(size_t(page) * P * row, P * row));
    // Its digest is the page's, as the host's own spills compute it.
    std::vector<float> want(size_t(2) * D);
    ASSERT_TRUE(cpu::ComputePageDigest(
                    absl::Span<const uint8_t>(
                        reinterpret_cast<const uint8_t*>(sealed.keys.data()),
                        sealed.keys.size()),
                    DType::kBf16, D, {}, c->digest_kind, absl::MakeSpan(want))
                    .ok());
    EXPECT_EQ(sealed.digest, want);
    EXPECT_EQ(stream->sealed_pages()[size_t(page)].digest, want);
    EXPECT_EQ(stream->sealed_pages()[size_t(page)].tokens, P);
  }
  for (int t = 0; t < 2 * P + 3; ++t) {
    if (t != P - 1 && t != 2 * P - 1) {
      EXPECT_TRUE(outputs[size_t(t)].sealed.empty()) << "token " << t;
    }
  }
  EXPECT_EQ(stream->next_page_seq(), 2u);
}

// What the CUDA backend hands Apply for a CACHE_RANK decode step (T = 1):
// the attention over `rows` then the new token (k, v), keys and queries
// rotated to RotaryPositions, here by the oracle's own functions.
ExternalAttention RotatedAttention(const StreamConfig& c,
                                   const StreamState& stream,
                                   std::vector<AttendedRow> rows,
                                   const std::vector<float>& q,
                                   const std::string& k, const std::string& v) {
  const int D = c.head_dim, G = c.group;
  const size_t row = size_t(c.row_bytes());
  int64_t query_base = 0;
  const std::vector<int64_t> ranks = stream.RotaryPositions(rows, &query_base);
  const size_t n = rows.size() + 1;
  std::vector<float> keys(n * D);
  std::string values;
  for (size_t j = 0; j < n; ++j) {
    const bool fresh = j + 1 == n;
    const uint8_t* key = fresh ? reinterpret_cast<const uint8_t*>(k.data())
                               : stream.AttendedKey(rows[j], {});
    const uint8_t* value = fresh ? reinterpret_cast<const uint8_t*>(v.data())
                                 : stream.AttendedValue(rows[j], {});
    cpu::LoadFloats(key, c.dtype, absl::MakeSpan(&keys[j * D], size_t(D)));
    cpu::RotateHeadWithFrequencies(c.inv_freq, c.pairing,
                                   fresh ? query_base : ranks[j],
                                   absl::MakeSpan(&keys[j * D], size_t(D)));
    values.append(reinterpret_cast<const char*>(value), row);
  }
  std::vector<float> queries = q;
  for (int g = 0; g < G; ++g) {
    cpu::RotateHeadWithFrequencies(
        c.inv_freq, c.pairing, query_base,
        absl::MakeSpan(&queries[size_t(g) * D], size_t(D)));
  }
  ExternalAttention ext;
  ext.out.resize(size_t(G) * D);
  ext.lse.resize(G);
  std::vector<float> probs(size_t(G) * n);
  const absl::Status attended = cpu::Attend(
      HeadRowsView::Fp32(queries), HeadRowsView::Fp32(keys),
      {absl::Span<const uint8_t>(
           reinterpret_cast<const uint8_t*>(values.data()), values.size()),
       c.dtype},
      D, c.softmax_scale, absl::MakeSpan(ext.out), absl::MakeSpan(ext.lse),
      absl::MakeSpan(probs));
  EXPECT_TRUE(attended.ok()) << attended;
  for (size_t j = 0; j < n; ++j) {
    ext.probs.push_back(
        ReduceGroupProbability(&probs[j], G, int(n), c.reduction));
  }
  ext.rows = std::move(rows);
  return ext;
}

// The CUDA backend's CACHE_RANK path on the host side: a stream given each
// decode step's attention from outside (keys and queries rotated to
// RotaryPositions) answers ATTEND within fp32 rounding of a stream that
// attends itself, FETCH with the same rotated keys, positions and query
// positions, and keeps the same cascade, through evictions.
TEST_F(StreamStateTest, CacheRankStepsWithExternalAttentionMatchTheirOwn) {
  SessionConfig session = Config(/*recall=*/false);
  session.policy.positions_mode = PositionsMode::kCacheRank;
  session.shape.rotary.base_theta = 10000.0;
  session.shape.rotary.interleaved = true;
  absl::StatusOr<StreamConfig> c = StreamConfig::FromSession(session);
  ASSERT_TRUE(c.ok()) << c.status();
  const int D = c->head_dim, G = c->group;
  absl::StatusOr<StreamState> own = StreamState::Create(&*c);
  absl::StatusOr<StreamState> given = StreamState::Create(&*c);
  ASSERT_TRUE(own.ok() && given.ok());
  std::string q_bytes, k, v;
  for (int t = 0; t < 120; ++t) {  // past the 68 slots: evictions
    const std::vector<float> q = Random(size_t(G) * D, &q_bytes);
    Random(size_t(D), &k);
    Random(size_t(D), &v);
    StreamStepInput in;
    in.position = t;
    in.queries = q;
    in.keys = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(k.data()), k.size());
    in.values = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(v.data()), v.size());
    const StepMode mode = t % 2 == 0 ? StepMode::kAttend : StepMode::kFetch;
    absl::StatusOr<StreamSelection> sel = own->Select(false, in);
    ASSERT_TRUE(sel.ok()) << sel.status();
    const ExternalAttention ext =
        RotatedAttention(*c, *given, given->AttendedRows(*sel, {}), q, k, v);
    StreamStepOutput want, got;
    ASSERT_TRUE(own->Apply(mode, in, *sel, {}, &want).ok());
    ASSERT_TRUE(given->Apply(mode, in, *sel, {}, &got, &ext).ok())
        << "step " << t;
    if (mode == StepMode::kAttend) {
      ASSERT_EQ(got.out.size(), want.out.size());
      for (size_t i = 0; i < want.out.size(); ++i) {
        ASSERT_NEAR(got.out[i], want.out[i],
                    1e-5 + 1e-5 * std::fabs(want.out[i]))
            << "step " << t << " element " << i;
      }
      for (int g = 0; g < G; ++g) {
        ASSERT_NEAR(got.lse[g], want.lse[g], 1e-5) << "step " << t;
      }
    } else {
      EXPECT_EQ(got.fetched.positions, want.fetched.positions) << "step " << t;
      EXPECT_EQ(got.fetched.k, want.fetched.k) << "step " << t;
      EXPECT_EQ(got.fetched.v, want.fetched.v) << "step " << t;
      EXPECT_EQ(got.fetched.query_rotary_positions,
                want.fetched.query_rotary_positions);
      ASSERT_EQ(want.fetched.query_rotary_positions.size(), 1u);
      // The query's rank: every resident token before the step's.
      EXPECT_LE(want.fetched.query_rotary_positions[0], int64_t{68});
    }
  }
  EXPECT_EQ(given->cascade().Export().positions,
            own->cascade().Export().positions);
}

}  // namespace
}  // namespace kvmem
