#include "service/engine/engine.h"

#include <unistd.h>

#include <algorithm>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cpu/dtype.h"
#include "service/engine/stream_state.h"

namespace kvmem {

// What a (session, layer) keeps of its last applied step, so that an
// identical repeat (a retry after a lost reply) is answered again instead of
// being applied twice (DESIGN.md § Errors).
struct Engine::LastStep {
  int64_t position = -1;
  int num_tokens = 0;
  StepMode mode = StepMode::kAttend;
  size_t fingerprint = 0;  // of q, k and v
  bool kept = false;       // false: the reply was too large to keep
  StepEntryResult reply;
};

// A session's live state. The config parts are fixed at creation; the rest
// is guarded by `mu`.
struct Engine::LiveSession {
  uint64_t seq = 0;  // storage's session number: tells re-created ids apart
  SessionConfig config;
  StreamConfig stream_config;  // StreamStates point here; never moves
  std::vector<uint8_t> dense;  // [layers]: layer attends densely
  Mutex mu;
  std::vector<int64_t> layer_next ABSL_GUARDED_BY(mu);  // [layers]
  // [layers][kv_heads]; a layer's streams are made on its first step.
  std::vector<std::vector<StreamState>> streams ABSL_GUARDED_BY(mu);
  // [layers]: each layer's last applied step, for answering retries.
  std::vector<LastStep> last ABSL_GUARDED_BY(mu);
  // Host bytes of `streams`, counted in Engine::memory_bytes_.
  int64_t memory_bytes ABSL_GUARDED_BY(mu) = 0;
  // Set by DeleteSession: steps already holding this state are refused.
  bool deleted ABSL_GUARDED_BY(mu) = false;
};

namespace {

const char* ModeName(StepMode mode) {
  switch (mode) {
    case StepMode::kFetch:
      return "FETCH";
    case StepMode::kAttend:
      return "ATTEND";
    case StepMode::kAppend:
      return "APPEND";
  }
  return "?";
}

// FETCH replies larger than this are not kept for retries (a decode FETCH
// of B = 2048 tokens of 8 heads × 128 × bf16 is 8 MiB per layer).
constexpr size_t kMaxKeptReplyBytes = size_t{1} << 20;

size_t ReplyBytes(const StepEntryResult& r) {
  size_t bytes = r.output.size() + r.lse.size();
  for (const FetchedHead& h : r.heads) {
    bytes += h.k.size() + h.v.size() + 8 * h.positions.size();
  }
  return bytes;
}

size_t Fingerprint(const StepEntryView& e) {
  return absl::Hash<std::tuple<absl::string_view, absl::string_view,
                               absl::string_view>>()(
      std::make_tuple(e.q, e.k, e.v));
}

// "entries[i].field".
std::string Field(size_t i, const char* field) {
  return absl::StrCat("entries[", i, "].", field);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Open(const Options& options,
                                                     storage::Store* store) {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<SessionRegistry> registry,
                         SessionRegistry::Open(options.registry, store));
  int64_t limit = options.memory_limit_bytes;
  if (limit < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_limit_bytes must be >= 0 (0: 60% of RAM), got ", limit));
  }
  if (limit == 0) {
    limit = int64_t(0.6 * double(sysconf(_SC_PHYS_PAGES)) *
                    double(sysconf(_SC_PAGESIZE)));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(registry), limit));
}

Engine::Engine(std::unique_ptr<SessionRegistry> registry,
               int64_t memory_limit_bytes)
    : registry_(std::move(registry)),
      memory_limit_bytes_(memory_limit_bytes) {}

Engine::~Engine() = default;

std::shared_ptr<Engine::LiveSession> Engine::Live(const Key& key,
                                                  const SessionInfo& info) {
  MutexLock lock(&mu_);
  auto it = live_.find(key);
  if (it != live_.end() && it->second->seq == info.manifest.seq) {
    return it->second;
  }
  auto live = std::make_shared<LiveSession>();
  live->seq = info.manifest.seq;
  live->config = info.manifest.config;
  absl::StatusOr<StreamConfig> stream_config =
      StreamConfig::FromSession(live->config);
  // CreateSession validated the rotary parameters, so this holds; a
  // manifest that fails it anyway serves with the defaults' positions.
  if (stream_config.ok()) live->stream_config = std::move(*stream_config);
  const int layers = live->config.shape.layers;
  live->dense.assign(size_t(layers), 0);
  for (int l : live->config.policy.dense_layers) live->dense[size_t(l)] = 1;
  MutexLock session_lock(&live->mu);
  live->layer_next = info.manifest.layer_next_positions;
  live->layer_next.resize(size_t(layers), 0);
  live->streams.resize(size_t(layers));
  live->last.resize(size_t(layers));
  live_[key] = live;
  return live;
}

void Engine::AddLiveFigures(SessionInfo* info) {
  std::shared_ptr<LiveSession> live;
  {
    MutexLock lock(&mu_);
    auto it = live_.find(
        Key(info->manifest.config.tenant, info->manifest.config.session_id));
    if (it == live_.end() || it->second->seq != info->manifest.seq) return;
    live = it->second;
  }
  MutexLock lock(&live->mu);
  info->manifest.layer_next_positions = live->layer_next;
  info->position =
      *std::min_element(live->layer_next.begin(), live->layer_next.end());
  const int64_t row_bytes = live->stream_config.row_bytes();
  for (const std::vector<StreamState>& layer : live->streams) {
    for (const StreamState& stream : layer) {
      info->resident_tokens += stream.resident_tokens();
      info->spilled_pages += int64_t(stream.spilled_pages().size());
      info->spilled_bytes += stream.spilled_tokens() * 2 * row_bytes;
    }
  }
}

absl::StatusOr<SessionInfo> Engine::CreateSession(SessionConfig config) {
  return registry_->Create(std::move(config));
}

absl::StatusOr<SessionInfo> Engine::GetSession(const std::string& tenant,
                                               const std::string& session_id) {
  KVMEM_ASSIGN_OR_RETURN(SessionInfo info, registry_->Get(tenant, session_id));
  AddLiveFigures(&info);
  return info;
}

absl::StatusOr<SessionRegistry::ListPage> Engine::ListSessions(
    const std::string& tenant, int page_size, const std::string& page_token,
    const std::map<std::string, std::string>& label_filter) {
  KVMEM_ASSIGN_OR_RETURN(
      SessionRegistry::ListPage page,
      registry_->List(tenant, page_size, page_token, label_filter));
  for (SessionInfo& info : page.sessions) AddLiveFigures(&info);
  return page;
}

absl::Status Engine::DeleteSession(const std::string& tenant,
                                   const std::string& session_id) {
  KVMEM_RETURN_IF_ERROR(registry_->Delete(tenant, session_id));
  std::shared_ptr<LiveSession> live;
  {
    MutexLock lock(&mu_);
    auto it = live_.find(Key(tenant, session_id));
    if (it == live_.end()) return absl::OkStatus();
    live = std::move(it->second);
    live_.erase(it);
  }
  // Steps already holding the state are refused from now on; its memory is
  // returned now (the last holder frees it).
  MutexLock lock(&live->mu);
  live->deleted = true;
  memory_bytes_.fetch_sub(live->memory_bytes);
  live->memory_bytes = 0;
  return absl::OkStatus();
}

// The per-session locks taken depend on the request, which Clang's
// analysis cannot follow; the locking is confined to this function.
absl::StatusOr<std::vector<StepEntryResult>> Engine::Step(
    const std::string& tenant,
    const StepRequestView& request) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const StepMode mode = request.mode;
  if (mode != StepMode::kFetch && mode != StepMode::kAttend &&
      mode != StepMode::kAppend) {
    return absl::InvalidArgumentError(
        "mode must be one of STEP_MODE_FETCH, STEP_MODE_ATTEND, "
        "STEP_MODE_APPEND");
  }
  const size_t n = request.entries.size();
  if (n == 0 || n > size_t{kMaxEntriesPerStep}) {
    return absl::InvalidArgumentError(absl::StrCat(
        "entries: ", n, " entries, want 1 to ", kMaxEntriesPerStep));
  }

