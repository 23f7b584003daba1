// What a session is made of: its model shape, cache policy, durability,
// identity and labels, with the contract's defaults and range rules
// (kvmem.v1 CreateSession). No gRPC types: the adapter converts.
#ifndef KVMEM_SERVICE_ENGINE_SESSION_CONFIG_H_
#define KVMEM_SERVICE_ENGINE_SESSION_CONFIG_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"

namespace kvmem {

// RotaryScaling and ScoreReduction are the kernels' (kernels/rotary.h,
// kernels/policy_math.h); the adapter maps the wire's values onto them.
// Values of the enums below equal their kvmem.v1 counterparts.
enum class PositionsMode : int { kAbsolute = 1, kCacheRank = 2 };
enum class Durability : int { kAsync = 1, kStepSync = 2 };

struct RotaryConfig {
  double base_theta = 0;  // 0: not given (required for CACHE_RANK)
  int rotary_dims = 0;    // 0 means head_dim
  bool interleaved = false;
  RotaryScaling scaling = RotaryScaling::kNone;
  double scaling_factor = 1;
  double low_freq_factor = 0;
  double high_freq_factor = 0;
  int64_t original_max_positions = 0;
};

struct ModelShape {
  int layers = 0;
  int kv_heads = 0;
  int query_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kBf16;
  // Multiplies q·k before the softmax; unset means 1/sqrt(head_dim).
  std::optional<float> softmax_scale;
  RotaryConfig rotary;
};

// Defaults are the contract's (DESIGN.md § Contract).
struct CachePolicy {
  int sinks = 64;
  int cascades = 4;
  int window = 1024;
  int page_tokens = 16;
  int step_budget_tokens = 2048;
  int recent_tokens = 16;
  double ema_beta = 0.9999999;
  ScoreReduction score_reduction = ScoreReduction::kMax;
  bool eager_fill = true;
  PositionsMode positions_mode = PositionsMode::kAbsolute;
  bool recall = true;
  std::vector<int> dense_layers = {0, 1};  // see DefaultDenseLayers
  int64_t spill_quota_bytes = 0;           // 0: none
  int64_t idle_ttl_seconds = 0;            // 0: never expires
};

// The contract's default dense layers, {0, 1} ∩ [0, layers).
std::vector<int> DefaultDenseLayers(int layers);

// The softmax scale `shape` uses: its own, or 1/sqrt(head_dim).
float EffectiveSoftmaxScale(const ModelShape& shape);

struct SessionConfig {
  std::string session_id;
  std::string tenant;
  ModelShape shape;
  CachePolicy policy;
  Durability durability = Durability::kAsync;
  std::map<std::string, std::string> labels;
};

// Limits of the contract, named once.
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxKvHeads = 256;
inline constexpr int kMaxQueryHeads = 1024;
inline constexpr int kMaxSinks = 65536;
inline constexpr int kMaxCascades = 16;
inline constexpr int kMaxWindow = 1 << 20;
inline constexpr int kMaxPageTokens = 1024;
inline constexpr int kMaxStepBudget = 1 << 20;
inline constexpr int kMaxLabels = 64;
inline constexpr int kMaxSessionIdChars = 128;
inline constexpr int kMaxTenantChars = 64;

// OK, or INVALID_ARGUMENT naming the field as the proto spells it and the
// rule, e.g. `shape.head_dim must be one of 64, 128, 256, got 96`.
// The session id may be empty (the server chooses one).
absl::Status ValidateSessionConfig(const SessionConfig& config);

// INVALID_ARGUMENT naming `field` unless `id` is 1–128 characters of
// [A-Za-z0-9._-].
absl::Status ValidateSessionId(const std::string& id, const char* field);

// INVALID_ARGUMENT unless `tenant` is 1–64 characters of [A-Za-z0-9._-].
absl::Status ValidateTenant(const std::string& tenant);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_SESSION_CONFIG_H_
