// Internal to the engine (engine.cc, engine_recovery.cc): one session's live
// state, and the per-head work of one step. Not a public header.
#ifndef KVMEM_SERVICE_ENGINE_LIVE_SESSION_H_
#define KVMEM_SERVICE_ENGINE_LIVE_SESSION_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "base/mutex.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/engine/manifest_codec.h"
#include "service/engine/stream_state.h"

namespace kvmem {

// What a (session, layer) keeps of its last applied step, so that an
// identical repeat (a retry after a lost reply) is answered again instead of
// being applied twice (DESIGN.md § Errors).
struct Engine::LastStep {
  int64_t position = -1;
  int num_tokens = 0;
  StepMode mode = StepMode::kAttend;
  uint64_t fingerprint = 0;  // of q, k and v; stable across restarts
  bool kept = false;         // false: the reply was too large to keep
  StepEntryResult reply;
};

// What GetSession / ListSessions report of a session's live state.
struct LiveFigures {
  std::vector<int64_t> layer_next;
  std::vector<int64_t> resident_tokens_per_cascade;  // [sinks, C0, C1, ...]
  int64_t resident_tokens = 0;
  int64_t spilled_pages = 0;
  int64_t spilled_bytes = 0;
};

// A session's live state. The config parts are fixed at creation; the rest
// is guarded by `mu`, and what the writer's callbacks and the sync loop
// update by `durable_mu` (never held while taking `mu`).
struct Engine::LiveSession {
  SessionManifest manifest;    // as created; manifest.seq keys its storage
  StreamConfig stream_config;  // StreamStates point here; never moves
  std::vector<uint8_t> dense;  // [layers]: layer attends densely
  const SessionConfig& config() const { return manifest.config; }

  Mutex mu;
  // False until Wake rebuilt the state from checkpoint and step log.
  bool woken ABSL_GUARDED_BY(mu) = false;
  // Set while hibernated: the figures at hibernation (all durable), so
  // that describing or listing it does not wake it.
  std::optional<LiveFigures> hibernated ABSL_GUARDED_BY(mu);
  std::vector<int64_t> layer_next ABSL_GUARDED_BY(mu);  // [layers]
  // [layers][kv_heads]; a layer's streams are made on its first step.
  std::vector<std::vector<StreamState>> streams ABSL_GUARDED_BY(mu);
  // [layers]: each layer's last applied step, for answering retries.
  std::vector<LastStep> last ABSL_GUARDED_BY(mu);
  // CUDA backend: [layers] each layer's rows on the device (empty: not
  // there; uploaded by the first decode step that attends there).
  std::vector<DeviceLayerRows> device ABSL_GUARDED_BY(mu);
  // Host bytes of `streams`, counted in Engine::memory_bytes_.
  int64_t memory_bytes ABSL_GUARDED_BY(mu) = 0;
  // Step log bytes since the last checkpoint.
  int64_t log_bytes ABSL_GUARDED_BY(mu) = 0;
  // Set by DeleteSession: steps already holding this state are refused.
  bool deleted ABSL_GUARDED_BY(mu) = false;
  // Engine::use_clock_ at this session's last step: the least recently
  // used idle session is hibernated first. Read without `mu`.
  std::atomic<int64_t> last_used{0};

  Mutex durable_mu;
  // [layers]: end position of the last step whose batch is written / synced.
  std::vector<int64_t> written_next ABSL_GUARDED_BY(durable_mu);
  std::vector<int64_t> synced_next ABSL_GUARDED_BY(durable_mu);
  // A failed write of this session's steps: its memory is ahead of its
  // storage, so it refuses steps until a restart recovers it.
  absl::Status write_error ABSL_GUARDED_BY(durable_mu);

  // Tokens durable in every layer.
  int64_t DurablePosition() {
    MutexLock lock(&durable_mu);
    int64_t durable = synced_next.empty() ? 0 : synced_next[0];
    for (int64_t p : synced_next) durable = std::min(durable, p);
    return durable;
  }
};

// The figures of `s`'s live state (woken). Caller holds s.mu.
LiveFigures ComputeLiveFigures(const Engine::LiveSession& s);

// One KV head's share of one entry of a step.
struct HeadWork {
  std::vector<float> queries;  // [T, G, D] fp32; empty: no attention
  std::string keys, values;    // [T, D] session dtype
  StreamSelection selection;
  std::vector<std::shared_ptr<const storage::SpillPage>> recalled;
  // CUDA backend: the attention computed on the device, when `on_device`.
  bool on_device = false;
  ExternalAttention external;

  StreamStepInput Input(int64_t position, int num_tokens) const {
    StreamStepInput in;
    in.position = position;
    in.num_tokens = num_tokens;
    in.queries = queries;
    in.keys = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(keys.data()), keys.size());
    in.values = absl::Span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(values.data()), values.size());
    return in;
  }
};

// The policy steps of one entry's heads, done before ApplyEntry.
struct Engine::HeadsApplied {
  std::vector<StreamStepOutput> outputs;  // [H]
  std::vector<absl::Status> status;       // [H]
  int64_t bytes_before = 0;  // the layer's streams' memory before them
  // ATTEND: the heads' outputs are in the entry's reply already (a device
  // decode step wrote them there), not in `outputs`.
  bool outputs_in_reply = false;
};

// A layer's kept step as a checkpoint stores it (step_log.cc), so that a
// retry after a graceful restart is still answered.
std::string EncodeLastStep(const Engine::LastStep& last);
absl::StatusOr<Engine::LastStep> DecodeLastStep(absl::string_view body);

// Records `e`'s applied step and its reply in *last, for retries.
void KeepLastStep(StepMode mode, const StepEntryView& e,
                  const StepEntryResult& result, Engine::LastStep* last);

// Splits an entry's q [T, Hq, D], k and v [T, H, D] into per-head work.
std::vector<HeadWork> SplitHeads(const ModelShape& shape, int num_tokens,
                                 absl::string_view q, absl::string_view k,
                                 absl::string_view v);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_LIVE_SESSION_H_
