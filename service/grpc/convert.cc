#include "service/grpc/convert.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvmem {
namespace {

// Out-of-range wire values become out-of-range engine values, which
// ValidateSessionConfig rejects naming the field.
RotaryScaling ScalingFromProto(v1::RotaryScaling s) {
  switch (s) {
    case v1::ROTARY_SCALING_UNSPECIFIED:
    case v1::ROTARY_SCALING_NONE:
      return RotaryScaling::kNone;
    case v1::ROTARY_SCALING_LINEAR:
      return RotaryScaling::kLinear;
    case v1::ROTARY_SCALING_LLAMA3:
      return RotaryScaling::kLlama3;
    default:
      return RotaryScaling(-1);
  }
}

v1::RotaryScaling ScalingToProto(RotaryScaling s) {
  switch (s) {
    case RotaryScaling::kLinear:
      return v1::ROTARY_SCALING_LINEAR;
    case RotaryScaling::kLlama3:
      return v1::ROTARY_SCALING_LLAMA3;
    default:
      return v1::ROTARY_SCALING_NONE;
  }
}

}  // namespace

absl::Status SessionConfigFromProto(const v1::CreateSessionRequest& request,
                                    const std::string& tenant,
                                    SessionConfig* config) {
  config->session_id = request.session_id();
  config->tenant = tenant;

  const v1::ModelShape& s = request.shape();
  ModelShape& shape = config->shape;
  shape.layers = s.layers();
  shape.kv_heads = s.kv_heads();
  shape.query_heads = s.query_heads();
  shape.head_dim = s.head_dim();
  if (s.dtype() == v1::DTYPE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        "shape.dtype must be one of DTYPE_BF16, DTYPE_FP16, DTYPE_FP32, got "
        "DTYPE_UNSPECIFIED");
  }
  shape.dtype = DType(int(s.dtype()));
  if (s.has_softmax_scale()) shape.softmax_scale = s.softmax_scale();
  const v1::Rotary& r = s.rotary();
  shape.rotary.base_theta = r.base_theta();
  shape.rotary.rotary_dims = r.rotary_dims();
  shape.rotary.interleaved = r.interleaved();
  shape.rotary.scaling = ScalingFromProto(r.scaling());
  // An unset factor (0) means "no scaling factor", i.e. 1.
  shape.rotary.scaling_factor =
      r.scaling_factor() == 0 ? 1 : r.scaling_factor();
  shape.rotary.low_freq_factor = r.low_freq_factor();
  shape.rotary.high_freq_factor = r.high_freq_factor();
  shape.rotary.original_max_positions = r.original_max_positions();

  const v1::CachePolicy& p = request.policy();
  CachePolicy& policy = config->policy;
  if (p.has_sinks()) policy.sinks = p.sinks();
  if (p.has_cascades()) policy.cascades = p.cascades();
  if (p.has_window()) policy.window = p.window();
  if (p.has_page_tokens()) policy.page_tokens = p.page_tokens();
  if (p.has_step_budget_tokens()) {
    policy.step_budget_tokens = p.step_budget_tokens();
  }
  // The contract's default for recent_tokens is one page.
  policy.recent_tokens =
      p.has_recent_tokens() ? p.recent_tokens() : policy.page_tokens;
  if (p.has_ema_beta()) policy.ema_beta = p.ema_beta();
  if (p.score_reduction() != v1::SCORE_REDUCTION_UNSPECIFIED) {
    policy.score_reduction = ScoreReduction(int(p.score_reduction()));
  }
  if (p.has_eager_fill()) policy.eager_fill = p.eager_fill();
  if (p.positions_mode() != v1::POSITIONS_MODE_UNSPECIFIED) {
    policy.positions_mode = PositionsMode(int(p.positions_mode()));
  }
  if (p.has_recall()) policy.recall = p.recall();
  if (p.dense_layers_set() || p.dense_layers_size() > 0) {
    policy.dense_layers.assign(p.dense_layers().begin(),
                               p.dense_layers().end());
  } else {
    policy.dense_layers = DefaultDenseLayers(shape.layers);
  }
  policy.spill_quota_bytes = p.spill_quota_bytes();
  policy.idle_ttl_seconds = p.idle_ttl_seconds();

  config->durability = request.durability() == v1::DURABILITY_UNSPECIFIED
                           ? Durability::kAsync
                           : Durability(int(request.durability()));
  config->labels.clear();
  for (const auto& [key, value] : request.labels()) {
    config->labels.emplace(key, value);
  }
  return absl::OkStatus();
}

