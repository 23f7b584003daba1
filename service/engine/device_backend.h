// The engine's CUDA backend (issue 8): the resident key/value rows of the
// sessions' streams in one device pool, and the decode steps of a whole
// request's streams in a fixed number of launches over them.
//
// Division of labour with the CPU oracle (docs/ARCHITECTURE.md § The CUDA
// backend as built, § Device-owned layers), two ways:
// - Device-owned layers (TakePolicy, DecodeOwned): the layer's policy
//   state lives here too and the whole decode step runs here; the host's
//   StreamState is a copy brought current by ReadPolicy, and keeps the
//   spilled pages.
// - Otherwise (Attend, Write): StreamState on the host decides what each
//   step attends to and applies the policy; the device holds a copy of
//   every slot's rows, written after each step with the rows that changed,
//   and computes the attention and the group-reduced probabilities that
//   the host policy consumes.
// The split count of the attention is fixed, so a step's bits do not
// depend on what it is batched with.
//
// Thread-safe: one CUDA stream and one set of staging buffers, used under
// a lock. No CUDA types in this header.
#ifndef KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_H_
#define KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "base/parallel_for.h"
#include "kernels/cascade_policy.h"
#include "kernels/dtype.h"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"
#include "service/engine/step_types.h"

namespace kvmem {

struct DevicePolicyState;  // device_policy.cc

// The device rows of one layer's streams: H streams × `slots` rows, slot
// s of head h at pool row Row(h, s). Moves only; DeviceBackend::Release
// gives the blocks back.
//
// A layer is *device-owned* while it also holds its streams' policy state
// on the device (DeviceBackend::TakePolicy): positions, scores, ring
// occupancy, score exponent, tokens seen and resident page digests. Decode
// steps then run the whole policy there (DecodeOwned) and the host's
// StreamStates are stale until ReturnPolicy brings the state back.
class DeviceLayerRows {
 public:
  DeviceLayerRows();
  ~DeviceLayerRows();
  DeviceLayerRows(DeviceLayerRows&&);
  DeviceLayerRows& operator=(DeviceLayerRows&&);

  bool empty() const { return blocks_.empty(); }
  bool owned() const { return policy_ != nullptr; }
  // Sealed pages' digests of `head` the device holds (DecodeOwned uploads
  // newer ones); 0 unless owned.
  int sealed_on_device(int head) const;
  int32_t Row(int head, int slot) const {
    const int64_t i = int64_t(head) * slots_ + slot;
    return first_row_[size_t(i / rows_per_block_)] +
           int32_t(i % rows_per_block_);
  }

