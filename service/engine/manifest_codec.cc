#include "service/engine/manifest_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

constexpr uint8_t kManifestFormat = 1;

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(char(v)); }
  void I64(int64_t v) { Raw(&v, 8); }
  void I32(int32_t v) { Raw(&v, 4); }
  void F64(double v) { Raw(&v, 8); }
  void F32(float v) { Raw(&v, 4); }
  void Str(const std::string& s) {
    I64(int64_t(s.size()));
    out_.append(s);
  }
  std::string Take() { return std::move(out_); }

 private:
  // x86 and the GPU machine are little-endian; stored bytes are LE.
  void Raw(const void* p, size_t n) {
    out_.append(static_cast<const char*>(p), n);
  }
  std::string out_;
};

class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}
  bool U8(uint8_t* v) { return Raw(v, 1); }
  bool I64(int64_t* v) { return Raw(v, 8); }
  bool I32(int32_t* v) { return Raw(v, 4); }
  bool F64(double* v) { return Raw(v, 8); }
  bool F32(float* v) { return Raw(v, 4); }
  bool Str(std::string* s) {
    int64_t n;
    if (!I64(&n) || n < 0 || size_t(n) > in_.size() - at_) return false;
    s->assign(in_.data() + at_, size_t(n));
    at_ += size_t(n);
    return true;
  }
  bool Done() const { return at_ == in_.size(); }

 private:
  bool Raw(void* p, size_t n) {
    if (in_.size() - at_ < n) return false;
    memcpy(p, in_.data() + at_, n);
    at_ += n;
    return true;
  }
  absl::string_view in_;
  size_t at_ = 0;
};

}  // namespace

std::string EncodeManifest(const SessionManifest& m) {
  Writer w;
  w.U8(kManifestFormat);
  const SessionConfig& c = m.config;
  w.Str(c.session_id);
  w.Str(c.tenant);
  const ModelShape& s = c.shape;
  w.I32(s.layers);
  w.I32(s.kv_heads);
  w.I32(s.query_heads);
  w.I32(s.head_dim);
  w.I32(int32_t(s.dtype));
  w.U8(s.softmax_scale.has_value());
  w.F32(s.softmax_scale.value_or(0.0f));
  const RotaryConfig& r = s.rotary;
  w.F64(r.base_theta);
  w.I32(r.rotary_dims);
  w.U8(r.interleaved);
  w.I32(int32_t(r.scaling));
  w.F64(r.scaling_factor);
  w.F64(r.low_freq_factor);
  w.F64(r.high_freq_factor);
  w.I64(r.original_max_positions);
  const CachePolicy& p = c.policy;
  w.I32(p.sinks);
  w.I32(p.cascades);
  w.I32(p.window);
  w.I32(p.page_tokens);
  w.I32(p.step_budget_tokens);
  w.I32(p.recent_tokens);
  w.F64(p.ema_beta);
  w.I32(int32_t(p.score_reduction));
  w.U8(p.eager_fill);
  w.I32(int32_t(p.positions_mode));
  w.U8(p.recall);
  w.I64(int64_t(p.dense_layers.size()));
  for (int l : p.dense_layers) w.I32(l);
  w.I64(p.spill_quota_bytes);
  w.I64(p.idle_ttl_seconds);
  w.I32(int32_t(c.durability));
  w.I64(int64_t(c.labels.size()));
  for (const auto& [key, value] : c.labels) {
    w.Str(key);
    w.Str(value);
  }
  w.I64(int64_t(m.seq));
  w.I64(m.create_time_unix_micros);
  w.I64(int64_t(m.layer_next_positions.size()));
  for (int64_t pos : m.layer_next_positions) w.I64(pos);
  w.I64(m.durable_position);
  return w.Take();
}

absl::StatusOr<SessionManifest> DecodeManifest(absl::string_view bytes) {
  Reader rd(bytes);
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
  if (!rd.U8(&format)) return truncated();
  if (format != kManifestFormat) {
    return absl::DataLossError(absl::StrCat("session manifest format ",
                                            int(format), ", want ",
                                            int(kManifestFormat)));
  }
  bool ok = rd.Str(&c.session_id) && rd.Str(&c.tenant) && rd.I32(&s.layers) &&
            rd.I32(&s.kv_heads) && rd.I32(&s.query_heads) &&
            rd.I32(&s.head_dim) && rd.I32(&dtype) && rd.U8(&has_scale) &&
            rd.F32(&scale) && rd.F64(&r.base_theta) && rd.I32(&r.rotary_dims) &&
            rd.U8(&interleaved) && rd.I32(&scaling) &&
            rd.F64(&r.scaling_factor) && rd.F64(&r.low_freq_factor) &&
            rd.F64(&r.high_freq_factor) && rd.I64(&r.original_max_positions) &&
            rd.I32(&p.sinks) && rd.I32(&p.cascades) && rd.I32(&p.window) &&
            rd.I32(&p.page_tokens) && rd.I32(&p.step_budget_tokens) &&
            rd.I32(&p.recent_tokens) && rd.F64(&p.ema_beta) &&
            rd.I32(&reduction) && rd.U8(&eager) && rd.I32(&mode) &&
            rd.U8(&recall) && rd.I64(&n_dense) && n_dense >= 0 &&
            n_dense <= kMaxLayers;
  if (!ok) return truncated();
  p.dense_layers.resize(size_t(n_dense));
  for (int& l : p.dense_layers) {
    if (!rd.I32(&l)) return truncated();
  }
  ok = rd.I64(&p.spill_quota_bytes) && rd.I64(&p.idle_ttl_seconds) &&
       rd.I32(&durability) && rd.I64(&n_labels) && n_labels >= 0 &&
       n_labels <= kMaxLabels;
  if (!ok) return truncated();
  for (int64_t i = 0; i < n_labels; ++i) {
    std::string key, value;
    if (!rd.Str(&key) || !rd.Str(&value)) return truncated();
    c.labels.emplace(std::move(key), std::move(value));
  }
  ok = rd.I64(&seq) && rd.I64(&m.create_time_unix_micros) &&
       rd.I64(&n_layers) && n_layers >= 0 && n_layers <= kMaxLayers;
  if (!ok) return truncated();
  m.layer_next_positions.resize(size_t(n_layers));
  for (int64_t& pos : m.layer_next_positions) {
    if (!rd.I64(&pos)) return truncated();
  }
  if (!rd.I64(&m.durable_position) || !rd.Done()) return truncated();
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
