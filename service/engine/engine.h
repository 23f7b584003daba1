// The engine: every session's live state and the step over a batch of
// sessions (DESIGN.md § A decode step), on the CPU backend. Lifecycle calls
// go through the persisted SessionRegistry; live state (streams, positions)
// is built lazily on a session's first use: from its last checkpoint and
// the step log after it (DESIGN.md § Persistence), so a restart — graceful
// or a crash — resumes every session where its storage says.
//
// Each applied request writes one batch (sealed spill pages and the step
// log records of its entries) through a background SpillWriter: ASYNC
// sessions reply at once and become durable when the write-ahead log is
// synced (every wal_sync_ms); a request holding a STEP_SYNC session replies
// only after its batch is synced.
//
// Thread-safe. Steps of different sessions run concurrently; a request
// locks its sessions (in a fixed order, so requests sharing sessions cannot
// deadlock) for the whole request, which makes it apply wholly or not at
// all.
#ifndef KVMEM_SERVICE_ENGINE_ENGINE_H_
#define KVMEM_SERVICE_ENGINE_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "base/parallel_for.h"
#include "service/engine/session_registry.h"
#include "service/engine/step_types.h"
#include "storage/page_cache.h"
#include "storage/spill_writer.h"
#include "storage/store.h"

namespace kvmem {

struct HeadWork;      // service/engine/live_session.h
class DeviceBackend;  // service/engine/device_backend.h
struct DeviceSlotWrite;

// Where Step's time goes, summed over every request since start.
enum class StepPhase : int {
  kLock = 0,     // waiting for the request's sessions
  kPlan = 1,     // validation, waking, selection
  kDevice = 2,   // CUDA backend: staging, the launches, results
  kApply = 3,    // the host policy (and attention on the CPU backend)
  kDeviceWrite,  // CUDA backend: changed rows back to the device
  kWrite,        // the batch to the writer, checkpoints due (not the
                 // STEP_SYNC wait, which holds no lock)
  kDeviceRows,   // CUDA backend: uploads and each head's row list
  kRecall,       // reading the spilled pages a selection took
  kDeviceWait,   // CUDA backend: waiting for a device-owned step's kernels
  kDeviceSpill,  // CUDA backend: the tokens a device-owned step evicted, to
                 // the host's spilled pages
  kSessions,     // finding the request's sessions (before their locks)
  // Added by the RPC layer (AddStepPhaseNanos), around Engine::Step:
  kQueue,    // a received request waiting for a worker thread
  kConvert,  // the request's views, the reply's message
  kCount,
};
inline constexpr const char* kStepPhaseNames[] = {
    "lock",     "plan",        "device", "apply",       "device_write",
    "write",    "device_rows", "recall", "device_wait", "device_spill",
    "sessions", "queue",       "convert"};
static_assert(sizeof(kStepPhaseNames) / sizeof(kStepPhaseNames[0]) ==
              size_t(StepPhase::kCount));

struct EngineStats {
  int64_t sessions = 0;
  int64_t memory_bytes = 0;        // host bytes of live state
  int64_t memory_limit_bytes = 0;  // Options::memory_limit_bytes in force
  int64_t steps = 0;               // entries applied, all modes
  int64_t tokens_appended = 0;     // tokens × layers
  int64_t resident_bytes = 0;
  int64_t spilled_bytes = 0;
  int64_t spill_queue_bytes = 0;  // batches waiting for the writer
  int64_t hibernations = 0;       // idle sessions hibernated for room
  int64_t device_pool_bytes = 0;  // CUDA backend: the pool, and in use
  int64_t device_pool_used_bytes = 0;
  // CUDA backend: device bytes beside the pool (device-owned layers' state,
  // staging and scratch; DeviceBackend::side_bytes).
  int64_t device_side_bytes = 0;
  int64_t device_evictions = 0;  // idle sessions' device rows freed for room
  // Decode steps the CUDA backend could not take (no room even after
  // evictions, or a device error) that the CPU oracle computed instead.
  int64_t device_fallbacks = 0;
  // Steps whose whole policy ran on the device (device-owned layers:
  // DeviceBackend::DecodeOwned and PrefillOwned).
  int64_t device_policy_steps = 0;
  // Decode steps whose attention ran on the device, the policy on the host
  // (dense layers, CACHE_RANK; Engine::AttendOnDevice), per entry.
  int64_t device_attend_steps = 0;
  int64_t step_phase_nanos[int(StepPhase::kCount)] = {};
};

class Engine {
 public:
  struct Options {
    SessionRegistry::Options registry;
    // Host bytes the sessions' live state may hold (cascades, digests, open
    // spill pages, sealed pages' digests). A step that could pass it first
    // hibernates the least recently used idle sessions (checkpointed, then
    // dropped from memory; woken from storage on their next request), and
    // is RESOURCE_EXHAUSTED only when that does not make room. 0 means 60%
    // of the machine's physical memory.
    int64_t memory_limit_bytes = 0;
    // ASYNC sessions: how often the write-ahead log is synced, ms. ≥ 1.
    int wal_sync_ms = 100;
    // A session checkpoints itself when its step log passes this. ≥ 1 MiB.
    int64_t max_log_bytes = int64_t{256} << 20;
    // Bytes of spill batches waiting for the writer before steps wait.
    size_t spill_queue_bytes = size_t{256} << 20;
    // Recalled spilled pages kept in memory (LRU), bytes.
    size_t page_cache_bytes = size_t{256} << 20;
    // The clock for idle time-to-live, Unix µs; tests substitute their own.
    std::function<int64_t()> now_unix_micros;
    // Threads that run a step's per-KV-head work (selection, the host
    // policy) beside the request's own; -1: one fewer than the cores, at
    // most 15. 0: all on the request's thread.
    int step_threads = -1;
    // How long those threads spin before sleeping, µs; −1: the default,
    // none (base/parallel_for.h).
    int step_spin_us = -1;
    // The CUDA backend (device_backend.h), or null: the CPU oracle alone.
    // With it, decode steps (T = 1, ATTEND or FETCH) of sparse ABSOLUTE
    // layers run the whole policy there, the layer's state held on the
    // device (StepOwned); other decode steps not in CACHE_RANK attend on
    // the device over rows held there, the policy staying here.
    std::shared_ptr<DeviceBackend> device;
  };