 private:
  friend class DeviceBackend;
  std::vector<int32_t> blocks_;
  std::vector<int32_t> first_row_;  // [blocks] pool row of its first row
  // The spill rings' rows (DevicePolicyShape::ring_tokens a head), taken
  // when the layer is first device-owned, given back with the rows.
  std::vector<int32_t> ring_blocks_;
  int ring_tokens_ = 0;
  int slots_ = 0;
  int rows_per_block_ = 1;
  std::unique_ptr<DevicePolicyState> policy_;  // set while device-owned
};

// Items (an entry's KV head each), or bytes copied, from which a launch's
// per-item host loops run on the worker threads rather than one after
// another: waking them costs as much as hundreds of items' row copies
// (device_policy.cc). At batch 32 (256 items) a loop that did nothing for
// most items (the evicted tokens' spill) took 80–87 µs side by side.
inline constexpr int kParallelDeviceItems = 1024;
inline constexpr size_t kParallelDeviceBytes = size_t{1} << 20;
// Evicted tokens from which their spill to the host's pages runs side by
// side (a digest fold and a row append each, ~1–2 µs).
inline constexpr int kParallelDeviceSpills = 64;
// Spilled pages a request's selections took from which their recall
// (cache lookups, storage reads) runs side by side, a KV head's pages
// each: on the device path (a launch's items) and the host path alike.
inline constexpr int kParallelRecallPages = 64;

// What every stream of one DecodeOwned call shares: one session config.
struct DevicePolicyShape {
  CascadeParams cascade;
  int page_tokens = 16;
  int recent_tokens = 16;
  int budget_tokens = 2048;
  int group = 1;
  int head_dim = 0;
  DType dtype = DType::kBf16;
  float softmax_scale = 1;
  ScoreReduction reduction = ScoreReduction::kMax;
  // FETCH: also return each stream's selected rows in ascending position
  // (budget_tokens ≤ cuda::kMaxSortRows).
  bool fetch = false;
};

// One stream's decode step (T = 1) on a device-owned layer.
struct DevicePolicyItem {
  DeviceLayerRows* layer = nullptr;
  int head = 0;
  const uint8_t* query = nullptr;  // [G, D] session dtype
  const uint8_t* key = nullptr;    // [D] the new token
  const uint8_t* value = nullptr;  // [D]
  int64_t position = 0;            // the new token's
  // Spilled candidates (recall on) in tie order: the stream's
  // `sealed_pages` sealed pages by sequence (P tokens each), then the open
  // page when it holds tokens. Digests [2, D] fp32. The device keeps the
  // digests it has been sent, so `sealed_digests` holds only those of
  // pages sealed_from … sealed_pages − 1, with sealed_from at most
  // layer->sealed_on_device(head): a step gathers no pointer per page.
  int sealed_pages = 0;
  int sealed_from = 0;
  std::vector<const float*> sealed_digests;
  const float* open_digest = nullptr;
  int open_tokens = 0;
  // After selection (for DecodeOwned's `recall`), per spilled candidate
  // (sealed ones, then the open one): which were taken from the host, i.e.
  // not from the device's spill ring; recall then sets, for each of them,
  // its [tokens, D] key and value rows.
  std::vector<uint8_t> spilled_taken;
  std::vector<const uint8_t*> spilled_keys;
  std::vector<const uint8_t*> spilled_values;
  std::vector<const int64_t*> spilled_positions;  // FETCH: [tokens] each
  // Outputs, sized by the caller (null: not wanted, as in FETCH): [G, D]
  // in the shape's dtype, rounded as cpu::StoreFloats rounds, and [G]
  // fp32. Raw bytes at any alignment, so that they can be an entry's
  // place in the reply itself: the device writes the dtype, the host only
  // copies. The token that left the resident set, if any (position −1:
  // none), with its rows.
  uint8_t* out = nullptr;
  uint8_t* lse = nullptr;
  FetchedHead* fetched = nullptr;  // FETCH: positions, keys, values
  int64_t evicted_position = -1;
  std::string evicted_key, evicted_value;
};

// One session layer's chunk on a device-owned layer, every KV head of it:
// T > 1 tokens with queries (ATTEND, or APPEND with queries), dense over
// the resident slots and causal over the chunk (selection.md), nothing
// recalled; or T ≥ 1 tokens without queries (APPEND), no attention.
struct DevicePrefillItem {
  DeviceLayerRows* layer = nullptr;
  // [T, H·G, D] session dtype (the wire's), or null: no attention.
  const uint8_t* queries = nullptr;
  const uint8_t* keys = nullptr;    // [T, H, D]
  const uint8_t* values = nullptr;  // [T, H, D]
  // Outputs, sized by the caller, per head h: [T, G, D] fp32 and [T, G];
  // empty when not wanted (APPEND).
  std::vector<float*> out;
  std::vector<float*> lse;
  // Per head, the tokens the stream has spilled before the chunk (as
  // sealed pages × P + the open page's), for its spill ring; empty: the
  // chunk's evicted tokens are not kept there.
  std::vector<int64_t> spilled;
  // Per head, the tokens that left the resident set, in eviction order:
  // positions, and their rows back to back.
  struct Evicted {
    std::vector<int64_t> positions;
    std::string keys, values;
  };
  std::vector<Evicted> evicted;  // [H], filled by the call
};

// One stream's decode attention (T = 1): G query rows over `rows` (device
// rows of resident slots, or host rows staged for the launch), then the
// new token's row.
struct DeviceAttendItem {
  struct RowRef {
    int32_t device_row = -1;       // ≥ 0: a pool row
    const uint8_t* key = nullptr;  // else: host rows to stage
    const uint8_t* value = nullptr;
  };
  const float* queries = nullptr;  // [G, D] fp32 (exact in the dtype)
  std::vector<RowRef> rows;        // attended rows, the new token last
  int host_rows = 0;               // how many of `rows` are host rows
  // Outputs, sized by the caller: [G, D], [G], [rows].
  float* out = nullptr;
  float* lse = nullptr;
  float* probs = nullptr;
  // CACHE_RANK (shape.inv_freq set): each row's rotary position, [rows],
  // and the queries'.
  std::vector<int32_t> row_positions;
  int32_t query_position = 0;
};

// What every item of one Attend call shares.
struct DeviceAttendShape {
  int group = 1;
  int head_dim = 0;
  DType dtype = DType::kBf16;
  float softmax_scale = 1;
  ScoreReduction reduction = ScoreReduction::kMax;
  // CACHE_RANK: the rotary speeds ([rotated dims / 2] rad/pos, borrowed
  // for the call), rotating keys and queries to the items' positions in
  // the kernel; null: no rotation. The shape must pass
  // cuda::DecodeAttentionRotarySupported.
  const std::vector<double>* inv_freq = nullptr;
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
};

struct DeviceSlotWrite {
  int32_t device_row = 0;
  const uint8_t* key = nullptr;  // row_bytes each
  const uint8_t* value = nullptr;
};

class DeviceBackend {
 public:
  struct Options {
    // The pool, keys and values together; 0: `free_fraction` of the free
    // device memory at start.
    size_t pool_bytes = 0;
    double free_fraction = 0.8;
    size_t block_bytes = size_t{1} << 20;
    // Device-owned decode steps without spilled candidates are captured
    // into a CUDA graph at the second step of each shape and replayed
    // (device_policy.cc); false: plain launches every step.
    bool decode_graphs = true;
    // The spill ring of a device-owned layer's streams that recall: the
    // rows of each stream's last `spill_ring_tokens` spilled tokens (a
    // multiple of the page; 0: none) stay on the device, so that a step
    // whose spilled candidates all lie there needs no host round trip,
    // and a taken page there no read or staging (device_policy.cc).
    // Off by default until a GPU run has checked it (written in a session
    // without a device: tests/gpu/engine_cuda_test.cc runs it at 16 and
    // 1024 tokens against the CPU oracle).
    int spill_ring_tokens = 0;
  };
  // UNAVAILABLE without a device; RESOURCE_EXHAUSTED when the pool does not
  // fit; INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<DeviceBackend>> Create(
      const Options& options);
  ~DeviceBackend();

