// The engine's persistence: waking a session from its checkpoint and step
// log, checkpoints, and the WAL sync loop that makes ASYNC steps durable
// (DESIGN.md § Persistence).
#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "service/engine/engine.h"
#include "service/engine/live_session.h"
#include "service/engine/step_log.h"

namespace kvmem {
namespace {

// The checkpoint record of a layer's kept step (retries after a restart)
// uses this head number, past any stream's.
constexpr uint32_t kKeptStepRecord = 0xffffffffu;

}  // namespace

std::vector<std::shared_ptr<Engine::LiveSession>> Engine::AllLive() {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<LiveSession>> all;
  for (const auto& [key, session] : live_) all.push_back(session);
  return all;
}

absl::Status Engine::Wake(LiveSession& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const uint64_t seq = s.manifest.seq;
  const int layers = s.config().shape.layers;
  const int H = s.config().shape.kv_heads;
  // 1. The last checkpoint: every stream of a checkpointed layer.
  std::vector<std::vector<StreamState>> streams(static_cast<size_t>(layers));
  std::vector<LastStep> kept(static_cast<size_t>(layers));
  KVMEM_RETURN_IF_ERROR(store_->ForEachCheckpoint(
      seq,
      [&](uint32_t layer, uint32_t head,
          absl::string_view body) -> absl::Status {
        if (head == kKeptStepRecord && layer < uint32_t(layers)) {
          KVMEM_ASSIGN_OR_RETURN(kept[layer], DecodeLastStep(body));
          return absl::OkStatus();
        }
        if (layer >= uint32_t(layers) || head != streams[layer].size()) {
          return absl::DataLossError(
              absl::StrCat("checkpoint of layer ", layer, " KV head ", head,
                           " does not fit the session's shape"));
        }
        KVMEM_ASSIGN_OR_RETURN(StreamState stream,
                               StreamState::Restore(&s.stream_config, body));
        streams[layer].push_back(std::move(stream));
        return absl::OkStatus();
      }));
  for (int l = 0; l < layers; ++l) {
    if (!streams[l].empty() && int(streams[l].size()) != H) {
      return absl::DataLossError(absl::StrCat("checkpoint of layer ", l,
                                              " holds ", streams[l].size(),
                                              " of ", H, " KV heads"));
    }
  }
  // 2. Sealed pages the checkpoint covers; later ones are re-made by replay.
  KVMEM_RETURN_IF_ERROR(store_->ForEachDigest(
      seq,
      [&](const storage::PageId& id,
          const storage::DigestRecord& record) -> absl::Status {
        if (id.layer >= uint32_t(layers) || streams[id.layer].empty()) {
          return absl::OkStatus();
        }
        if (id.kv_head >= uint32_t(H)) {
          return absl::DataLossError(absl::StrCat(
              storage::DescribePage(id), " is outside the session's shape"));
        }
        StreamState& stream = streams[id.layer][id.kv_head];
        if (id.page_seq < stream.next_page_seq()) {
          stream.AddSealedPage(
              {id.page_seq, int(record.tokens), record.digest});
        }
        return absl::OkStatus();
      }));
  std::vector<int64_t> next(size_t(layers), 0);
  int64_t memory = 0;
  for (int l = 0; l < layers; ++l) {
    if (!streams[l].empty()) next[l] = streams[l][0].tokens_seen();
    for (const StreamState& stream : streams[l])
      memory += stream.memory_bytes();
  }
  s.streams = std::move(streams);
  s.last = std::move(kept);  // replay below replaces a layer's if it steps
  s.memory_bytes += memory;
  memory_bytes_.fetch_add(memory);

  // 3. Replay the logged steps after the checkpoint, layer by layer.
  std::map<std::pair<uint32_t, int64_t>, LoggedStep> log;
  KVMEM_RETURN_IF_ERROR(store_->ForEachLogRecord(
      seq,
      [&](uint32_t layer, int64_t position,
          absl::string_view body) -> absl::Status {
        if (layer >= uint32_t(layers) || position < next[layer]) {
          return absl::OkStatus();  // covered by the checkpoint
        }
        KVMEM_ASSIGN_OR_RETURN(LoggedStep step, DecodeLoggedStep(body));
        log.emplace(std::make_pair(layer, position), std::move(step));
        return absl::OkStatus();
      }));
  // The last logged step of each layer (by position), whose reply is kept
  // again so that a worker's retry after the restart is answered.
  std::map<uint32_t, int64_t> last_logged;
  for (const auto& [key, step] : log) last_logged[key.first] = key.second;
  int64_t replayed_bytes = 0;
  for (auto& [key, step] : log) {
    const int layer = int(key.first);
    const int64_t position = key.second;
    if (position != next[size_t(layer)]) continue;  // after a gap: dropped
    if (s.streams[size_t(layer)].empty()) {
      KVMEM_RETURN_IF_ERROR(MakeStreams(s, layer, "replay"));
    }
    // The same select, recall and apply as the original step; its pages
    // are stored already. Only the last step's reply is computed in full.
    s.layer_next[size_t(layer)] = position;
    const bool last = last_logged[key.first] == position;
    const StepMode mode = last ? step.mode : StepMode::kAppend;
    std::vector<HeadWork> work =
        SplitHeads(s.config().shape, step.num_tokens, step.q, step.k, step.v);
    for (size_t h = 0; h < work.size(); ++h) {
      KVMEM_ASSIGN_OR_RETURN(work[h].selection,
                             s.streams[size_t(layer)][h].Select(
                                 s.dense[size_t(layer)],
                                 work[h].Input(position, step.num_tokens)));
      KVMEM_RETURN_IF_ERROR(LoadRecalled(seq, layer, int(h), &work[h]));
    }
    StepEntryResult reply;
    KVMEM_RETURN_IF_ERROR(ApplyEntry(s, layer, mode, position, step.num_tokens,
                                     work, &reply, nullptr, nullptr));
    if (last) {
      StepEntryView entry;
      entry.position = position;
      entry.num_tokens = step.num_tokens;
      entry.q = step.q;
      entry.k = step.k;
      entry.v = step.v;
      KeepLastStep(step.mode, entry, reply, &s.last[size_t(layer)]);
    }
    next[size_t(layer)] += step.num_tokens;
    replayed_bytes += int64_t(step.q.size() + step.k.size() + step.v.size());
  }
  if (!log.empty()) {
    // What was replayed came from the write-ahead log: make it durable.
    KVMEM_RETURN_IF_ERROR(store_->SyncWal());
  }
  s.layer_next = next;
  s.log_bytes = replayed_bytes;
  {
    MutexLock lock(&s.durable_mu);
    s.written_next = next;
    s.synced_next = next;
  }
  s.woken = true;
  s.hibernated.reset();
  return absl::OkStatus();
}

absl::Status Engine::CheckpointLocked(LiveSession& s)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Device-owned layers bring their state back (and stay owned).
  KVMEM_RETURN_IF_ERROR(SyncToHost(s, /*drop=*/false));
  // Queued batches first: the checkpoint truncates the log they write.
  KVMEM_RETURN_IF_ERROR(writer_->Flush());
  storage::Store::CheckpointWrite c;
  c.seq = s.manifest.seq;
  SessionManifest manifest = s.manifest;
  manifest.layer_next_positions = s.layer_next;
  manifest.durable_position =
      *std::min_element(s.layer_next.begin(), s.layer_next.end());
  c.manifest = EncodeManifest(manifest);
  for (size_t l = 0; l < s.streams.size(); ++l) {
    for (size_t h = 0; h < s.streams[l].size(); ++h) {
      c.streams.push_back(
          {uint32_t(l), uint32_t(h), s.streams[l][h].EncodeCheckpoint()});
    }
    // The layer's kept step, under a head number no stream has.
    if (s.last[l].position >= 0 && s.last[l].kept) {
      c.streams.push_back(
          {uint32_t(l), kKeptStepRecord, EncodeLastStep(s.last[l])});
    }
  }
  KVMEM_RETURN_IF_ERROR(store_->WriteCheckpoint(c));
  s.log_bytes = 0;
  MutexLock lock(&s.durable_mu);
  s.written_next = s.layer_next;
  s.synced_next = s.layer_next;
  return absl::OkStatus();
}