void SessionToProto(const SessionInfo& info, v1::Session* out) {
  const SessionManifest& m = info.manifest;
  const SessionConfig& c = m.config;
  out->set_session_id(c.session_id);
  out->set_tenant(c.tenant);

  v1::ModelShape* s = out->mutable_shape();
  s->set_layers(c.shape.layers);
  s->set_kv_heads(c.shape.kv_heads);
  s->set_query_heads(c.shape.query_heads);
  s->set_head_dim(c.shape.head_dim);
  s->set_dtype(v1::DType(int(c.shape.dtype)));
  s->set_softmax_scale(EffectiveSoftmaxScale(c.shape));
  const RotaryConfig& r = c.shape.rotary;
  v1::Rotary* rp = s->mutable_rotary();
  rp->set_base_theta(r.base_theta);
  rp->set_rotary_dims(r.rotary_dims == 0 ? c.shape.head_dim : r.rotary_dims);
  rp->set_interleaved(r.interleaved);
  rp->set_scaling(ScalingToProto(r.scaling));
  rp->set_scaling_factor(r.scaling_factor);
  rp->set_low_freq_factor(r.low_freq_factor);
  rp->set_high_freq_factor(r.high_freq_factor);
  rp->set_original_max_positions(r.original_max_positions);

  const CachePolicy& p = c.policy;
  v1::CachePolicy* pp = out->mutable_policy();
  pp->set_sinks(p.sinks);
  pp->set_cascades(p.cascades);
  pp->set_window(p.window);
  pp->set_page_tokens(p.page_tokens);
  pp->set_step_budget_tokens(p.step_budget_tokens);
  pp->set_recent_tokens(p.recent_tokens);
  pp->set_ema_beta(p.ema_beta);
  pp->set_score_reduction(v1::ScoreReduction(int(p.score_reduction)));
  pp->set_eager_fill(p.eager_fill);
  pp->set_positions_mode(v1::PositionsMode(int(p.positions_mode)));
  pp->set_recall(p.recall);
  for (int l : p.dense_layers) pp->add_dense_layers(l);
  pp->set_dense_layers_set(true);
  pp->set_spill_quota_bytes(p.spill_quota_bytes);
  pp->set_idle_ttl_seconds(p.idle_ttl_seconds);

  out->set_durability(v1::Durability(int(c.durability)));
  for (const auto& [key, value] : c.labels)
    (*out->mutable_labels())[key] = value;
  out->set_position(info.position);
  for (int64_t pos : m.layer_next_positions) out->add_layer_next_positions(pos);
  out->set_durable_position(m.durable_position);
  out->set_resident_tokens(info.resident_tokens);
  for (int64_t n : info.resident_tokens_per_cascade) {
    out->add_resident_tokens_per_cascade(n);
  }
  out->set_spilled_pages(info.spilled_pages);
  out->set_spilled_bytes(info.spilled_bytes);
  out->set_create_time_unix_micros(m.create_time_unix_micros);
  out->set_last_used_unix_micros(info.last_used_unix_micros);
}

absl::StatusOr<StepMode> StepModeFromWire(int mode) {
  switch (mode) {
    case v1::STEP_MODE_FETCH:
      return StepMode::kFetch;
    case v1::STEP_MODE_ATTEND:
      return StepMode::kAttend;
    case v1::STEP_MODE_APPEND:
      return StepMode::kAppend;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("mode must be one of STEP_MODE_FETCH, STEP_MODE_ATTEND, "
                       "STEP_MODE_APPEND, got ",
                       mode));
  }
}

absl::Status StepRequestFromProto(const v1::StepRequest& request,
                                  StepRequestView* view) {
  KVMEM_ASSIGN_OR_RETURN(view->mode, StepModeFromWire(int(request.mode())));
  view->layer = request.layer();
  view->entries.clear();
  view->entries.reserve(size_t(request.entries_size()));
  for (const v1::StepEntry& e : request.entries()) {
    StepEntryView entry;
    entry.session_id = e.session_id();
    entry.position = e.position();
    entry.num_tokens = e.num_tokens();
    entry.q = absl::string_view(e.q().data(), e.q().size());
    entry.k = absl::string_view(e.k().data(), e.k().size());
    entry.v = absl::string_view(e.v().data(), e.v().size());
    view->entries.push_back(std::move(entry));
  }
  return absl::OkStatus();
}

void StepResultsToProto(std::vector<StepEntryResult> results,
                        const StepRequestView& request, v1::StepResponse* out) {
  for (size_t i = 0; i < results.size(); ++i) {
    StepEntryResult& r = results[i];
    v1::StepResult* p = out->add_results();
    p->set_session_id(request.entries[i].session_id);
    p->set_next_position(r.next_position);
    p->set_durable_position(r.durable_position);
    p->set_output(std::move(r.output));
    p->set_lse(std::move(r.lse));
    for (FetchedHead& h : r.heads) {
      v1::FetchedHead* ph = p->add_heads();
      ph->mutable_positions()->Add(h.positions.begin(), h.positions.end());
      ph->set_k(std::move(h.k));
      ph->set_v(std::move(h.v));
      ph->mutable_query_rotary_positions()->Add(
          h.query_rotary_positions.begin(), h.query_rotary_positions.end());
    }
  }
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode(int(status.code())),
                      std::string(status.message()));
}

}  // namespace kvmem
