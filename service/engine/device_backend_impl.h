// DeviceBackend's insides, shared by its files (device_backend.cc: the
// pool, rows and attention; device_policy.cc: device-owned layers' state
// and decode steps; device_prefill.cc: their prefill chunks). Not a public
// header: CUDA types are allowed here.
#ifndef KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_IMPL_H_
#define KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_IMPL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/mutex.h"
#include "base/status_macros.h"
#include "kernels/cuda/cascade_update.h"
#include "kernels/cuda/decode_policy.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/device_pool.h"
#include "kernels/cuda/gather_rows.h"
#include "service/engine/device_backend.h"
#include "service/engine/spill_ring.h"

namespace kvmem {
namespace device_internal {

// Thread blocks per stream in every attention launch: fixed, so a step's
// result does not depend on its batch (a replayed step gives the same
// bits). 16 × the 8 streams of one entry make a wave on an H100 (a batch of
// one is not left to 64 blocks); a 2K-row stream gets 128 rows per block.
constexpr int kAttentionSplits = 16;

// Rows of `row_bytes` in the pool's planes: block b holds rows from
// ceil(b · block / row) on, RowsPerBlock of them.
inline int64_t RowsPerBlock(size_t block_bytes, int row_bytes) {
  const size_t r = size_t(row_bytes);
  return int64_t(block_bytes / r - (block_bytes % r != 0 ? 1 : 0));
}
inline int32_t FirstRow(int32_t block, size_t block_bytes, int row_bytes) {
  const size_t r = size_t(row_bytes);
  return int32_t((size_t(block) * block_bytes + r - 1) / r);
}

inline size_t AlignUp(size_t n) { return (n + 255) / 256 * 256; }

inline cuda::DecodePolicyShape KernelShape(const DevicePolicyShape& shape,
                                           int streams) {
  cuda::DecodePolicyShape k;
  k.streams = streams;
  k.sinks = shape.cascade.sinks;
  k.cascades = shape.cascade.cascades;
  k.window = shape.cascade.window;
  k.page_tokens = shape.page_tokens;
  k.recent_tokens = shape.recent_tokens;
  k.group = shape.group;
  k.head_dim = shape.head_dim;
  k.dtype = shape.dtype;
  return k;
}

// Carves one staging buffer into aligned regions, in order.
class Layout {
 public:
  size_t Take(size_t bytes) {
    const size_t here = end_;
    end_ += AlignUp(bytes);
    return here;
  }
  size_t end() const { return end_; }

 private:
  size_t end_ = 0;
};

}  // namespace device_internal

// One layer's policy state: per head a region of `head_bytes` holding its
// positions, scores, slot rows, ring occupancy, n, t and page digests; and
// the digests of each head's sealed spilled pages, uploaded once each (a
// sealed page never changes), in a buffer that grows by doubling.
struct DevicePolicyState {
  ~DevicePolicyState() {
    if (counter != nullptr) counter->fetch_sub(counted);
  }
  // Adds `bytes` of device memory this state holds to the backend's count
  // (DeviceBackend::Impl::policy_bytes), until the state goes.
  void Count(std::shared_ptr<std::atomic<int64_t>> to, int64_t bytes) {
    counter = std::move(to);
    counted += bytes;
    counter->fetch_add(bytes);
  }
  std::shared_ptr<std::atomic<int64_t>> counter;
  int64_t counted = 0;

  cuda::DeviceBuffer buffer;
  int heads = 0, slots = 0, cascades = 0, pages = 0, head_dim = 0;
  cuda::DeviceBuffer sealed;  // [heads, sealed_capacity, 2, D] fp32
  int sealed_capacity = 0;
  std::vector<int> sealed_uploaded;  // [heads]

  size_t DigestBytes() const { return size_t(2) * head_dim * 4; }
  float* Sealed(int h) const {
    return sealed.as<float>() +
           size_t(h) * size_t(sealed_capacity) * 2 * size_t(head_dim);
  }
  // The spill rings (PolicyStreamPointers::ring_tokens a head; 0: none)
  // and what each holds.
  int ring_tokens = 0;
  std::vector<SpillRing> rings;  // [heads]
  size_t positions_at = 0, scores_at = 0, slot_rows_at = 0, stored_at = 0,
         head_at = 0, n_at = 0, t_at = 0, digests_at = 0, ring_rows_at = 0,
         ring_positions_at = 0, head_bytes = 0;

