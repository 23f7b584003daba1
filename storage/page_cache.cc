#include "storage/page_cache.h"

#include <utility>
#include <vector>

namespace kvmem::storage {

PageCache::PageCache(size_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

std::shared_ptr<const SpillPage> PageCache::Lookup(const PageId& id) {
  MutexLock lock(&mu_);
  auto it = index_.find(id);
  if (it == index_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, it->second);  // iterators stay valid
  return it->second->page;
}

void PageCache::Insert(const PageId& id,
                       std::shared_ptr<const SpillPage> page) {
  if (page == nullptr) return;
  const size_t bytes = page->MemoryBytes();
  // Drop the evicted pages after unlocking: freeing 64 KiB pages is not
  // work to do under the lock.
  std::vector<std::shared_ptr<const SpillPage>> dropped;
  MutexLock lock(&mu_);
  auto it = index_.find(id);
  if (it != index_.end()) {
    dropped.push_back(std::move(it->second->page));
    EraseLocked(it->second);
  }
  if (bytes > capacity_bytes_) return;
  while (!lru_.empty() && stats_.bytes + bytes > capacity_bytes_) {
    dropped.push_back(std::move(lru_.back().page));
    EraseLocked(std::prev(lru_.end()));
    ++stats_.evictions;
  }
  lru_.push_front(Entry{id, std::move(page), bytes});
  index_[id] = lru_.begin();
  stats_.bytes += bytes;
  ++stats_.pages;
}

void PageCache::Erase(const PageId& id) {
  MutexLock lock(&mu_);
  auto it = index_.find(id);
  if (it != index_.end()) EraseLocked(it->second);
}

void PageCache::EraseSession(uint64_t seq) {
  MutexLock lock(&mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (it->id.session_seq == seq) EraseLocked(it);
    it = next;
  }
}

PageCache::Stats PageCache::stats() const {
  MutexLock lock(&mu_);
  return stats_;
}

void PageCache::EraseLocked(Lru::iterator it) {
  stats_.bytes -= it->bytes;
  --stats_.pages;
  index_.erase(it->id);
  lru_.erase(it);
}

}  // namespace kvmem::storage