absl::Status Engine::HibernateLocked(LiveSession& s)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  KVMEM_RETURN_IF_ERROR(CheckpointLocked(s));
  s.hibernated = ComputeLiveFigures(s);
  ReleaseDevice(s, /*host_current=*/true);  // the checkpoint read it back
  // Everything the checkpoint holds is rebuilt by Wake; layer_next keeps
  // its size for Wake to refill.
  for (std::vector<StreamState>& layer : s.streams) layer.clear();
  for (LastStep& last : s.last) last = LastStep();
  memory_bytes_.fetch_sub(s.memory_bytes);
  s.memory_bytes = 0;
  s.woken = false;
  hibernations_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

int Engine::HibernateIdle(const std::vector<LiveSession*>& busy, int64_t want) {
  return ForEachIdle(
      busy,
      [&] {
        return memory_bytes_.load(std::memory_order_relaxed) + want <=
               memory_limit_bytes_;
      },
      [&](LiveSession& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        bool healthy;
        {
          MutexLock lock(&s.durable_mu);
          healthy = s.write_error.ok();
        }
        // A session whose writes failed keeps its state for the restart
        // that recovers it; a failed checkpoint leaves it awake.
        return s.woken && !s.deleted && healthy && s.memory_bytes > 0 &&
               HibernateLocked(s).ok();
      });
}

absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> Engine::Checkpoint(
    const std::string& tenant, const std::string& session_id,
    bool all_tenants) {
  std::vector<std::pair<std::shared_ptr<LiveSession>, std::string>> targets;
  if (all_tenants) {
    for (const auto& live : AllLive()) {
      targets.emplace_back(live, live->config().session_id);
    }
  } else if (!session_id.empty()) {
    KVMEM_ASSIGN_OR_RETURN(SessionInfo info,
                           registry_->Get(tenant, session_id));
    targets.emplace_back(Live(Key(tenant, session_id), info), session_id);
  } else {
    std::string token;
    do {
      KVMEM_ASSIGN_OR_RETURN(SessionRegistry::ListPage page,
                             registry_->List(tenant, 1000, token, {}));
      for (const SessionInfo& info : page.sessions) {
        const std::string& id = info.manifest.config.session_id;
        targets.emplace_back(Live(Key(tenant, id), info), id);
      }
      token = page.next_page_token;
    } while (!token.empty());
  }
  std::vector<std::pair<std::string, int64_t>> durable;
  for (auto& [live, id] : targets) {
    MutexLock lock(&live->mu);
    if (live->deleted) continue;
    if (!live->woken) {
      absl::Status woke = Wake(*live);
      if (!woke.ok()) {
        return absl::Status(woke.code(), absl::StrCat("session \"", id,
                                                      "\": ", woke.message()));
      }
    }
    KVMEM_RETURN_IF_ERROR(CheckpointLocked(*live));
    durable.emplace_back(id, live->DurablePosition());
  }
  return durable;
}

void Engine::SyncLoop() {
  absl::Time last_sweep = absl::Now();
  for (;;) {
    if (absl::Now() - last_sweep >= absl::Seconds(1)) {
      SweepExpired();
      last_sweep = absl::Now();
    }
    {
      std::unique_lock<Mutex> lock(sync_mu_);
      sync_wake_.wait_for(
          lock, std::chrono::milliseconds(options_.wal_sync_ms),
          [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; });
      if ([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; }()) {
        return;
      }
    }
    // What was written before the sync is durable after it.
    std::vector<std::shared_ptr<LiveSession>> live = AllLive();
    std::vector<std::vector<int64_t>> written(live.size());
    bool pending = false;
    for (size_t i = 0; i < live.size(); ++i) {
      MutexLock lock(&live[i]->durable_mu);
      written[i] = live[i]->written_next;
      pending = pending || written[i] != live[i]->synced_next;
    }
    if (!pending) continue;
    if (!store_->SyncWal().ok()) continue;  // retried next round
    for (size_t i = 0; i < live.size(); ++i) {
      MutexLock lock(&live[i]->durable_mu);
      for (size_t l = 0; l < written[i].size(); ++l) {
        live[i]->synced_next[l] =
            std::max(live[i]->synced_next[l], written[i][l]);
      }
    }
  }
}

}  // namespace kvmem