  // Loads the sessions of `store` (which must outlive the engine).
  // Errors as SessionRegistry::Open.
  static absl::StatusOr<std::unique_ptr<Engine>> Open(const Options& options,
                                                      storage::Store* store);
  ~Engine();

  // As SessionRegistry's, with live figures (positions, resident and
  // spilled tokens) filled in.
  absl::StatusOr<SessionInfo> CreateSession(SessionConfig config);
  absl::StatusOr<SessionInfo> GetSession(const std::string& tenant,
                                         const std::string& session_id);
  absl::StatusOr<SessionRegistry::ListPage> ListSessions(
      const std::string& tenant, int page_size, const std::string& page_token,
      const std::map<std::string, std::string>& label_filter);
  absl::Status DeleteSession(const std::string& tenant,
                             const std::string& session_id);

  // One layer of a batch of sessions; results in entry order. Validated
  // whole before anything is applied:
  // - INVALID_ARGUMENT naming `entries[i].field` or `layer`/`mode`: bad mode,
  //   no entries or more than kMaxEntriesPerStep, a session twice, layer
  //   out of the session's range, num_tokens outside 1..kMaxTokensPerEntry,
  //   a q/k/v byte length that is not [T, heads, D] in the session's dtype
  //   (q may be empty in APPEND only);
  // - NOT_FOUND: `entries[i].session_id` unknown to `tenant`;
  // - FAILED_PRECONDITION: `entries[i].position` is not the layer's next,
  //   naming the expected one;
  // - RESOURCE_EXHAUSTED: the step could take the engine past its memory
  //   limit even after hibernating every idle session (the message gives
  //   the limit and the bytes in use).
  // An entry identical to the last applied step of its (session, layer) is
  // a retry: it is answered with that step's reply and not applied again
  // (FETCH replies over 1 MiB are not kept: FAILED_PRECONDITION).
  // On error nothing changes.
  absl::StatusOr<std::vector<StepEntryResult>> Step(
      const std::string& tenant, const StepRequestView& request);

  // Makes `session_id` (or, when empty, every session of `tenant`; with
  // `all_tenants`, every live session) durable now: a checkpoint of every
  // stream, the step log truncated. Returns (session_id, durable position)
  // pairs. NOT_FOUND for an unknown session; UNAVAILABLE / DATA_LOSS when
  // storage fails.
  absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> Checkpoint(
      const std::string& tenant, const std::string& session_id,
      bool all_tenants = false);

  EngineStats Stats();
  // Time spent on Step requests outside Engine::Step (kQueue, kConvert),
  // counted with Step's own phases.
  void AddStepPhaseNanos(StepPhase phase, int64_t nanos) {
    phase_nanos_[int(phase)].fetch_add(nanos, std::memory_order_relaxed);
  }

  // Deletes every session idle past its policy.idle_ttl_seconds (the sync
  // loop calls this about once a second). Returns how many it deleted.
  int SweepExpired();

 private:
 public:  // for engine-internal helpers (live_session.h)
  struct LastStep;
  struct LiveSession;

 private:
  using Key = std::pair<std::string, std::string>;  // (tenant, session_id)
  // Device rows a request rewrites, by row bytes (one launch each).
  using DeviceWrites = std::map<int, std::vector<DeviceSlotWrite>>;
  struct HeadsApplied;  // live_session.h

