// A bounded LRU cache of recalled spilled pages, so that a page recalled
// step after step is read from RocksDB once. Bounded by bytes
// (SpillPage::MemoryBytes); inserting past the bound evicts the least
// recently used pages first.
//
// Pages are immutable and shared (shared_ptr, see SpillBatch): a page
// evicted while a caller still holds it stays valid for that caller.
// A re-spilled page (same PageId, e.g. on replay) must be Inserted again or
// Erased by the caller; the cache does not watch the store.
//
// Thread-safe.
#ifndef KVMEM_STORAGE_PAGE_CACHE_H_
#define KVMEM_STORAGE_PAGE_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "base/mutex.h"
#include "storage/spill_page.h"

namespace kvmem::storage {

class PageCache {
 public:
  // `capacity_bytes`: the most bytes of pages held; 0 caches nothing.
  explicit PageCache(size_t capacity_bytes);

  PageCache(const PageCache&) = delete;
  PageCache& operator=(const PageCache&) = delete;

  // The cached page `id`, made most recently used; null on a miss.
  std::shared_ptr<const SpillPage> Lookup(const PageId& id);

  // Caches `page` (not null) as `id`, most recently used, replacing an
  // earlier copy, then evicts least recently used pages until the total is
  // within capacity. A page larger than the capacity is not cached (and an
  // earlier copy under `id` is dropped).
  void Insert(const PageId& id, std::shared_ptr<const SpillPage> page);

  // Drops page `id` if cached.
  void Erase(const PageId& id);

  // Drops every page of session `seq` (on DeleteSession).
  void EraseSession(uint64_t seq);

  struct Stats {
    size_t pages = 0;
    size_t bytes = 0;
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t evictions = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    PageId id;
    std::shared_ptr<const SpillPage> page;
    size_t bytes;
  };
  using Lru = std::list<Entry>;  // front: most recently used

  void EraseLocked(Lru::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t capacity_bytes_;
  mutable Mutex mu_;
  Lru lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<PageId, Lru::iterator> index_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmem::storage

#endif  // KVMEM_STORAGE_PAGE_CACHE_H_
