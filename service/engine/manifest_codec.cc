#include "service/engine/manifest_codec.h"

#include "absl/strings/str_cat.h"
#include "service/engine/field_codec.h"

namespace kvmem {
namespace {

constexpr uint8_t kManifestFormat = 1;

}  // namespace

std::string EncodeManifest(const SessionManifest& m) {
  FieldWriter w;
  w.Put<uint8_t>(kManifestFormat);
  const SessionConfig& c = m.config;
  w.PutBytes(c.session_id);
  w.PutBytes(c.tenant);
  const ModelShape& s = c.shape;
  w.Put<int32_t>(s.layers);
  w.Put<int32_t>(s.kv_heads);
  w.Put<int32_t>(s.query_heads);
  w.Put<int32_t>(s.head_dim);
  w.Put<int32_t>(int32_t(s.dtype));
  w.Put<uint8_t>(s.softmax_scale.has_value());
  w.Put<float>(s.softmax_scale.value_or(0.0f));
  const RotaryConfig& r = s.rotary;
  w.Put<double>(r.base_theta);
  w.Put<int32_t>(r.rotary_dims);
  w.Put<uint8_t>(r.interleaved);
  w.Put<int32_t>(int32_t(r.scaling));
  w.Put<double>(r.scaling_factor);
  w.Put<double>(r.low_freq_factor);
  w.Put<double>(r.high_freq_factor);
  w.Put<int64_t>(r.original_max_positions);
  const CachePolicy& p = c.policy;
  w.Put<int32_t>(p.sinks);
  w.Put<int32_t>(p.cascades);
  w.Put<int32_t>(p.window);
  w.Put<int32_t>(p.page_tokens);
  w.Put<int32_t>(p.step_budget_tokens);
  w.Put<int32_t>(p.recent_tokens);
  w.Put<double>(p.ema_beta);
  w.Put<int32_t>(int32_t(p.score_reduction));
  w.Put<uint8_t>(p.eager_fill);
  w.Put<int32_t>(int32_t(p.positions_mode));
  w.Put<uint8_t>(p.recall);
  w.Put<int64_t>(int64_t(p.dense_layers.size()));
  for (int l : p.dense_layers) w.Put<int32_t>(l);
  w.Put<int64_t>(p.spill_quota_bytes);
  w.Put<int64_t>(p.idle_ttl_seconds);
  w.Put<int32_t>(int32_t(c.durability));
  w.Put<int64_t>(int64_t(c.labels.size()));
  for (const auto& [key, value] : c.labels) {
    w.PutBytes(key);
    w.PutBytes(value);
  }
  w.Put<int64_t>(int64_t(m.seq));
  w.Put<int64_t>(m.create_time_unix_micros);
  w.Put<int64_t>(int64_t(m.layer_next_positions.size()));
  for (int64_t pos : m.layer_next_positions) w.Put<int64_t>(pos);
  w.Put<int64_t>(m.durable_position);
  return w.Take();
}

absl::StatusOr<SessionManifest> DecodeManifest(absl::string_view bytes) {
  FieldReader rd(bytes);
  SessionManifest m;
  SessionConfig& c = m.config;
  ModelShape& s = c.shape;
  RotaryConfig& r = s.rotary;
  CachePolicy& p = c.policy;
  uint8_t format = 0, has_scale = 0, interleaved = 0, eager = 0, recall = 0;
  int32_t dtype = 0, scaling = 0, reduction = 0, mode = 0, durability = 0;
  float scale = 0;
  int64_t n_dense = 0, n_labels = 0, seq = 0, n_layers = 0;
  auto truncated = [&] {
    return absl::DataLossError(
        absl::StrCat("session manifest of ", bytes.size(),
                     " bytes is truncated or malformed"));
  };
  if (!rd.Get(&format)) return truncated();
  if (format != kManifestFormat) {
    return absl::DataLossError(absl::StrCat("session manifest format ",
                                            int(format), ", want ",
                                            int(kManifestFormat)));
  }
  bool ok =
      rd.GetBytes(&c.session_id) && rd.GetBytes(&c.tenant) &&
      rd.Get(&s.layers) && rd.Get(&s.kv_heads) && rd.Get(&s.query_heads) &&
      rd.Get(&s.head_dim) && rd.Get(&dtype) && rd.Get(&has_scale) &&
      rd.Get(&scale) && rd.Get(&r.base_theta) && rd.Get(&r.rotary_dims) &&
      rd.Get(&interleaved) && rd.Get(&scaling) && rd.Get(&r.scaling_factor) &&
      rd.Get(&r.low_freq_factor) && rd.Get(&r.high_freq_factor) &&
      rd.Get(&r.original_max_positions) && rd.Get(&p.sinks) &&
      rd.Get(&p.cascades) && rd.Get(&p.window) && rd.Get(&p.page_tokens) &&
      rd.Get(&p.step_budget_tokens) && rd.Get(&p.recent_tokens) &&
      rd.Get(&p.ema_beta) && rd.Get(&reduction) && rd.Get(&eager) &&
      rd.Get(&mode) && rd.Get(&recall) && rd.Get(&n_dense) && n_dense >= 0 &&
      n_dense <= kMaxLayers;
  if (!ok) return truncated();
  p.dense_layers.resize(size_t(n_dense));
  for (int& l : p.dense_layers) {
    if (!rd.Get(&l)) return truncated();
  }
  ok = rd.Get(&p.spill_quota_bytes) && rd.Get(&p.idle_ttl_seconds) &&
       rd.Get(&durability) && rd.Get(&n_labels) && n_labels >= 0 &&
       n_labels <= kMaxLabels;
  if (!ok) return truncated();
  for (int64_t i = 0; i < n_labels; ++i) {
    std::string key, value;
    if (!rd.GetBytes(&key) || !rd.GetBytes(&value)) return truncated();
    c.labels.emplace(std::move(key), std::move(value));
  }
  ok = rd.Get(&seq) && rd.Get(&m.create_time_unix_micros) &&
       rd.Get(&n_layers) && n_layers >= 0 && n_layers <= kMaxLayers;
  if (!ok) return truncated();
  m.layer_next_positions.resize(size_t(n_layers));
  for (int64_t& pos : m.layer_next_positions) {
    if (!rd.Get(&pos)) return truncated();
  }
  if (!rd.Get(&m.durable_position) || !rd.Done()) return truncated();
  s.dtype = DType(dtype);
  if (has_scale) s.softmax_scale = scale;
  r.interleaved = interleaved;
  r.scaling = RotaryScaling(scaling);
  p.score_reduction = ScoreReduction(reduction);
  p.eager_fill = eager;
  p.positions_mode = PositionsMode(mode);
  p.recall = recall;
  c.durability = Durability(durability);
  m.seq = uint64_t(seq);
  return m;
}

}  // namespace kvmem