  const std::string& device_name() const { return device_name_; }
  // The pool's bytes (keys and values) that sessions can hold, and hold
  // now; the blocks kept for staging are in neither.
  int64_t pool_bytes() const;
  int64_t used_bytes() const;
  // Device bytes held beside the pool: the device-owned layers' state
  // (positions, scores, digests, sealed pages' digests), and the staging
  // and scratch buffers of launches.
  int64_t side_bytes() const;
  // Free bytes of each plane (keys, or values), in whole blocks.
  int64_t free_plane_bytes() const;
  // DecodeOwned calls that replayed a captured CUDA graph.
  int64_t decode_graph_launches() const;
  // DecodeOwned calls whose streams had spilled candidates, all in their
  // spill rings (no host round trip).
  int64_t decode_ring_steps() const;
  // Spilled pages that steps with a host round trip took from the rings
  // (not read or staged by the host).
  int64_t decode_ring_pages() const;

  // Blocks for `heads` × `slots` rows of `row_bytes`, filled from
  // keys/values [heads][slots × row_bytes] (host). RESOURCE_EXHAUSTED when
  // the pool has too few free blocks (nothing taken then).
  absl::StatusOr<DeviceLayerRows> Upload(
      int row_bytes, int slots, absl::Span<const uint8_t* const> keys,
      absl::Span<const uint8_t* const> values);
  void Release(DeviceLayerRows* rows);