  // Sessions: known, each once.
  std::vector<std::shared_ptr<LiveSession>> sessions(n);
  std::map<std::string, size_t> first_entry;
  for (size_t i = 0; i < n; ++i) {
    const std::string& id = request.entries[i].session_id;
    KVMEM_RETURN_IF_ERROR(
        ValidateSessionId(id, Field(i, "session_id").c_str()));
    auto [it, fresh] = first_entry.emplace(id, i);
    if (!fresh) {
      return absl::InvalidArgumentError(absl::StrCat(
          Field(i, "session_id"), ": session \"", id, "\" repeats entries[",
          it->second, "]; a request holds at most one entry per session"));
    }
    absl::StatusOr<SessionInfo> info = registry_->Get(tenant, id);
    if (!info.ok()) {
      return absl::Status(
          info.status().code(),
          absl::StrCat(Field(i, "session_id"), ": ", info.status().message()));
    }
    sessions[i] = Live(Key(tenant, id), *info);
  }

  // Lock every session of the request in address order.
  std::vector<LiveSession*> order;
  for (const auto& s : sessions) order.push_back(s.get());
  std::sort(order.begin(), order.end());
  for (LiveSession* s : order) s->mu.Lock();
  struct Unlocker {
    std::vector<LiveSession*>* order;
    ~Unlocker() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      for (LiveSession* s : *order) s->mu.Unlock();
    }
  } unlocker{&order};

  // Validate every entry against its session before applying any.
  const int layer = request.layer;
  std::vector<bool> replay(n, false);  // an identical retry of the last step
  int64_t step_growth = 0;             // bytes this request may add
  for (size_t i = 0; i < n; ++i) {
    const StepEntryView& e = request.entries[i];
    LiveSession& s = *sessions[i];
    const ModelShape& shape = s.config.shape;
    if (s.deleted) {
      return absl::NotFoundError(absl::StrCat(
          Field(i, "session_id"), ": session \"", e.session_id,
          "\" was deleted"));
    }
    if (layer < 0 || layer >= shape.layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer: ", layer, " is out of range for ", Field(i, "session_id"),
          " \"", e.session_id, "\", which has ", shape.layers, " layers"));
    }
    if (e.num_tokens < 1 || e.num_tokens > kMaxTokensPerEntry) {
      return absl::InvalidArgumentError(
          absl::StrCat(Field(i, "num_tokens"), " must be in [1, ",
                       kMaxTokensPerEntry, "], got ", e.num_tokens));
    }
    const int64_t e_bytes = DTypeBytes(shape.dtype);
    const int64_t want_q =
        int64_t{e.num_tokens} * shape.query_heads * shape.head_dim * e_bytes;
    const int64_t want_kv =
        int64_t{e.num_tokens} * shape.kv_heads * shape.head_dim * e_bytes;
    const bool q_optional = mode == StepMode::kAppend && e.q.empty();
    if (!q_optional && int64_t(e.q.size()) != want_q) {
      return absl::InvalidArgumentError(absl::StrCat(
          Field(i, "q"), ": ", e.q.size(), " bytes, want ", want_q,
          " ([T=", e.num_tokens, ", Hq=", shape.query_heads,
          ", D=", shape.head_dim, "] × ", e_bytes, " bytes)",
          mode == StepMode::kAppend ? "; or empty in APPEND" : ""));
    }
    if (int64_t(e.k.size()) != want_kv) {
      return absl::InvalidArgumentError(
          absl::StrCat(Field(i, "k"), ": ", e.k.size(), " bytes, want ",
                       want_kv, " ([T=", e.num_tokens, ", H=", shape.kv_heads,
                       ", D=", shape.head_dim, "] × ", e_bytes, " bytes)"));
    }
    if (int64_t(e.v.size()) != want_kv) {
      return absl::InvalidArgumentError(absl::StrCat(
          Field(i, "v"), ": ", e.v.size(), " bytes, want ", want_kv));
    }
    const int64_t expected = s.layer_next[size_t(layer)];
    const LastStep& last = s.last[size_t(layer)];
    if (e.position == last.position && e.num_tokens == last.num_tokens &&
        e.position + e.num_tokens == expected && mode == last.mode &&
        Fingerprint(e) == last.fingerprint) {
      if (!last.kept) {
        return absl::FailedPreconditionError(absl::StrCat(
            Field(i, "position"), ": ", e.position,
            " repeats the last FETCH step, whose reply was too large to keep "
            "for a retry; expected ", expected));
      }
      replay[i] = true;
      continue;
    }
    if (e.position != expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          Field(i, "position"), ": got ", e.position, ", expected ", expected,
          " (session \"", e.session_id, "\", layer ", layer, ")"));
    }
    std::vector<StreamState>& streams = s.streams[size_t(layer)];
    int64_t growth = int64_t{shape.kv_heads} *
                     StreamState::StepGrowthBytes(s.stream_config, e.num_tokens);
    if (streams.empty()) {
      growth += int64_t{shape.kv_heads} * StreamState::FixedBytes(s.stream_config);
    }
    step_growth += growth;
    const int64_t in_use = memory_bytes_.load(std::memory_order_relaxed);
    if (in_use + step_growth > memory_limit_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          Field(i, "session_id"), ": memory limit of ", memory_limit_bytes_,
          " bytes reached (", in_use, " in use, this request needs up to ",
          step_growth, "); delete sessions or raise --memory_limit_bytes"));
    }
    if (streams.empty()) {
      // Making empty streams changes nothing a caller can observe.
      for (int h = 0; h < shape.kv_heads; ++h) {
        absl::StatusOr<StreamState> stream =
            StreamState::Create(&s.stream_config);
        if (!stream.ok()) {
          streams.clear();
          return absl::InternalError(absl::StrCat(
              Field(i, "session_id"),
              ": cannot make its streams: ", stream.status().message()));
        }
        streams.push_back(std::move(*stream));
      }
      // The streams exist from now on, whatever becomes of this request.
      const int64_t made = int64_t{shape.kv_heads} *
                           StreamState::FixedBytes(s.stream_config);
      s.memory_bytes += made;
      memory_bytes_.fetch_add(made);
    }
  }

  // Apply. Every input was checked above, so a stream step cannot fail
  // here; INTERNAL would mean a bug, and is reported as such.
  std::vector<StepEntryResult> results(n);
  for (size_t i = 0; i < n; ++i) {
    const StepEntryView& e = request.entries[i];
    LiveSession& s = *sessions[i];
    if (replay[i]) {
      results[i] = s.last[size_t(layer)].reply;
      continue;
    }
    const ModelShape& shape = s.config.shape;
    const int T = e.num_tokens, H = shape.kv_heads, Hq = shape.query_heads;
    const int D = shape.head_dim, G = Hq / H;
    const size_t row = size_t(D) * DTypeBytes(shape.dtype);
    std::vector<float> q_all(e.q.empty() ? 0 : size_t(T) * Hq * D);
    if (!e.q.empty())
      cpu::LoadFloats(e.q.data(), shape.dtype, absl::MakeSpan(q_all));
    std::vector<float> out_all, lse_all;
    if (mode == StepMode::kAttend) {
      out_all.resize(size_t(T) * Hq * D);
      lse_all.resize(size_t(T) * Hq);
    }
    StepEntryResult& result = results[i];
    std::vector<float> queries(q_all.empty() ? 0 : size_t(T) * G * D);
    std::string keys(T * row, '\0'), values(T * row, '\0');
    int64_t bytes_before = 0, bytes_after = 0;
    for (const StreamState& stream : s.streams[size_t(layer)]) {
      bytes_before += stream.memory_bytes();
    }
    for (int h = 0; h < H; ++h) {
      // This head's rows: queries [T, G, D], keys/values [T, D].
      for (int t = 0; t < T; ++t) {
        if (!q_all.empty()) {
          std::copy_n(&q_all[(size_t(t) * Hq + size_t(h) * G) * D],
                      size_t(G) * D, &queries[size_t(t) * G * D]);
        }
        memcpy(&keys[t * row], e.k.data() + (size_t(t) * H + h) * row, row);
        memcpy(&values[t * row], e.v.data() + (size_t(t) * H + h) * row, row);
      }
      StreamStepInput input;
      input.position = e.position;
      input.num_tokens = T;
      input.queries = queries;
      input.keys = absl::Span<const uint8_t>(
          reinterpret_cast<const uint8_t*>(keys.data()), keys.size());
      input.values = absl::Span<const uint8_t>(
          reinterpret_cast<const uint8_t*>(values.data()), values.size());
      StreamStepOutput output;
      absl::Status st = s.streams[size_t(layer)][size_t(h)].Step(
          mode, s.dense[size_t(layer)], input, &output);
      if (!st.ok()) {
        return absl::InternalError(absl::StrCat(
            Field(i, "session_id"), ": ", ModeName(mode), " step of KV head ",
            h, " failed after validation: ", st.message()));
      }
      if (mode == StepMode::kAttend) {
        for (int t = 0; t < T; ++t) {
          std::copy_n(&output.out[size_t(t) * G * D], size_t(G) * D,
                      &out_all[(size_t(t) * Hq + size_t(h) * G) * D]);
          std::copy_n(&output.lse[size_t(t) * G], G,
                      &lse_all[size_t(t) * Hq + size_t(h) * G]);
        }
      } else if (mode == StepMode::kFetch) {
        result.heads.push_back(std::move(output.fetched));
      }
    }
    if (mode == StepMode::kAttend) {
      result.output.resize(out_all.size() * DTypeBytes(shape.dtype));
      cpu::StoreFloats(out_all, shape.dtype, result.output.data());
      result.lse.assign(reinterpret_cast<const char*>(lse_all.data()),
                        lse_all.size() * sizeof(float));
    }
    for (const StreamState& stream : s.streams[size_t(layer)]) {
      bytes_after += stream.memory_bytes();
    }
    s.memory_bytes += bytes_after - bytes_before;
    memory_bytes_.fetch_add(bytes_after - bytes_before);
    s.layer_next[size_t(layer)] += T;
    result.next_position = s.layer_next[size_t(layer)];
    // Nothing is durable before the storage work (issue 5) lands.
    result.durable_position = 0;
    LastStep& last = s.last[size_t(layer)];
    last.position = e.position;
    last.num_tokens = T;
    last.mode = mode;
    last.fingerprint = Fingerprint(e);
    last.kept = mode != StepMode::kFetch || ReplyBytes(result) <= kMaxKeptReplyBytes;
    last.reply = last.kept ? result : StepEntryResult();
    steps_.fetch_add(1, std::memory_order_relaxed);
    tokens_appended_.fetch_add(T, std::memory_order_relaxed);
  }
  return results;
}

EngineStats Engine::Stats() {
  EngineStats stats;
  stats.sessions = registry_->SessionCount();
  stats.steps = steps_.load(std::memory_order_relaxed);
  stats.tokens_appended = tokens_appended_.load(std::memory_order_relaxed);
  stats.memory_bytes = memory_bytes_.load(std::memory_order_relaxed);
  stats.memory_limit_bytes = memory_limit_bytes_;
  std::vector<std::shared_ptr<LiveSession>> live;
  {
    MutexLock lock(&mu_);
    for (const auto& [key, session] : live_) live.push_back(session);
  }
  for (const auto& session : live) {
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