  Engine(const Options& options, storage::Store* store,
         std::unique_ptr<SessionRegistry> registry, int64_t memory_limit_bytes);
  // The live state of `info`'s session, made on first use (not yet
  // recovered: Wake does that under the session's lock).
  std::shared_ptr<LiveSession> Live(const Key& key, const SessionInfo& info);
  // Step's lookup: the live state of the ready session `key` (touched as
  // used), made on first use. NOT_FOUND as SessionRegistry::Get.
  absl::StatusOr<std::shared_ptr<LiveSession>> LiveForStep(const Key& key,
                                                           int64_t now);
  // The three helpers below need the caller to hold s.mu; LiveSession is
  // incomplete here, so Clang's analysis cannot be told, and their
  // definitions opt out of it.
  // Rebuilds `s` from its checkpoint and step log, once. Caller holds s.mu.
  absl::Status Wake(LiveSession& s);
  // `info` with the live figures of its session, waking it if needed.
  absl::Status AddLiveFigures(SessionInfo* info);
  // Checkpoints `s`. Caller holds s.mu (held across the synced write: a
  // checkpoint must not interleave with a step of the same session).
  absl::Status CheckpointLocked(LiveSession& s);
  // Checkpoints `s`, then drops its live state (Wake rebuilds it on the
  // next use). Caller holds s.mu.
  absl::Status HibernateLocked(LiveSession& s);
  // Hibernates idle sessions, least recently used first, skipping `busy`
  // (whose locks the caller holds) and any whose lock another request
  // holds, until memory_bytes_ + `want` fits the limit. Returns how many it
  // hibernated.
  int HibernateIdle(const std::vector<LiveSession*>& busy, int64_t want);
  // Calls `act` on idle sessions under their lock, least recently used
  // first, skipping `busy` (whose locks the caller holds) and any another
  // request holds, until `enough` says so. Returns how many `act` said it
  // acted on.
  int ForEachIdle(const std::vector<LiveSession*>& busy,
                  const std::function<bool()>& enough,
                  const std::function<bool(LiveSession&)>& act);
  // CUDA backend: frees the device rows of idle sessions, least recently
  // used first (their host state stays; rows go up again on next use),
  // skipping `busy`, until `room` says there is room. Returns how many
  // sessions it freed.
  int EvictIdleDeviceRows(const std::vector<LiveSession*>& busy,
                          const std::function<bool()>& room);
  // Releases every device row of `s`; device-owned layers first bring
  // their state back unless `host_current` (the host copy is current, or
  // not wanted). Caller holds s.mu.
  void ReleaseDevice(LiveSession& s, bool host_current = false);
  // Makes the host copy of `s`'s device-owned layers current (ReadPolicy,
  // AdoptCascade); `drop` also ends their device ownership. When the device
  // cannot give the state back, the session's host copy is stale: it is
  // marked failed (steps refused until a restart recovers it from storage)
  // and UNAVAILABLE returned. Caller holds s.mu.
  absl::Status SyncToHost(LiveSession& s, bool drop);
  absl::Status SyncLayerToHost(LiveSession& s, size_t layer, bool drop);
  // Steps of device-owned layers (the entries `owned` marks): decode steps
  // (ATTEND, FETCH) through DeviceBackend::DecodeOwned and prefill chunks
  // through PrefillOwned (StepOwnedChunks), the whole policy on the device;
  // the evicted tokens spilled on the host into done[i]. Layers are made
  // device-owned by the caller. An error before anything changed is
  // returned as is; one after marks the sessions failed. Callers hold
  // every session's lock.
  absl::Status StepOwnedChunks(
      const std::vector<std::shared_ptr<LiveSession>>& sessions,
      const StepRequestView& request, const std::vector<bool>& owned,
      std::vector<HeadsApplied>& done, std::set<size_t>* stepped);
  // Releases the device state of `entries` (stepped on the device by a
  // request that now fails, so never logged), marks their sessions failed
  // and returns UNAVAILABLE naming `cause`.
  absl::Status FailOwnedSteps(
      const std::vector<std::shared_ptr<LiveSession>>& sessions, size_t layer,
      const std::set<size_t>& entries, const absl::Status& cause);
  // Parts of StepOwned's time that the Step phases show apart.
  struct OwnedStepNanos {
    int64_t recall = 0;  // reading the spilled pages the device selected
    int64_t wait = 0;    // waiting for the device (DecodeOwned's syncs)
    int64_t spill = 0;   // evicted tokens to the host's spilled pages
  };
  // ATTEND decode entries' outputs go straight into results[i] (the
  // device rounds them to the dtype), which done[i] then says.
  absl::Status StepOwned(
      const std::vector<std::shared_ptr<LiveSession>>& sessions,
      const std::vector<LiveSession*>& busy, const StepRequestView& request,
      const std::vector<bool>& owned, std::vector<HeadsApplied>& done,
      std::vector<StepEntryResult>& results, OwnedStepNanos* nanos);
  // Whether entry `e` of layer `layer` of `s` may step as a device-owned
  // layer: uploads its rows and its policy state when needed (evicting idle
  // sessions' rows for room). False keeps it on the host path.
  bool TakeLayer(LiveSession& s, size_t layer, StepMode mode,
                 const StepEntryView& e, size_t entries,
                 const std::vector<LiveSession*>& busy);
  // Uploads layer `layer`'s rows of `s` if they are not on the device;
  // false (counted in device_fallbacks) when they do not fit.
  bool UploadLayer(LiveSession& s, size_t layer,
                   const std::vector<LiveSession*>& busy);
  // The device attention of the request's eligible decode entries, in
  // work[i][h].external; entries that cannot use it keep the CPU path.
  // Uploads layers not yet on the device, evicting idle sessions' rows for
  // room; what still does not fit (or meets a device error) stays on the
  // CPU path, which holds the same state. Callers hold every session's
  // lock.
  absl::Status AttendOnDevice(
      const std::vector<std::shared_ptr<LiveSession>>& sessions,
      const std::vector<LiveSession*>& busy, const StepRequestView& request,
      const std::vector<bool>& skip, std::vector<std::vector<HeadWork>>& work,
      int64_t* rows_nanos);
  // Every wal_sync_ms: syncs the write-ahead log, then advances the
  // durable positions of what was written before the sync.
  void SyncLoop();
  std::vector<std::shared_ptr<LiveSession>> AllLive();
  int64_t Now() const;  // Options::now_unix_micros, or the wall clock
  // Makes layer `layer`'s streams of `s` (caller holds s.mu); INTERNAL
  // naming `field` if the policy cannot make them.
  absl::Status MakeStreams(LiveSession& s, int layer, const std::string& field);
  // Applies one entry's step to layer `layer` of `s` (selections and
  // recalled pages in `work`): fills *result and appends the sealed pages to
  // *batch (null when replaying the log: they are stored already). INTERNAL
  // if a stream step fails, which validation rules out. Caller holds s.mu.
  absl::Status ApplyEntry(LiveSession& s, int layer, StepMode mode,
                          int64_t position, int num_tokens,
                          std::vector<HeadWork>& work, StepEntryResult* result,
                          storage::SpillBatch* batch,
                          DeviceWrites* device_writes,
                          HeadsApplied* done = nullptr);
  // A layer's heads' policy steps, run before ApplyEntry assembles them
  // (so that a request's heads of every entry run side by side): `done`
  // given to ApplyEntry holds their outputs. PrepareHeads sizes it and
  // counts the streams' bytes before; ApplyHead steps head h. Caller holds
  // s.mu.
  void PrepareHeads(LiveSession& s, int layer, HeadsApplied* done);
  void ApplyHead(LiveSession& s, int layer, StepMode mode, int64_t position,
                 int T, HeadWork& w, HeadsApplied* done, size_t h);
  // Fills work->recalled with the pages work->selection.recall names: from
  // the writer's queue, the page cache, or storage (one MultiGet).
  absl::Status LoadRecalled(uint64_t seq, int layer, int head, HeadWork* work);