  // Makes `rows` (uploaded, host-owned) device-owned: uploads each head's
  // policy state — `heads[h]`'s cascade state (its keys and values are not
  // read: the device's rows must equal the host's) and `digests[h]`
  // ([pages, 2, D] fp32, pages as StreamState numbers them).
  // RESOURCE_EXHAUSTED when the device has no memory for it.
  // `spill_ring`: the streams recall spilled pages, so keep a spill ring
  // (Options::spill_ring_tokens) when the pool has room for it.
  absl::Status TakePolicy(
      const DevicePolicyShape& shape,
      absl::Span<const CascadeStream::Snapshot* const> heads,
      absl::Span<const absl::Span<const float>> digests, DeviceLayerRows* rows,
      bool spill_ring = false);
  // A device-owned layer's state: one Snapshot per head, rows included.
  // The layer stays device-owned.
  absl::StatusOr<std::vector<CascadeStream::Snapshot>> ReadPolicy(
      const DevicePolicyShape& shape, const DeviceLayerRows& rows);
  // Ends device ownership: frees the layer's device state (its rows stay
  // uploaded). The host copy must be current (ReadPolicy), or be rebuilt
  // from storage.
  void DropPolicy(DeviceLayerRows* rows);

  // One decode step of every item (each a head of a device-owned layer):
  // candidates, Quest scores and the budget fill; then `recall`, which
  // reads the items' spilled_taken and sets their spilled rows (it may
  // fail: nothing has changed then); then attention, the score update and
  // insertion, and the refreshed digests. Blocks until the outputs are in
  // the items. On error *touched says whether the layers' device state may
  // have changed (then it is undefined and must be dropped); if not, it is
  // as before the call.
  // `wait_nanos`, when set, gains the time spent waiting for the device.
  absl::Status DecodeOwned(const DevicePolicyShape& shape,
                           absl::Span<DevicePolicyItem> items,
                           const std::function<absl::Status()>& recall,
                           bool* touched, ParallelFor* parallel = nullptr,
                           int64_t* wait_nanos = nullptr);

  // One chunk of `chunk_tokens` tokens for every item (each a device-owned
  // layer; all with queries or all without; with queries
  // cuda::AttendChunk's bounds: D 128, bf16 or fp16, G 1, 2, 4 or 8; T ≤
  // W): attention, the score update, the insertion and the refreshed
  // digests, in one launch per phase for all items. Blocks
  // until the outputs are in the items. On error *touched says whether the
  // layers' device state may have changed (then it must be dropped).
  absl::Status PrefillOwned(const DevicePolicyShape& shape, int chunk_tokens,
                            absl::Span<DevicePrefillItem> items, bool* touched);

  // Writes host rows to device rows (after a step changed them).
  absl::Status Write(int row_bytes, absl::Span<const DeviceSlotWrite> writes);

  // The attention of every item, one launch for all. Host rows are staged
  // in pool blocks kept for that, or taken for the call when those do not
  // suffice (RESOURCE_EXHAUSTED when none are free). Items are staged and
  // unstaged on `parallel` when given. Blocks until the results are in the
  // items' outputs. INVALID_ARGUMENT if an item's host_rows is short.
  absl::Status Attend(const DeviceAttendShape& shape,
                      absl::Span<const DeviceAttendItem> items,
                      ParallelFor* parallel = nullptr);

 private:
  struct Impl;
  explicit DeviceBackend(std::unique_ptr<Impl> impl, std::string name);
  std::unique_ptr<Impl> impl_;
  std::string device_name_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_DEVICE_BACKEND_H_
