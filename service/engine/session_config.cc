#include "service/engine/session_config.h"

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvmem {
namespace {

bool IdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

bool LabelKeyChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

absl::Status Invalid(const std::string& message) {
  return absl::InvalidArgumentError(message);
}

// "`field` must be in [lo, hi], got v".
absl::Status CheckRange(const char* field, int64_t v, int64_t lo, int64_t hi) {
  if (v >= lo && v <= hi) return absl::OkStatus();
  return Invalid(
      absl::StrCat(field, " must be in [", lo, ", ", hi, "], got ", v));
}

absl::Status ValidateShape(const ModelShape& s) {
  KVMEM_RETURN_IF_ERROR(CheckRange("shape.layers", s.layers, 1, kMaxLayers));
  KVMEM_RETURN_IF_ERROR(
      CheckRange("shape.kv_heads", s.kv_heads, 1, kMaxKvHeads));
  if (s.query_heads < 1 || s.query_heads > kMaxQueryHeads ||
      s.query_heads % s.kv_heads != 0) {
    return Invalid(absl::StrCat(
        "shape.query_heads must be a positive multiple of shape.kv_heads (",
        s.kv_heads, ") and at most ", kMaxQueryHeads, ", got ", s.query_heads));
  }
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256) {
    return Invalid(absl::StrCat(
        "shape.head_dim must be one of 64, 128, 256, got ", s.head_dim));
  }
  if (s.dtype != DType::kBf16 && s.dtype != DType::kFp16 &&
      s.dtype != DType::kFp32) {
    return Invalid(
        "shape.dtype must be one of DTYPE_BF16, DTYPE_FP16, DTYPE_FP32");
  }
  if (s.softmax_scale.has_value() &&
      !(std::isfinite(*s.softmax_scale) && *s.softmax_scale > 0)) {
    return Invalid(absl::StrCat(
        "shape.softmax_scale must be finite and > 0 when set, got ",
        *s.softmax_scale));
  }
  return absl::OkStatus();
}

absl::Status ValidateRotary(const ModelShape& s, bool required) {
  const RotaryConfig& r = s.rotary;
  if (!required && r.base_theta == 0) return absl::OkStatus();
  if (!(std::isfinite(r.base_theta) && r.base_theta > 1)) {
    return Invalid(absl::StrCat(
        "shape.rotary.base_theta must be finite and > 1",
        required ? " for policy.positions_mode POSITIONS_MODE_CACHE_RANK" : "",
        ", got ", r.base_theta));
  }
  if (r.rotary_dims != 0 &&
      (r.rotary_dims < 2 || r.rotary_dims > s.head_dim || r.rotary_dims % 2)) {
    return Invalid(absl::StrCat(
        "shape.rotary.rotary_dims must be 0 (all) or even in [2, head_dim=",
        s.head_dim, "], got ", r.rotary_dims));
  }
  switch (r.scaling) {
    case RotaryScaling::kNone:
      return absl::OkStatus();
    case RotaryScaling::kLinear:
    case RotaryScaling::kLlama3:
      break;
    default:
      return Invalid("shape.rotary.scaling must be a RotaryScaling value");
  }
  if (!(std::isfinite(r.scaling_factor) && r.scaling_factor >= 1)) {
    return Invalid(absl::StrCat(
        "shape.rotary.scaling_factor must be finite and >= 1, got ",
        r.scaling_factor));
  }
  if (r.scaling == RotaryScaling::kLlama3) {
    if (!(r.low_freq_factor > 0 && std::isfinite(r.high_freq_factor) &&
          r.high_freq_factor > r.low_freq_factor)) {
      return Invalid(absl::StrCat(
          "shape.rotary.low_freq_factor and high_freq_factor must satisfy "
          "0 < low_freq_factor < high_freq_factor, got ",
          r.low_freq_factor, " and ", r.high_freq_factor));
    }
    if (r.original_max_positions <= 0) {
      return Invalid(
          absl::StrCat("shape.rotary.original_max_positions must be > 0 for "
                       "ROTARY_SCALING_LLAMA3, got ",
                       r.original_max_positions));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePolicy(const CachePolicy& p, int layers) {
  absl::Status st = CheckRange("policy.sinks", p.sinks, 0, kMaxSinks);
  if (st.ok()) st = CheckRange("policy.cascades", p.cascades, 1, kMaxCascades);
  if (st.ok()) {
    st = CheckRange("policy.page_tokens", p.page_tokens, 1, kMaxPageTokens);
  }
  if (st.ok()) st = CheckRange("policy.window", p.window, 1, kMaxWindow);
  if (!st.ok()) return st;
  if (p.window % p.page_tokens != 0) {
    return Invalid(
        absl::StrCat("policy.window must be a multiple of policy.page_tokens (",
                     p.page_tokens, "), got ", p.window));
  }
  const int64_t resident = int64_t{p.sinks} + int64_t{p.cascades} * p.window;
  if (resident > (int64_t{1} << 24)) {
    return Invalid(absl::StrCat(
        "policy.window: sinks + cascades·window must be at most 16777216 "
        "tokens per stream, got ",
        resident));
  }
  st = CheckRange("policy.recent_tokens", p.recent_tokens, 0, p.window);
  if (!st.ok()) return st;
  const int64_t always_in = int64_t{p.sinks} + p.recent_tokens + 1;
  if (p.step_budget_tokens < always_in ||
      p.step_budget_tokens > kMaxStepBudget) {
    return Invalid(absl::StrCat(
        "policy.step_budget_tokens must be >= sinks + recent_tokens + 1 (",
        always_in, ") and at most ", kMaxStepBudget, ", got ",
        p.step_budget_tokens));
  }
  if (!(p.ema_beta > 0 && p.ema_beta < 1)) {
    return Invalid(
        absl::StrCat("policy.ema_beta must be in (0, 1), got ", p.ema_beta));
  }
  if (p.score_reduction != ScoreReduction::kMax &&
      p.score_reduction != ScoreReduction::kMean) {
    return Invalid("policy.score_reduction must be a ScoreReduction value");
  }
  if (p.positions_mode != PositionsMode::kAbsolute &&
      p.positions_mode != PositionsMode::kCacheRank) {
    return Invalid("policy.positions_mode must be a PositionsMode value");
  }
  std::set<int> seen;
  for (size_t i = 0; i < p.dense_layers.size(); ++i) {
    int l = p.dense_layers[i];
    if (l < 0 || l >= layers) {
      return Invalid(absl::StrCat("policy.dense_layers[", i,
                                  "] must be in [0, shape.layers=", layers,
                                  "), got ", l));
    }
    if (!seen.insert(l).second) {
      return Invalid(
          absl::StrCat("policy.dense_layers[", i, "] repeats layer ", l));
    }
  }
  if (p.spill_quota_bytes < 0) {
    return Invalid(absl::StrCat("policy.spill_quota_bytes must be >= 0, got ",
                                p.spill_quota_bytes));
  }
  if (p.idle_ttl_seconds < 0) {
    return Invalid(absl::StrCat("policy.idle_ttl_seconds must be >= 0, got ",
                                p.idle_ttl_seconds));
  }
  return absl::OkStatus();
}

absl::Status ValidateLabels(const std::map<std::string, std::string>& labels) {
  if (labels.size() > size_t{kMaxLabels}) {
    return Invalid(absl::StrCat("labels: at most ", kMaxLabels, " labels, got ",
                                labels.size()));
  }
  for (const auto& [key, value] : labels) {
    bool ok = !key.empty() && key.size() <= 63;
    for (char c : key) ok = ok && LabelKeyChar(c);
    if (!ok) {
      return Invalid(absl::StrCat("labels: key \"", key,
                                  "\" must be 1-63 characters of [a-z0-9._-]"));
    }
    if (value.size() > 256) {
      return Invalid(absl::StrCat("labels[", key, "]: value of ", value.size(),
                                  " bytes, at most 256"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<int> DefaultDenseLayers(int layers) {
  std::vector<int> dense;
  for (int l = 0; l < 2 && l < layers; ++l) dense.push_back(l);
  return dense;
}

float EffectiveSoftmaxScale(const ModelShape& shape) {
  if (shape.softmax_scale.has_value()) return *shape.softmax_scale;
  return float(1.0 / std::sqrt(double(shape.head_dim)));
}

absl::Status ValidateSessionId(const std::string& id, const char* field) {
  bool ok = !id.empty() && id.size() <= size_t{kMaxSessionIdChars};
  for (char c : id) ok = ok && IdChar(c);
  if (ok) return absl::OkStatus();
  return Invalid(absl::StrCat(field, " must be 1-", kMaxSessionIdChars,
                              " characters of [A-Za-z0-9._-], got \"", id,
                              "\""));
}

absl::Status ValidateTenant(const std::string& tenant) {
  bool ok = !tenant.empty() && tenant.size() <= size_t{kMaxTenantChars};
  for (char c : tenant) ok = ok && IdChar(c);
  if (ok) return absl::OkStatus();
  return Invalid(absl::StrCat("metadata kvmem-tenant must be 1-",
                              kMaxTenantChars,
                              " characters of [A-Za-z0-9._-]"));
}

absl::Status ValidateSessionConfig(const SessionConfig& config) {
  if (!config.session_id.empty()) {
    KVMEM_RETURN_IF_ERROR(ValidateSessionId(config.session_id, "session_id"));
  }
  KVMEM_RETURN_IF_ERROR(ValidateShape(config.shape));
  KVMEM_RETURN_IF_ERROR(ValidateRotary(
      config.shape, config.policy.positions_mode == PositionsMode::kCacheRank));
  KVMEM_RETURN_IF_ERROR(ValidatePolicy(config.policy, config.shape.layers));
  if (config.durability != Durability::kAsync &&
      config.durability != Durability::kStepSync) {
    return Invalid("durability must be a Durability value");
  }
  return ValidateLabels(config.labels);
}

}  // namespace kvmem