  void Lay(int h, int s, int c, int p, int d, int ring) {
    heads = h, slots = s, cascades = c, pages = p, head_dim = d;
    ring_tokens = ring;
    rings.assign(size_t(h), SpillRing{ring});
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t here = at;
      at += device_internal::AlignUp(bytes);
      return here;
    };
    positions_at = take(8 * size_t(s));
    scores_at = take(4 * size_t(s));
    slot_rows_at = take(4 * size_t(s));
    stored_at = take(4 * size_t(c));
    head_at = take(4 * size_t(c));
    n_at = take(8);
    t_at = take(8);
    digests_at = take(size_t(p) * 2 * size_t(d) * 4);
    ring_rows_at = take(4 * size_t(ring));
    ring_positions_at = take(8 * size_t(ring));
    head_bytes = at;
  }
  template <typename T>
  T* At(char* base, int h, size_t offset) const {
    return reinterpret_cast<T*>(base + size_t(h) * head_bytes + offset);
  }
  cuda::PolicyStreamPointers Policy(int h) const {
    char* base = buffer.as<char>();
    cuda::PolicyStreamPointers p;
    p.positions = At<int64_t>(base, h, positions_at);
    p.stored = At<int32_t>(base, h, stored_at);
    p.head = At<int32_t>(base, h, head_at);
    p.slot_rows = At<int32_t>(base, h, slot_rows_at);
    p.digests = At<float>(base, h, digests_at);
    p.sealed_digests = sealed_capacity > 0 ? Sealed(h) : nullptr;
    if (ring_tokens > 0) {
      p.ring_tokens = ring_tokens;
      p.ring_rows = At<int32_t>(base, h, ring_rows_at);
      p.ring_positions = At<int64_t>(base, h, ring_positions_at);
    }
    return p;
  }
  cuda::CascadeStreamPointers Cascade(int h) const {
    char* base = buffer.as<char>();
    cuda::CascadeStreamPointers p;
    p.positions = At<int64_t>(base, h, positions_at);
    p.scores = At<float>(base, h, scores_at);
    p.stored = At<int32_t>(base, h, stored_at);
    p.head = At<int32_t>(base, h, head_at);
    p.score_exponent = At<int64_t>(base, h, n_at);
    p.tokens_seen = At<int64_t>(base, h, t_at);
    p.slot_rows = At<int32_t>(base, h, slot_rows_at);
    return p;
  }
};

struct DeviceBackend::Impl {
  std::unique_ptr<cuda::DevicePool> pool;
  int multiprocessors = 1;
  int32_t reserved_count = 0;  // reserved.size(), fixed at Create
  Mutex mu;
  cuda::Stream stream ABSL_GUARDED_BY(mu);
  cuda::PinnedHostBuffer host ABSL_GUARDED_BY(mu);  // staging, both ways
  cuda::DeviceBuffer device ABSL_GUARDED_BY(mu);    // its device twin
  cuda::DeviceBuffer workspace ABSL_GUARDED_BY(mu);
  // Device-only scratch of prefill chunks (device_prefill.cc), grown by
  // doubling, never shrunk.
  cuda::DeviceBuffer chunk_scratch ABSL_GUARDED_BY(mu);
  // Device bytes held beside the pool (DeviceBackend::side_bytes): the
  // staging twin and the workspaces here, and the device-owned layers'
  // state, which each DevicePolicyState adds and takes back itself.
  std::atomic<int64_t> scratch_bytes{0};
  const std::shared_ptr<std::atomic<int64_t>> policy_bytes =
      std::make_shared<std::atomic<int64_t>>(0);

