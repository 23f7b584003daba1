// The engine: every session's live state and the step over a batch of
// sessions (DESIGN.md § A decode step), on the CPU backend. Lifecycle calls
// go through the persisted SessionRegistry; live state (streams, positions)
// is built lazily on a session's first step.
//
// Thread-safe. Steps of different sessions run concurrently; a request
// locks its sessions (in a fixed order, so requests sharing sessions cannot
// deadlock) for the whole request, which makes it apply wholly or not at
// all.
#ifndef KVMEM_SERVICE_ENGINE_ENGINE_H_
#define KVMEM_SERVICE_ENGINE_ENGINE_H_

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "service/engine/session_registry.h"
#include "service/engine/step_types.h"
#include "storage/store.h"

namespace kvmem {

struct EngineStats {
  int64_t sessions = 0;
  int64_t memory_bytes = 0;        // host bytes of live state
  int64_t memory_limit_bytes = 0;  // Options::memory_limit_bytes in force
  int64_t steps = 0;            // entries applied, all modes
  int64_t tokens_appended = 0;  // tokens × layers
  int64_t resident_bytes = 0;
  int64_t spilled_bytes = 0;
};

class Engine {
 public:
  struct Options {
    SessionRegistry::Options registry;
    // Host bytes the sessions' live state may hold (cascades, digests,
    // spilled pages kept in memory). A step that could pass it is
    // RESOURCE_EXHAUSTED. 0 means 60% of the machine's physical memory.
    int64_t memory_limit_bytes = 0;
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
  //   limit (the message gives the limit and the bytes in use).
  // An entry identical to the last applied step of its (session, layer) is
  // a retry: it is answered with that step's reply and not applied again
  // (FETCH replies over 1 MiB are not kept: FAILED_PRECONDITION).
  // On error nothing changes.
  absl::StatusOr<std::vector<StepEntryResult>> Step(
      const std::string& tenant, const StepRequestView& request);

  EngineStats Stats();

 private:
  struct LastStep;
  struct LiveSession;
  using Key = std::pair<std::string, std::string>;  // (tenant, session_id)

  Engine(std::unique_ptr<SessionRegistry> registry, int64_t memory_limit_bytes);
  // The live state of `info`'s session, made on first use.
  std::shared_ptr<LiveSession> Live(const Key& key, const SessionInfo& info);
  // `info` with the live figures of its session, if it has live state.
  void AddLiveFigures(SessionInfo* info);

  std::unique_ptr<SessionRegistry> registry_;
  Mutex mu_;
  // Shared with steps in flight, which keep a deleted session's state
  // alive until they finish.
  std::map<Key, std::shared_ptr<LiveSession>> live_ ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> steps_{0};
  std::atomic<int64_t> tokens_appended_{0};
  const int64_t memory_limit_bytes_;
  std::atomic<int64_t> memory_bytes_{0};  // Σ live sessions' memory_bytes
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_ENGINE_H_
