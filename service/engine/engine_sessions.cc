// The engine's sessions: live state made on first use, lifecycle calls
// with live figures, the idle sweeper and server-wide figures.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/engine/live_session.h"

namespace kvmem {
namespace {

int64_t WallMicros() { return absl::ToUnixMicros(absl::Now()); }

}  // namespace

absl::StatusOr<std::shared_ptr<Engine::LiveSession>> Engine::LiveForStep(
    const Key& key, int64_t now) {
  KVMEM_ASSIGN_OR_RETURN(const uint64_t seq,
                         registry_->TouchReady(key.first, key.second, now));
  {
    // Usually live already: no manifest copied (a step's entries each
    // come this way, 32 of them in a batch-32 request).
    MutexLock lock(&mu_);
    auto it = live_.find(key);
    if (it != live_.end() && it->second->manifest.seq == seq) {
      return it->second;
    }
  }
  KVMEM_ASSIGN_OR_RETURN(SessionInfo info,
                         registry_->Get(key.first, key.second));
  return Live(key, info);
}

std::shared_ptr<Engine::LiveSession> Engine::Live(const Key& key,
                                                  const SessionInfo& info) {
  MutexLock lock(&mu_);
  auto it = live_.find(key);
  if (it != live_.end() && it->second->manifest.seq == info.manifest.seq) {
    return it->second;
  }
  auto live = std::make_shared<LiveSession>();
  live->manifest = info.manifest;
  absl::StatusOr<StreamConfig> stream_config =
      StreamConfig::FromSession(live->config());
  // CreateSession validated the rotary parameters, so this holds; a
  // manifest that fails it anyway serves with the defaults' positions.
  if (stream_config.ok()) live->stream_config = std::move(*stream_config);
  const size_t layers = size_t(live->config().shape.layers);
  live->dense.assign(layers, 0);
  for (int l : live->config().policy.dense_layers) live->dense[size_t(l)] = 1;
  {
    MutexLock session_lock(&live->mu);
    live->layer_next.assign(layers, 0);
    live->streams.resize(layers);
    live->last.resize(layers);
    live->device.resize(layers);
  }
  {
    MutexLock durable_lock(&live->durable_mu);
    live->written_next.assign(layers, 0);
    live->synced_next.assign(layers, 0);
  }
  live_[key] = live;
  return live;
}

LiveFigures ComputeLiveFigures(const Engine::LiveSession& s)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  LiveFigures f;
  f.layer_next = s.layer_next;
  const int64_t row_bytes = s.stream_config.row_bytes();
  const int cascades = s.config().policy.cascades;
  f.resident_tokens_per_cascade.assign(size_t(cascades) + 1, 0);
  for (const std::vector<StreamState>& layer : s.streams) {
    for (const StreamState& stream : layer) {
      const CascadeStream& c = stream.cascade();
      int64_t in_cascades = 0;
      for (int i = 0; i < cascades; ++i) {
        f.resident_tokens_per_cascade[size_t(i) + 1] += c.stored(i);
        in_cascades += c.stored(i);
      }
      f.resident_tokens_per_cascade[0] +=
          stream.resident_tokens() - in_cascades;
      f.resident_tokens += stream.resident_tokens();
      f.spilled_pages += stream.spilled_pages();
      f.spilled_bytes += stream.spilled_tokens() * 2 * row_bytes;
    }
  }
  return f;
}

absl::Status Engine::AddLiveFigures(SessionInfo* info) {
  std::shared_ptr<LiveSession> live =
      Live(Key(info->manifest.config.tenant, info->manifest.config.session_id),
           *info);
  MutexLock lock(&live->mu);
  // A hibernated session is described from its figures, not woken: a
  // listing must not bring every hibernated session back into memory.
  if (!live->woken && !live->hibernated.has_value()) {
    KVMEM_RETURN_IF_ERROR(Wake(*live));
  }
  // Device-owned layers first bring their state back (and stay owned).
  if (live->woken) KVMEM_RETURN_IF_ERROR(SyncToHost(*live, /*drop=*/false));
  const LiveFigures f =
      live->woken ? ComputeLiveFigures(*live) : *live->hibernated;
  info->manifest.layer_next_positions = f.layer_next;
  info->position = *std::min_element(f.layer_next.begin(), f.layer_next.end());
  info->manifest.durable_position = live->DurablePosition();
  info->resident_tokens_per_cascade = f.resident_tokens_per_cascade;
  info->resident_tokens = f.resident_tokens;
  info->spilled_pages = f.spilled_pages;
  info->spilled_bytes = f.spilled_bytes;
  return absl::OkStatus();
}

absl::StatusOr<SessionInfo> Engine::CreateSession(SessionConfig config) {
  KVMEM_ASSIGN_OR_RETURN(SessionInfo info,
                         registry_->Create(std::move(config)));
  // Described as GetSession will describe it.
  KVMEM_RETURN_IF_ERROR(AddLiveFigures(&info));
  return info;
}

absl::StatusOr<SessionInfo> Engine::GetSession(const std::string& tenant,
                                               const std::string& session_id) {
  KVMEM_ASSIGN_OR_RETURN(SessionInfo info, registry_->Get(tenant, session_id));
  KVMEM_RETURN_IF_ERROR(AddLiveFigures(&info));
  return info;
}