  void CountScratch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    scratch_bytes.store(
        int64_t(device.bytes() + workspace.bytes() + chunk_scratch.bytes()),
        std::memory_order_relaxed);
  }
  // Grows `buffer` (a workspace) to at least `bytes` by doubling.
  absl::Status Grow(cuda::DeviceBuffer* buffer, size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (buffer->bytes() >= bytes) return absl::OkStatus();
    KVMEM_ASSIGN_OR_RETURN(*buffer, cuda::DeviceBuffer::Allocate(
                                        std::max(bytes, buffer->bytes() * 2)));
    CountScratch();
    return absl::OkStatus();
  }
  // DecodeOwned's CUDA graphs, by launch shape and buffer addresses
  // (DecodeGraphKey): `seen` after a plain run, then captured once.
  struct DecodeGraph {
    bool seen = false;
    bool failed = false;  // the capture failed: plain launches from now on
    cuda::GraphExec exec;
  };
  static constexpr size_t kMaxDecodeGraphs = 64;
  bool graphs_on = true;  // Options::decode_graphs, fixed at Create
  std::atomic<int64_t> graph_launches{0};
  int spill_ring_tokens = 0;  // Options::spill_ring_tokens, fixed at Create
  std::atomic<int64_t> ring_steps{0};
  std::atomic<int64_t> ring_pages{0};
  std::map<std::string, DecodeGraph> decode_graphs ABSL_GUARDED_BY(mu);
  // The entry for `key`, made if new (all are dropped when the cache is
  // full: shapes come and go with the batches).
  DecodeGraph* FindDecodeGraph(const std::string& key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = decode_graphs.find(key);
    if (it == decode_graphs.end()) {
      if (decode_graphs.size() >= kMaxDecodeGraphs) decode_graphs.clear();
      it = decode_graphs.emplace(key, DecodeGraph{}).first;
    }
    return &it->second;
  }

  // Pool blocks kept for staging host rows (spilled pages, new tokens) in
  // every launch, so that a full pool still attends; bigger launches take
  // more for their duration.
  std::vector<int32_t> reserved ABSL_GUARDED_BY(mu);

  // Grows the staging pair to `bytes` each (never shrinks).
  absl::Status Reserve(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (host.bytes() >= bytes) return absl::OkStatus();
    const size_t grown = std::max(bytes, host.bytes() * 2);
    KVMEM_ASSIGN_OR_RETURN(host, cuda::PinnedHostBuffer::Allocate(grown));
    KVMEM_ASSIGN_OR_RETURN(device, cuda::DeviceBuffer::Allocate(grown));
    CountScratch();
    return absl::OkStatus();
  }

  // Blocks from the pool, given back when the guard goes.
  struct Blocks {
    cuda::DevicePool* pool;
    std::vector<int32_t> ids;
    ~Blocks() {
      if (!ids.empty()) pool->Give(ids).IgnoreError();
    }
  };

  // Pool rows for the rows a launch stages (host rows it reads from the
  // pool): staged row s is Row(s).
  struct StagingRows {
    const std::vector<int32_t>* blocks = nullptr;
    size_t block_bytes = 0;
    int64_t per_block = 1;
    int row_bytes = 0;
    int32_t Row(int64_t s) const {
      return device_internal::FirstRow((*blocks)[size_t(s / per_block)],
                                       block_bytes, row_bytes) +
             int32_t(s % per_block);
    }
  };
  // Rows for `count` staged rows of `row_bytes`: in the blocks kept for
  // staging, or, when those do not suffice, in blocks taken for the call
  // into *taken (given back when it goes). RESOURCE_EXHAUSTED when the pool
  // has too few free blocks.
  absl::StatusOr<StagingRows> Stage(int64_t count, int row_bytes, Blocks* taken)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    StagingRows rows;
    rows.block_bytes = pool->block_bytes();
    rows.per_block = device_internal::RowsPerBlock(rows.block_bytes, row_bytes);
    rows.row_bytes = row_bytes;
    const int64_t needed = (count + rows.per_block - 1) / rows.per_block;
    rows.blocks = &reserved;
    if (needed > int64_t(reserved.size())) {
      absl::StatusOr<std::vector<int32_t>> more = pool->Take(int32_t(needed));
      if (!more.ok()) {
        return absl::ResourceExhaustedError(
            absl::StrCat("device pool: ", needed, " blocks wanted to stage ",
                         count, " rows, ", pool->free_blocks(), " free"));
      }
      taken->ids = std::move(*more);
      rows.blocks = &taken->ids;
    }
    return rows;
  }

  // Copies `count` staged rows (device [count, row_bytes] keys and values)
  // to their pool rows rows[i], one launch on `stream`.
  absl::Status ScatterStaged(int count, int row_bytes, const int32_t* rows,
                             const void* keys, const void* values,
                             cudaStream_t on) {
    cuda::ScatterRowsArgs args;
    args.count = count;
    // Rows are whole fp32 / 16-bit elements: a byte row of row_bytes is
    // row_bytes / 2 16-bit elements for the copy kernel.
    args.head_dim = row_bytes / 2;
    args.dtype = DType::kBf16;
    args.rows = rows;
    args.keys = keys;
    args.values = values;
    args.key_rows = pool->plane_base(0);
    args.value_rows = pool->plane_base(1);
    return cuda::ScatterRows(args, on);
  }
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_IMPL_H_
