#include "service/engine/session_registry.h"

#include <algorithm>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"

namespace kvmem {
namespace {

constexpr char kPageTokenPrefix[] = "after:";

int64_t NowMicros() { return absl::ToUnixMicros(absl::Now()); }

// "s-" and 32 hex digits from the OS's entropy: unique without coordination.
std::string NewSessionId() {
  std::random_device rd;
  std::string id = "s-";
  for (int i = 0; i < 4; ++i) {
    absl::StrAppend(&id, absl::Hex(uint32_t(rd()), absl::kZeroPad8));
  }
  return id;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SessionRegistry>> SessionRegistry::Open(
    const Options& options, storage::Store* store) {
  std::unique_ptr<SessionRegistry> registry(
      new SessionRegistry(options, store));
  // Read outside the lock (a lambda's body is opaque to the analysis), then
  // published under it.
  std::map<Key, Entry> loaded;
  const int64_t now = NowMicros();
  KVMEM_RETURN_IF_ERROR(store->ForEachManifest(
      [&](uint64_t seq, absl::string_view body) -> absl::Status {
        absl::StatusOr<SessionManifest> manifest = DecodeManifest(body);
        if (!manifest.ok()) {
          return absl::DataLossError(absl::StrCat("session #", seq, ": ",
                                                  manifest.status().message()));
        }
        Entry entry;
        entry.manifest = std::move(*manifest);
        entry.last_used_unix_micros = now;
        Key key(entry.manifest.config.tenant, entry.manifest.config.session_id);
        loaded.emplace(std::move(key), std::move(entry));
        return absl::OkStatus();
      }));
  MutexLock lock(&registry->mu_);
  registry->sessions_ = std::move(loaded);
  return registry;
}

SessionInfo SessionRegistry::Describe(const Entry& entry) {
  SessionInfo info;
  info.manifest = entry.manifest;
  const std::vector<int64_t>& next = entry.manifest.layer_next_positions;
  info.position =
      next.empty() ? 0 : *std::min_element(next.begin(), next.end());
  info.last_used_unix_micros = entry.last_used_unix_micros;
  return info;
}

absl::StatusOr<SessionInfo> SessionRegistry::Create(SessionConfig config) {
  KVMEM_RETURN_IF_ERROR(ValidateTenant(config.tenant));
  KVMEM_RETURN_IF_ERROR(ValidateSessionConfig(config));
  if (config.session_id.empty()) config.session_id = NewSessionId();
  Key key(config.tenant, config.session_id);

  Entry entry;
  entry.state = State::kCreating;
  entry.manifest.config = std::move(config);
  entry.manifest.create_time_unix_micros = NowMicros();
  entry.manifest.layer_next_positions.assign(
      size_t(entry.manifest.config.shape.layers), 0);
  entry.last_used_unix_micros = entry.manifest.create_time_unix_micros;
  {
    MutexLock lock(&mu_);
    if (sessions_.count(key)) {
      return absl::AlreadyExistsError(
          absl::StrCat("session_id \"", key.second, "\" already exists"));
    }
    sessions_.emplace(key, entry);  // reserved; invisible until kReady
  }
  // Storage writes run unlocked; on failure the reservation is dropped.
  absl::StatusOr<uint64_t> seq = store_->NewSessionSeq();
  absl::Status written = seq.status();
  if (seq.ok()) {
    entry.manifest.seq = *seq;
    written = store_->PutManifest(*seq, EncodeManifest(entry.manifest),
                                  options_.sync_manifests);
  }
  MutexLock lock(&mu_);
  auto it = sessions_.find(key);
  if (!written.ok()) {
    sessions_.erase(it);
    return written;
  }
  it->second.manifest.seq = *seq;
  it->second.state = State::kReady;
  return Describe(it->second);
}

absl::StatusOr<SessionInfo> SessionRegistry::Get(
    const std::string& tenant, const std::string& session_id) {
  KVMEM_RETURN_IF_ERROR(ValidateSessionId(session_id, "session_id"));
  MutexLock lock(&mu_);
  auto it = sessions_.find(Key(tenant, session_id));
  if (it == sessions_.end() || it->second.state != State::kReady) {
    return absl::NotFoundError(
        absl::StrCat("session_id \"", session_id, "\" not found"));
  }
  return Describe(it->second);
}

absl::StatusOr<SessionRegistry::ListPage> SessionRegistry::List(
    const std::string& tenant, int page_size, const std::string& page_token,
    const std::map<std::string, std::string>& label_filter) {
  if (page_size == 0) page_size = 100;
  if (page_size < 1 || page_size > 1000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page_size must be in [1, 1000] (0 means 100), got ", page_size));
  }
  std::string after;
  if (!page_token.empty()) {
    if (!absl::StartsWith(page_token, kPageTokenPrefix) ||
        !ValidateSessionId(page_token.substr(sizeof(kPageTokenPrefix) - 1),
                           "page_token")
             .ok()) {
      return absl::InvalidArgumentError(
          "page_token was not produced by ListSessions");
    }
    after = page_token.substr(sizeof(kPageTokenPrefix) - 1);
  }
  ListPage page;
  MutexLock lock(&mu_);
  auto it = page_token.empty() ? sessions_.lower_bound(Key(tenant, ""))
                               : sessions_.upper_bound(Key(tenant, after));
  for (; it != sessions_.end() && it->first.first == tenant; ++it) {
    const Entry& entry = it->second;
    if (entry.state != State::kReady) continue;
    bool match = true;
    for (const auto& [label, value] : label_filter) {
      auto found = entry.manifest.config.labels.find(label);
      match = match && found != entry.manifest.config.labels.end() &&
              found->second == value;
    }
    if (!match) continue;
    if (int(page.sessions.size()) == page_size) {
      // One more exists: the page is full, and the token says where it ended.
      page.next_page_token = absl::StrCat(
          kPageTokenPrefix, page.sessions.back().manifest.config.session_id);
      break;
    }
    page.sessions.push_back(Describe(entry));
  }
  return page;
}

absl::Status SessionRegistry::Delete(const std::string& tenant,
                                     const std::string& session_id) {
  KVMEM_RETURN_IF_ERROR(ValidateSessionId(session_id, "session_id"));
  Key key(tenant, session_id);
  uint64_t seq = 0;
  {
    MutexLock lock(&mu_);
    auto it = sessions_.find(key);
    if (it == sessions_.end() || it->second.state != State::kReady) {
      return absl::NotFoundError(
          absl::StrCat("session_id \"", session_id, "\" not found"));
    }
    it->second.state = State::kDeleting;
    seq = it->second.manifest.seq;
  }
  absl::Status deleted = store_->DeleteSession(seq, options_.sync_manifests);
  MutexLock lock(&mu_);
  auto it = sessions_.find(key);
  if (!deleted.ok()) {
    it->second.state = State::kReady;  // nothing was removed
    return deleted;
  }
  sessions_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> SessionRegistry::TouchReady(
    const std::string& tenant, const std::string& session_id,
    int64_t now_unix_micros) {
  MutexLock lock(&mu_);
  auto it = sessions_.find(Key(tenant, session_id));
  if (it == sessions_.end() || it->second.state != State::kReady) {
    return absl::NotFoundError(
        absl::StrCat("session_id \"", session_id, "\" not found"));
  }
  it->second.last_used_unix_micros =
      std::max(it->second.last_used_unix_micros, now_unix_micros);
  return it->second.manifest.seq;
}

std::vector<std::pair<std::string, std::string>> SessionRegistry::Expired(
    int64_t now_unix_micros) {
  std::vector<std::pair<std::string, std::string>> expired;
  MutexLock lock(&mu_);
  for (const auto& [key, entry] : sessions_) {
    const int64_t ttl = entry.manifest.config.policy.idle_ttl_seconds;
    if (entry.state == State::kReady && ttl > 0 &&
        now_unix_micros - entry.last_used_unix_micros > ttl * 1000000) {
      expired.push_back(key);
    }
  }
  return expired;
}

int64_t SessionRegistry::SessionCount() {
  MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [key, entry] : sessions_) n += entry.state == State::kReady;
  return n;
}

}  // namespace kvmem