absl::StatusOr<SessionRegistry::ListPage> Engine::ListSessions(
    const std::string& tenant, int page_size, const std::string& page_token,
    const std::map<std::string, std::string>& label_filter) {
  KVMEM_ASSIGN_OR_RETURN(
      SessionRegistry::ListPage page,
      registry_->List(tenant, page_size, page_token, label_filter));
  for (SessionInfo& info : page.sessions) {
    KVMEM_RETURN_IF_ERROR(AddLiveFigures(&info));
  }
  return page;
}

absl::Status Engine::DeleteSession(const std::string& tenant,
                                   const std::string& session_id) {
  const Key key(tenant, session_id);
  std::shared_ptr<LiveSession> live;
  {
    MutexLock lock(&mu_);
    auto it = live_.find(key);
    if (it != live_.end()) live = it->second;
  }
  if (live != nullptr) {
    // Refuse steps from now on, and let those queued reach storage before
    // the range deletion, so none lands after it.
    MutexLock lock(&live->mu);
    live->deleted = true;
  }
  absl::Status flushed = writer_->Flush();
  absl::Status deleted =
      flushed.ok() ? registry_->Delete(tenant, session_id) : flushed;
  if (!deleted.ok()) {
    if (live != nullptr) {
      MutexLock lock(&live->mu);
      live->deleted = false;
    }
    return deleted;
  }
  if (live != nullptr) {
    {
      MutexLock lock(&mu_);
      auto it = live_.find(key);
      if (it != live_.end() && it->second == live) live_.erase(it);
    }
    page_cache_->EraseSession(live->manifest.seq);
    MutexLock lock(&live->mu);
    memory_bytes_.fetch_sub(live->memory_bytes);
    live->memory_bytes = 0;
    ReleaseDevice(*live, /*host_current=*/true);  // nothing to keep
  }
  return absl::OkStatus();
}

// Locks taken with TryLock are released in the same iteration; the
// analysis cannot follow a lock taken conditionally in a loop.
int Engine::ForEachIdle(const std::vector<LiveSession*>& busy,
                        const std::function<bool()>& enough,
                        const std::function<bool(LiveSession&)>& act)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  std::vector<std::shared_ptr<LiveSession>> idle = AllLive();
  std::sort(idle.begin(), idle.end(), [](const auto& a, const auto& b) {
    return a->last_used.load(std::memory_order_relaxed) <
           b->last_used.load(std::memory_order_relaxed);
  });
  int acted = 0;
  for (const std::shared_ptr<LiveSession>& s : idle) {
    if (enough()) break;
    if (std::find(busy.begin(), busy.end(), s.get()) != busy.end()) continue;
    // Another request holds it: not idle. Never wait here: the caller holds
    // its own sessions' locks.
    if (!s->mu.TryLock()) continue;
    acted += act(*s) ? 1 : 0;
    s->mu.Unlock();
  }
  return acted;
}

int64_t Engine::Now() const {
  return options_.now_unix_micros ? options_.now_unix_micros() : WallMicros();
}

int Engine::SweepExpired() {
  int deleted = 0;
  for (const auto& [tenant, id] : registry_->Expired(Now())) {
    // NOT_FOUND: deleted meanwhile. Other errors: tried again next sweep.
    if (DeleteSession(tenant, id).ok()) ++deleted;
  }
  return deleted;
}

EngineStats Engine::Stats() {
  EngineStats stats;
  stats.sessions = registry_->SessionCount();
  stats.steps = steps_.load(std::memory_order_relaxed);
  stats.tokens_appended = tokens_appended_.load(std::memory_order_relaxed);
  stats.memory_bytes = memory_bytes_.load(std::memory_order_relaxed);
  stats.memory_limit_bytes = memory_limit_bytes_;
  stats.spill_queue_bytes = int64_t(writer_->stats().queued_bytes);
  stats.hibernations = hibernations_.load(std::memory_order_relaxed);
  stats.device_evictions = device_evictions_.load(std::memory_order_relaxed);
  for (int p = 0; p < int(StepPhase::kCount); ++p) {
    stats.step_phase_nanos[p] = phase_nanos_[p].load(std::memory_order_relaxed);
  }
  stats.device_fallbacks = device_fallbacks_.load(std::memory_order_relaxed);
  stats.device_policy_steps =
      device_policy_steps_.load(std::memory_order_relaxed);
  stats.device_attend_steps =
      device_attend_steps_.load(std::memory_order_relaxed);
  if (options_.device != nullptr) {
    stats.device_pool_bytes = options_.device->pool_bytes();
    stats.device_pool_used_bytes = options_.device->used_bytes();
    stats.device_side_bytes = options_.device->side_bytes();
  }
  for (const auto& session : AllLive()) {
    MutexLock lock(&session->mu);
    const int64_t row_bytes = session->stream_config.row_bytes();
    for (const std::vector<StreamState>& layer : session->streams) {
      for (const StreamState& stream : layer) {
        stats.resident_bytes +=
            int64_t(stream.resident_tokens()) * 2 * row_bytes;
        stats.spilled_bytes += stream.spilled_tokens() * 2 * row_bytes;
      }
    }
  }
  return stats;
}

}  // namespace kvmem
