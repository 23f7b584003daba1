#include "service/engine/manifest_codec.h"

#include "gtest/gtest.h"

namespace kvmem {
namespace {

SessionManifest Sample() {
  SessionManifest m;
  m.config.session_id = "chat-42";
  m.config.tenant = "acme";
  m.config.shape = {32, 8, 32, 128, DType::kFp16, 0.125f, {}};
  m.config.shape.rotary = {500000.0, 64,  true, RotaryScaling::kLlama3,
                           8.0,      1.0, 4.0,  8192};
  m.config.policy.sinks = 4;
  m.config.policy.cascades = 2;
  m.config.policy.window = 256;
  m.config.policy.page_tokens = 32;
  m.config.policy.step_budget_tokens = 512;
  m.config.policy.recent_tokens = 7;
  m.config.policy.ema_beta = 0.75;
  m.config.policy.score_reduction = ScoreReduction::kMean;
  m.config.policy.eager_fill = false;
  m.config.policy.positions_mode = PositionsMode::kCacheRank;
  m.config.policy.recall = false;
  m.config.policy.dense_layers = {3, 0};
  m.config.policy.spill_quota_bytes = 1 << 30;
  m.config.policy.idle_ttl_seconds = 3600;
  m.config.durability = Durability::kStepSync;
  m.config.labels = {{"model", "llama"}, {"user", std::string("a\0b", 3)}};
  m.seq = 77;
  m.create_time_unix_micros = 1234567890123;
  m.layer_next_positions.assign(32, 9);
  m.layer_next_positions[5] = 10;
  m.durable_position = 8;
  return m;
}

void ExpectSame(const SessionManifest& a, const SessionManifest& b) {
  // Re-encoding is a field-by-field comparison in one line.
  EXPECT_EQ(EncodeManifest(a), EncodeManifest(b));
  EXPECT_EQ(a.config.session_id, b.config.session_id);
  EXPECT_EQ(a.config.labels, b.config.labels);
  EXPECT_EQ(a.config.policy.dense_layers, b.config.policy.dense_layers);
  EXPECT_EQ(a.layer_next_positions, b.layer_next_positions);
  EXPECT_EQ(a.config.shape.softmax_scale, b.config.shape.softmax_scale);
  EXPECT_EQ(a.config.policy.positions_mode, b.config.policy.positions_mode);
  EXPECT_EQ(a.config.shape.rotary.original_max_positions,
            b.config.shape.rotary.original_max_positions);
  EXPECT_EQ(a.seq, b.seq);
}

TEST(ManifestCodec, RoundTrips) {
  SessionManifest m = Sample();
  absl::StatusOr<SessionManifest> back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(m, *back);
  EXPECT_EQ(back->config.policy.ema_beta, 0.75);
  EXPECT_FALSE(back->config.policy.recall);

  m.config.shape.softmax_scale.reset();
  back = DecodeManifest(EncodeManifest(m));
  ASSERT_TRUE(back.ok());
  EXPECT_FALSE(back->config.shape.softmax_scale.has_value());
}

TEST(ManifestCodec, EveryTruncationIsDataLoss) {
  const std::string bytes = EncodeManifest(Sample());
  for (size_t n = 0; n < bytes.size(); ++n) {
    absl::StatusOr<SessionManifest> back = DecodeManifest(bytes.substr(0, n));
    ASSERT_EQ(back.status().code(), absl::StatusCode::kDataLoss) << n;
  }
  EXPECT_EQ(DecodeManifest(bytes + "x").status().code(),
            absl::StatusCode::kDataLoss);
  std::string other_format = bytes;
  other_format[0] = 9;
  EXPECT_EQ(DecodeManifest(other_format).status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kvmem