  const Options options_;
  storage::Store* const store_;  // not owned; outlives the engine
  std::unique_ptr<SessionRegistry> registry_;
  std::unique_ptr<storage::SpillWriter> writer_;
  std::unique_ptr<storage::PageCache> page_cache_;
  std::unique_ptr<ParallelFor> parallel_;
  Mutex mu_;
  // Shared with steps in flight, which keep a deleted session's state
  // alive until they finish.
  std::map<Key, std::shared_ptr<LiveSession>> live_ ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> steps_{0};
  std::atomic<int64_t> use_clock_{0};  // ticks once per request, for LRU
  std::atomic<int64_t> hibernations_{0};
  std::atomic<int64_t> device_evictions_{0};
  std::atomic<int64_t> phase_nanos_[int(StepPhase::kCount)] = {};
  std::atomic<int64_t> device_fallbacks_{0};
  std::atomic<int64_t> device_policy_steps_{0};
  std::atomic<int64_t> device_attend_steps_{0};
  std::atomic<int64_t> tokens_appended_{0};
  const int64_t memory_limit_bytes_;
  std::atomic<int64_t> memory_bytes_{0};  // Σ live sessions' memory_bytes
  Mutex sync_mu_;
  std::condition_variable_any sync_wake_;
  bool stopping_ ABSL_GUARDED_BY(sync_mu_) = false;
  std::thread sync_thread_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_ENGINE_H_
