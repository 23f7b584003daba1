// Every session of a server: created, described, listed and deleted, with
// its manifest persisted in storage so that sessions survive restarts.
// The engine (engine.h) looks sessions up here and keeps their live state.
//
// Thread-safe. Storage writes happen outside the registry's lock: a session
// being created or deleted is reserved in the index first, so concurrent
// calls see ALREADY_EXISTS / NOT_FOUND instead of waiting on the disk.
#ifndef KVMEM_SERVICE_ENGINE_SESSION_REGISTRY_H_
#define KVMEM_SERVICE_ENGINE_SESSION_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "service/engine/manifest_codec.h"
#include "service/engine/session_config.h"
#include "storage/store.h"

namespace kvmem {

// A session as GetSession describes it.
struct SessionInfo {
  SessionManifest manifest;
  int64_t position = 0;  // tokens stored in every layer
  int64_t resident_tokens = 0;
  // [1 + cascades]: sinks, then each cascade; summed over streams.
  std::vector<int64_t> resident_tokens_per_cascade;
  int64_t spilled_pages = 0;
  int64_t spilled_bytes = 0;
  int64_t last_used_unix_micros = 0;
};

class SessionRegistry {
 public:
  struct Options {
    // Sync manifest writes (creation, deletion) to disk before replying.
    // Default true: a created session must survive a crash.
    bool sync_manifests = true;
  };

  // Loads every manifest from `store`, which must outlive the registry.
  // DATA_LOSS names a session whose manifest is corrupt; UNAVAILABLE when
  // storage fails.
  static absl::StatusOr<std::unique_ptr<SessionRegistry>> Open(
      const Options& options, storage::Store* store);

  // Creates a session for `config.tenant` (an empty `config.session_id`
  // gets a fresh unique id). INVALID_ARGUMENT names the bad field;
  // ALREADY_EXISTS if the tenant has that id; UNAVAILABLE / INTERNAL when
  // storage fails. On error nothing is created.
  absl::StatusOr<SessionInfo> Create(SessionConfig config);

  // NOT_FOUND unless `tenant` has session `session_id`.
  absl::StatusOr<SessionInfo> Get(const std::string& tenant,
                                  const std::string& session_id);

  struct ListPage {
    std::vector<SessionInfo> sessions;  // in session_id order
    std::string next_page_token;        // empty on the last page
  };
  // `tenant`'s sessions having every label of `label_filter`, after the one
  // `page_token` names. page_size: 1..1000, 0 means 100. INVALID_ARGUMENT
  // for a bad page_size or a page_token this registry did not produce.
  absl::StatusOr<ListPage> List(
      const std::string& tenant, int page_size, const std::string& page_token,
      const std::map<std::string, std::string>& label_filter);

  // Removes the session and every stored key of it. NOT_FOUND; UNAVAILABLE
  // when storage fails, in which case the session stays as it was.
  absl::Status Delete(const std::string& tenant, const std::string& session_id);

  // Sessions of every tenant.
  int64_t SessionCount();

  // A step's lookup: marks the session used at `now_unix_micros` and
  // returns its manifest's seq (which incarnation it is), under one lock
  // and without copying the manifest. NOT_FOUND as Get.
  absl::StatusOr<uint64_t> TouchReady(const std::string& tenant,
                                      const std::string& session_id,
                                      int64_t now_unix_micros);

  // (tenant, session_id) of every session whose policy.idle_ttl_seconds is
  // set and which has not been used for that long at `now_unix_micros`.
  std::vector<std::pair<std::string, std::string>> Expired(
      int64_t now_unix_micros);

 private:
  enum class State { kReady, kCreating, kDeleting };
  struct Entry {
    SessionManifest manifest;
    State state = State::kReady;
    int64_t last_used_unix_micros = 0;
  };
  using Key = std::pair<std::string, std::string>;  // (tenant, session_id)

  SessionRegistry(const Options& options, storage::Store* store)
      : options_(options), store_(store) {}
  static SessionInfo Describe(const Entry& entry);

  const Options options_;
  storage::Store* const store_;  // not owned; outlives this
  Mutex mu_;
  std::map<Key, Entry> sessions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_SESSION_REGISTRY_H_
