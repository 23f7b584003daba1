// Device-owned layers (device_backend.h): a layer's policy state in device
// memory, and the decode step of a batch of their streams run end to end
// on the device: kernels/cuda/decode_policy.h for candidates, scores, row
// mapping, probability scatter and digests, select_pages.h for the budget
// fill, decode_attention.h, and cascade_update.h for the score update and
// insertion. The host keeps the spill path (spilled pages are its), so a
// step crosses PCIe twice: once for the selection (the host reads the
// spilled pages it took), once for the results and the evicted tokens.
#include <cuda_runtime.h>

#include <chrono>
#include <cstring>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cascade_update.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/decode_policy.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/select_pages.h"
#include "service/engine/device_backend_impl.h"

namespace kvmem {

using device_internal::AlignUp;
using device_internal::kAttentionSplits;
using device_internal::KernelShape;
using device_internal::Layout;

DeviceLayerRows::DeviceLayerRows() = default;
int DeviceLayerRows::sealed_on_device(int head) const {
  return policy_ == nullptr ? 0 : policy_->sealed_uploaded[size_t(head)];
}
DeviceLayerRows::~DeviceLayerRows() = default;
DeviceLayerRows::DeviceLayerRows(DeviceLayerRows&&) = default;
DeviceLayerRows& DeviceLayerRows::operator=(DeviceLayerRows&&) = default;

namespace {

// Tokens of an item's spilled candidate j: sealed pages are full.
int SpilledTokens(const DevicePolicyItem& item, size_t j, int page_tokens) {
  return j < size_t(item.sealed_pages) ? page_tokens : item.open_tokens;
}

// A staging region's capacity for `n` (0: none): a power of two, ≥ 64.
int Capacity(int64_t n) {
  if (n <= 0) return 0;
  int64_t c = 64;
  while (c < n) c *= 2;
  return int(c);
}

// What a step launches is a function of these: the shape (every field),
// the batch, the bound on candidates a stream, and the addresses its
// launches take as arguments (staging pair, attention workspace, pool
// planes); DecodeOwned appends the staging's capacities and the part.
std::string DecodeGraphKey(const DevicePolicyShape& s, int streams,
                           int most_candidates,
                           std::initializer_list<const void*> buffers) {
  std::string key = absl::StrCat(
      streams, "/", most_candidates, "/", s.cascade.sinks, "/",
      s.cascade.cascades, "/", s.cascade.window, "/", s.cascade.eager_fill, "/",
      absl::bit_cast<uint64_t>(s.cascade.beta), "/", s.page_tokens, "/",
      s.recent_tokens, "/", s.budget_tokens, "/", s.group, "/", s.head_dim, "/",
      int(s.dtype), "/", absl::bit_cast<uint32_t>(s.softmax_scale), "/",
      int(s.reduction), "/", s.fetch);
  for (const void* buffer : buffers) {
    absl::StrAppend(&key, "/", reinterpret_cast<uintptr_t>(buffer));
  }
  return key;
}

}  // namespace

absl::Status DeviceBackend::TakePolicy(
    const DevicePolicyShape& shape,
    absl::Span<const CascadeStream::Snapshot* const> heads,
    absl::Span<const absl::Span<const float>> digests, DeviceLayerRows* rows,
    bool spill_ring) {
  const cuda::DecodePolicyShape k = KernelShape(shape, 1);
  KVMEM_RETURN_IF_ERROR(k.Validate());
  const int H = int(heads.size());
  const int C = k.cascades, N = k.slots(), D = k.head_dim;
  if (rows->empty() || rows->owned() || rows->slots_ != N ||
      digests.size() != heads.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("device policy: a layer of ", rows->slots_,
                     " uploaded slots (", rows->owned() ? "owned" : "host",
                     ") for ", H, " heads of ", N, " slots"));
  }
  for (int h = 0; h < H; ++h) {
    const CascadeStream::Snapshot& s = *heads[size_t(h)];
    if (int(s.positions.size()) != N || int(s.scores.size()) != N ||
        int(s.stored.size()) != C || int(s.head.size()) != C ||
        digests[size_t(h)].size() != size_t(k.pages()) * 2 * size_t(D)) {
      return absl::InvalidArgumentError(absl::StrCat("device policy: head ", h,
                                                     "'s state has the wrong "
                                                     "sizes for its layer"));
    }
  }
  // The spill ring's rows: taken once for the layer (kept until its rows
  // go); a pool without room for them leaves the layer without a ring.
  const int P = k.page_tokens;
  const int ring = spill_ring ? impl_->spill_ring_tokens / P * P : 0;
  const int row_bytes = D * DTypeBytes(shape.dtype);
  const size_t block_bytes = impl_->pool->block_bytes();
  const int64_t per_block =
      device_internal::RowsPerBlock(block_bytes, row_bytes);
  if (ring > 0 && rows->ring_tokens_ != ring) {
    if (!rows->ring_blocks_.empty()) {
      impl_->pool->Give(rows->ring_blocks_).IgnoreError();
      rows->ring_blocks_.clear();
    }
    const int64_t blocks = (int64_t(H) * ring + per_block - 1) / per_block;
    absl::StatusOr<std::vector<int32_t>> taken =
        impl_->pool->Take(int32_t(blocks));
    rows->ring_tokens_ = taken.ok() ? ring : 0;
    if (taken.ok()) rows->ring_blocks_ = std::move(*taken);
  }
  auto state = std::make_unique<DevicePolicyState>();
  state->Lay(H, N, C, k.pages(), D, ring > 0 ? rows->ring_tokens_ : 0);
  const size_t bytes = size_t(H) * state->head_bytes;
  absl::StatusOr<cuda::DeviceBuffer> buffer =
      cuda::DeviceBuffer::Allocate(bytes);
  if (!buffer.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device policy: ", bytes,
                     " bytes of device memory for "
                     "a layer's state: ",
                     buffer.status().message()));
  }
  state->buffer = std::move(*buffer);
  state->Count(impl_->policy_bytes, int64_t(bytes));
  state->sealed_uploaded.assign(size_t(H), 0);
  MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->Reserve(bytes));
  char* host = impl_->host.as<char>();
  for (int h = 0; h < H; ++h) {
    const CascadeStream::Snapshot& s = *heads[size_t(h)];
    std::memcpy(state->At<char>(host, h, state->positions_at),
                s.positions.data(), 8 * size_t(N));
    std::memcpy(state->At<char>(host, h, state->scores_at), s.scores.data(),
                4 * size_t(N));
    int32_t* slot_rows = state->At<int32_t>(host, h, state->slot_rows_at);
    for (int slot = 0; slot < N; ++slot) slot_rows[slot] = rows->Row(h, slot);
    int32_t* stored = state->At<int32_t>(host, h, state->stored_at);
    int32_t* head = state->At<int32_t>(host, h, state->head_at);
    for (int c = 0; c < C; ++c) {
      stored[c] = s.stored[size_t(c)];
      head[c] = s.head[size_t(c)];
    }
    *state->At<int64_t>(host, h, state->n_at) = s.score_exponent;
    *state->At<int64_t>(host, h, state->t_at) = s.tokens_seen;
    std::memcpy(state->At<char>(host, h, state->digests_at),
                digests[size_t(h)].data(), digests[size_t(h)].size() * 4);
    // Head h's ring is rows h·ring … of the ring's blocks, laid out as a
    // launch's staged rows are.
    const Impl::StagingRows ring_rows_at{&rows->ring_blocks_, block_bytes,
                                         per_block, row_bytes};
    int32_t* ring_rows = state->At<int32_t>(host, h, state->ring_rows_at);
    for (int r = 0; r < state->ring_tokens; ++r) {
      ring_rows[r] = ring_rows_at.Row(int64_t(h) * state->ring_tokens + r);
    }
  }
  KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(state->buffer.get(), host, bytes,
                                           impl_->stream.get()));
  KVMEM_RETURN_IF_ERROR(impl_->stream.Synchronize());
  rows->policy_ = std::move(state);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<CascadeStream::Snapshot>> DeviceBackend::ReadPolicy(
    const DevicePolicyShape& shape, const DeviceLayerRows& layer) {
  const DeviceLayerRows* rows = &layer;
  if (!rows->owned()) {
    return absl::InvalidArgumentError("device policy: the layer is not owned");
  }
  const DevicePolicyState& state = *rows->policy_;
  const int H = state.heads, N = state.slots, C = state.cascades;
  const size_t row = size_t(shape.head_dim) * DTypeBytes(shape.dtype);
  const size_t state_bytes = size_t(H) * state.head_bytes;
  const size_t rows_bytes =
      rows->blocks_.size() * size_t(rows->rows_per_block_) * row;
  MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->Reserve(state_bytes + 2 * rows_bytes));
  char* host = impl_->host.as<char>();
  char* host_keys = host + state_bytes;
  char* host_values = host_keys + rows_bytes;
  const cudaStream_t stream = impl_->stream.get();
  KVMEM_RETURN_IF_ERROR(
      cuda::CopyToHost(host, state.buffer.get(), state_bytes, stream));
  const size_t per_block_bytes = size_t(rows->rows_per_block_) * row;
  for (size_t b = 0; b < rows->blocks_.size(); ++b) {
    const size_t from = size_t(rows->first_row_[b]) * row;
    KVMEM_RETURN_IF_ERROR(
        cuda::CopyToHost(host_keys + b * per_block_bytes,
                         static_cast<char*>(impl_->pool->plane_base(0)) + from,
                         per_block_bytes, stream));
    KVMEM_RETURN_IF_ERROR(
        cuda::CopyToHost(host_values + b * per_block_bytes,
                         static_cast<char*>(impl_->pool->plane_base(1)) + from,
                         per_block_bytes, stream));
  }
  KVMEM_RETURN_IF_ERROR(impl_->stream.Synchronize());
  std::vector<CascadeStream::Snapshot> out(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) {
    CascadeStream::Snapshot& s = out[size_t(h)];
    s.positions.resize(size_t(N));
    s.scores.resize(size_t(N));
    std::memcpy(s.positions.data(), state.At<char>(host, h, state.positions_at),
                8 * size_t(N));
    std::memcpy(s.scores.data(), state.At<char>(host, h, state.scores_at),
                4 * size_t(N));
    const int32_t* stored = state.At<int32_t>(host, h, state.stored_at);
    const int32_t* head = state.At<int32_t>(host, h, state.head_at);
    s.stored.assign(stored, stored + C);
    s.head.assign(head, head + C);
    s.score_exponent = *state.At<int64_t>(host, h, state.n_at);
    s.tokens_seen = *state.At<int64_t>(host, h, state.t_at);
    s.keys.resize(size_t(N) * row);
    s.values.resize(size_t(N) * row);
    for (int slot = 0; slot < N; ++slot) {
      const int64_t i = int64_t(h) * N + slot;
      const size_t at = size_t(i / rows->rows_per_block_) * per_block_bytes +
                        size_t(i % rows->rows_per_block_) * row;
      std::memcpy(&s.keys[size_t(slot) * row], host_keys + at, row);
      std::memcpy(&s.values[size_t(slot) * row], host_values + at, row);
    }
  }
  return out;
}

void DeviceBackend::DropPolicy(DeviceLayerRows* rows) { rows->policy_.reset(); }

absl::Status DeviceBackend::DecodeOwned(
    const DevicePolicyShape& shape, absl::Span<DevicePolicyItem> items,
    const std::function<absl::Status()>& recall, bool* touched,
    ParallelFor* parallel, int64_t* wait_nanos) {
  *touched = false;
  if (items.empty()) return absl::OkStatus();
  const int B = int(items.size());
  const cuda::DecodePolicyShape k = KernelShape(shape, B);
  KVMEM_RETURN_IF_ERROR(k.Validate());
  const int G = k.group, D = k.head_dim, N = k.slots(), C = k.cascades;
  const int Rc = k.cascade_pages(), A = k.always_capacity();
  const int budget = shape.budget_tokens;
  const size_t elem = size_t(DTypeBytes(shape.dtype));
  const size_t row = size_t(D) * elem;
  if (shape.fetch && budget > cuda::kMaxSortRows) {
    return absl::InvalidArgumentError(
        absl::StrCat("device policy: FETCH with a budget of ", budget,
                     " tokens, at most ", cuda::kMaxSortRows));
  }
  if (budget < A) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device policy: budget ", budget, " below the always-in tokens ", A));
  }
  // Spilled candidates, numbered across the batch; candidates per stream.
  std::vector<int32_t> spilled_begin(static_cast<size_t>(B));
  std::vector<int32_t> candidate_begin(static_cast<size_t>(B));
  int32_t spilled_total = 0, most = 0;
  // Each stream's spill ring: its first page there (SpillRing::kNoPage) and
  // where its evicted token goes (−1: nowhere). The host is needed mid-step
  // only when some stream has a spilled page outside its ring.
  std::vector<int32_t> ring_first(static_cast<size_t>(B));
  std::vector<int32_t> ring_index(static_cast<size_t>(B));
  std::vector<int64_t> spilled_tokens(static_cast<size_t>(B));
  bool round_trip = false;
  int64_t host_tokens_total = 0;  // of pages outside the rings
  for (int b = 0; b < B; ++b) {
    const DevicePolicyItem& item = items[size_t(b)];
    if (item.layer == nullptr || !item.layer->owned() ||
        (item.open_tokens > 0) != (item.open_digest != nullptr) ||
        item.open_tokens >= k.page_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("device policy: item ", b,
                       " is not a device-owned "
                       "stream with a consistent open page"));
    }
    spilled_begin[size_t(b)] = spilled_total;
    candidate_begin[size_t(b)] = b * Rc + spilled_total;
    const int held = item.layer->sealed_on_device(item.head);
    if (item.sealed_from < 0 || item.sealed_from > item.sealed_pages ||
        item.sealed_from > held ||
        int(item.sealed_digests.size()) !=
            item.sealed_pages - item.sealed_from) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device policy: item ", b, "'s sealed digests cover pages ",
          item.sealed_from, "..", item.sealed_from + item.sealed_digests.size(),
          " of ", item.sealed_pages, "; want from at most ", held,
          " (what the device holds) to the last"));
    }
    const int n = item.sealed_pages + (item.open_tokens > 0 ? 1 : 0);
    spilled_total += n;
    most = std::max(most, Rc + n);
    const int64_t spilled =
        int64_t(item.sealed_pages) * k.page_tokens + item.open_tokens;
    spilled_tokens[size_t(b)] = spilled;
    SpillRing& ring = item.layer->policy_->rings[size_t(item.head)];
    ring.Sync(spilled);
    ring_first[size_t(b)] = ring.FirstPage(spilled, k.page_tokens);
    ring_index[size_t(b)] = ring.Index(spilled);
    const int outside = std::min(n, ring_first[size_t(b)]);
    round_trip = round_trip || outside > 0;
    host_tokens_total +=
        int64_t(std::min(outside, item.sealed_pages)) * k.page_tokens +
        (outside > item.sealed_pages ? item.open_tokens : 0);
  }
  // The staging's regions are sized by capacities, not by this step's
  // counts, and the kernels bounded by `most_cap`, so that consecutive
  // steps of a batch lay out alike and can replay one captured graph
  // (their counts grow by a token a stream a step; a capacity only when
  // a count passes a power of two).
  const int spilled_cap = Capacity(spilled_total);
  const int64_t candidates = int64_t(B) * Rc + spilled_cap;
  const int most_cap =
      std::min(Capacity(most), std::max(most, cuda::kMaxSelectCandidates));
  // Rows staged: the taken spilled pages' from outside the rings (at most
  // a budget a stream; none without a round trip) and the new tokens. The
  // whole region travels in a step without a round trip: sized by what
  // the rings hold it would be megabytes.
  const int max_staged = Capacity(
      int(round_trip ? std::min<int64_t>(host_tokens_total, int64_t(B) * budget)
                     : 0) +
      B);

  // Staging, one layout both sides. Phase 1 inputs, phase 1 outputs, phase
  // 2 inputs, phase 2 outputs, then device-only scratch.
  Layout L;
  const size_t q_at = L.Take(size_t(B) * G * D * elem);
  const size_t policy_at =
      L.Take(size_t(B) * sizeof(cuda::PolicyStreamPointers));
  const size_t cascade_at =
      L.Take(size_t(B) * sizeof(cuda::CascadeStreamPointers));
  const size_t odigest_at = L.Take(size_t(B) * 2 * D * 4);
  const size_t otokens_at = L.Take(size_t(B) * 4);
  const size_t sbegin_at = L.Take(size_t(B) * 4);
  const size_t scount_at = L.Take(size_t(B) * 4);
  const size_t cbegin_at = L.Take(size_t(B) * 4);
  const size_t ccount_at = L.Take(size_t(B) * 4);
  const size_t budget_at = L.Take(size_t(B) * 4);
  const size_t abegin_at = L.Take(size_t(B) * 4);
  const size_t rbegin_at = L.Take(size_t(B) * 4);
  const size_t newpos_at = L.Take(size_t(B) * 8);
  const size_t rfirst_at = L.Take(size_t(B) * 4);
  const size_t rindex_at = L.Take(size_t(B) * 4);
  const size_t phase1_in_end = L.end();
  const size_t selected_at = L.Take(size_t(candidates));
  const size_t phase1_out_end = L.end();
  const size_t cstage_at = L.Take(size_t(spilled_cap) * 4);
  const size_t newrow_at = L.Take(size_t(B) * 4);
  const size_t newk_at = L.Take(size_t(B) * row);
  const size_t newv_at = L.Take(size_t(B) * row);
  const size_t dst_at = L.Take(size_t(max_staged) * 4);
  const size_t stk_at = L.Take(size_t(max_staged) * row);
  const size_t stv_at = L.Take(size_t(max_staged) * row);
  const size_t spos_at = L.Take(shape.fetch ? size_t(max_staged) * 8 : 0);
  const size_t out_at = L.Take(size_t(B) * G * D * elem);  // dtype
  const size_t lse_at = L.Take(size_t(B) * G * 4);
  const size_t epos_at = L.Take(size_t(B) * 8);
  const size_t ek_at = L.Take(size_t(B) * row);
  const size_t ev_at = L.Take(size_t(B) * row);
  const size_t phase2_out_end = L.end();
  // FETCH's results, copied back apart (their size is the budget's).
  const size_t fetch_rows = shape.fetch ? size_t(B) * budget : 0;
  const size_t fpos_at = L.Take(fetch_rows * 8);
  const size_t fk_at = L.Take(fetch_rows * row);
  const size_t fv_at = L.Take(fetch_rows * row);
  const size_t rpos_at = L.Take(fetch_rows * 8);
  const size_t frow_at = L.Take(fetch_rows * 4);
  const size_t scores_at = L.Take(size_t(candidates) * 4);
  const size_t fresh_at = L.Take(size_t(candidates) * 4);
  const size_t first_at = L.Take(size_t(candidates) * 4);
  const size_t mask_at = L.Take(size_t(candidates) * 8);
  const size_t always_at = L.Take(size_t(B) * A * 4);
  const size_t acount_at = L.Take(size_t(B) * 4);
  const size_t stok_at = L.Take(size_t(B) * 4);
  const size_t ids_at = L.Take(size_t(B) * budget * 4);
  const size_t idcount_at = L.Take(size_t(B) * 4);
  const size_t prow_at = L.Take(size_t(B) * budget * 4);
  const size_t rslot_at = L.Take(size_t(B) * budget * 4);
  const size_t rprob_at = L.Take(size_t(B) * budget * 4);
  // The cascade update takes the attended rows as they are (O(budget) a
  // stream); a budget over what it keeps in registers goes through dense
  // per-slot probabilities instead (O(slots)).
  const bool sparse_update = budget <= cuda::kMaxSparseStepRows;
  const size_t sprob_at = L.Take(sparse_update ? 0 : size_t(B) * N * 4);
  const size_t self_at = L.Take(sparse_update ? 0 : size_t(B) * 4);
  const size_t changed_at = L.Take(size_t(B) * C * 4);
  const size_t ccnt_at = L.Take(size_t(B) * 4);
  // Sealed digests the device does not hold yet (host → device only).
  size_t new_sealed = 0;
  for (const DevicePolicyItem& item : items) {
    new_sealed += size_t(std::max(
        0, item.sealed_pages -
               item.layer->policy_->sealed_uploaded[size_t(item.head)]));
  }
  const size_t fresh_sealed_at = L.Take(new_sealed * 2 * D * 4);

  // The per-item host work is a few row copies: worker threads pay off
  // only for very large batches or many bytes (waking them costs as much
  // as hundreds of items: at 64 items the loops side by side made the
  // `device` phase 500–550 µs, one after another 320 µs; at 256 it was a
  // wash), such as FETCH's results (a budget of rows per item) or the
  // rows of many recalled pages. `bytes`: about what the loop copies.
  auto each_item = [&](const std::function<void(size_t)>& fn, size_t bytes) {
    const bool many =
        B >= kParallelDeviceItems || bytes >= kParallelDeviceBytes;
    if (parallel != nullptr) {
      parallel->Run(size_t(B), fn, many);
    } else {
      for (size_t i = 0; i < size_t(B); ++i) fn(i);
    }
  };

  MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->Reserve(L.end()));
  char* h = impl_->host.as<char>();
  char* d = impl_->device.as<char>();
  const cudaStream_t stream = impl_->stream.get();
  // The stream's completion, its wait counted in *wait_nanos.
  auto wait_for_device = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) {
    const auto start = std::chrono::steady_clock::now();
    absl::Status done = impl_->stream.Synchronize();
    if (wait_nanos != nullptr) {
      *wait_nanos += std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::steady_clock::now() - start)
                         .count();
    }
    return done;
  };
  auto host32 = [&](size_t at) { return reinterpret_cast<int32_t*>(h + at); };
  auto dev32 = [&](size_t at) { return reinterpret_cast<int32_t*>(d + at); };
  auto devf = [&](size_t at) { return reinterpret_cast<float*>(d + at); };

  // The sealed digests each stream gained since its last step: its buffer
  // grown (doubling) where needed, the digests staged side by side, then
  // one batched copy for all streams (not a copy call per stream: on the
  // step that seals a page, that is every stream of the batch). A digest,
  // once on the device, stays valid: sealed pages never change.
  {
    size_t staged_digests = 0;
    std::vector<void*> to;
    std::vector<const void*> from;
    std::vector<size_t> sizes;
    // The copies so far, in one call. The staging is pinned and reused by
    // the next call only after this one's stream work: stream order for
    // the sources.
    auto flush = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) {
      if (to.empty()) return absl::OkStatus();
      cudaMemcpyAttributes order = {};
      order.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      size_t first = 0;
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMemcpyBatchAsync(to.data(), from.data(), sizes.data(), to.size(),
                               &order, &first, 1, stream));
      to.clear();
      from.clear();
      sizes.clear();
      return absl::OkStatus();
    };
    for (DevicePolicyItem& item : items) {
      DevicePolicyState& state = *item.layer->policy_;
      const int have = state.sealed_uploaded[size_t(item.head)];
      const int want = item.sealed_pages;
      if (want <= have) continue;
      if (want > state.sealed_capacity) {
        // Copies batched into this buffer land before it is copied over.
        KVMEM_RETURN_IF_ERROR(flush());
        const int capacity = std::max({want, 2 * state.sealed_capacity, 64});
        KVMEM_ASSIGN_OR_RETURN(
            cuda::DeviceBuffer grown,
            cuda::DeviceBuffer::Allocate(size_t(state.heads) * capacity *
                                         state.DigestBytes()));
        for (int hh = 0; hh < state.heads; ++hh) {
          const size_t bytes =
              size_t(state.sealed_uploaded[size_t(hh)]) * state.DigestBytes();
          if (bytes == 0) continue;
          KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
              grown.as<char>() + size_t(hh) * capacity * state.DigestBytes(),
              state.Sealed(hh), bytes, cudaMemcpyDeviceToDevice, stream));
        }
        // The old buffer is freed after the copies (cudaFree waits).
        KVMEM_RETURN_IF_ERROR(impl_->stream.Synchronize());
        state.Count(impl_->policy_bytes,
                    int64_t(grown.bytes()) - int64_t(state.sealed.bytes()));
        state.sealed = std::move(grown);
        state.sealed_capacity = capacity;
      }
      char* at = h + fresh_sealed_at + staged_digests * state.DigestBytes();
      for (int p = have; p < want; ++p) {
        std::memcpy(at + size_t(p - have) * state.DigestBytes(),
                    item.sealed_digests[size_t(p - item.sealed_from)],
                    state.DigestBytes());
      }
      to.push_back(reinterpret_cast<char*>(state.Sealed(item.head)) +
                   size_t(have) * state.DigestBytes());
      from.push_back(at);
      sizes.push_back(size_t(want - have) * state.DigestBytes());
      staged_digests += size_t(want - have);
      state.sealed_uploaded[size_t(item.head)] = want;
    }
    KVMEM_RETURN_IF_ERROR(flush());
  }

  // Phase 2's rows (taken spilled tokens, the new tokens) staged on the
  // host, bound for pool blocks kept for staging (or taken for this call):
  // count_staged places them (spilled_taken must be set), stage_item
  // copies item i's.
  Impl::Blocks taken{impl_->pool.get(), {}};
  Impl::StagingRows staging;
  std::vector<int32_t> staged_begin(static_cast<size_t>(B));
  int32_t staged = 0;
  auto count_staged =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) -> absl::Status {
    staged = 0;
    for (int b = 0; b < B; ++b) {
      const DevicePolicyItem& item = items[size_t(b)];
      staged_begin[size_t(b)] = staged;
      for (size_t j = 0; j < item.spilled_taken.size(); ++j) {
        if (!item.spilled_taken[j]) continue;
        if (item.spilled_keys[j] == nullptr ||
            item.spilled_values[j] == nullptr ||
            (shape.fetch && item.spilled_positions[j] == nullptr)) {
          return absl::InvalidArgumentError(
              absl::StrCat("device policy: item ", b, "'s taken spilled page ",
                           j, " has no rows"));
        }
        staged += SpilledTokens(item, j, k.page_tokens);
      }
      ++staged;  // the new token
    }
    KVMEM_ASSIGN_OR_RETURN(staging, impl_->Stage(staged, int(row), &taken));
    return absl::OkStatus();
  };
  auto stage_item = [&](size_t i) {
    const DevicePolicyItem& item = items[i];
    int64_t s = staged_begin[i];
    auto stage = [&](const uint8_t* key, const uint8_t* value) {
      const int32_t at = staging.Row(s);
      host32(dst_at)[s] = at;
      std::memcpy(h + stk_at + size_t(s) * row, key, row);
      std::memcpy(h + stv_at + size_t(s) * row, value, row);
      ++s;
      return at;
    };
    for (size_t j = 0; j < item.spilled_taken.size(); ++j) {
      if (!item.spilled_taken[j]) continue;
      host32(cstage_at)[size_t(spilled_begin[i]) + j] = int32_t(s);
      // A page's rows are contiguous on both sides: one copy a plane.
      const int n = SpilledTokens(item, j, k.page_tokens);
      std::memcpy(h + stk_at + size_t(s) * row, item.spilled_keys[j],
                  size_t(n) * row);
      std::memcpy(h + stv_at + size_t(s) * row, item.spilled_values[j],
                  size_t(n) * row);
      for (int t = 0; t < n; ++t, ++s) {
        host32(dst_at)[s] = staging.Row(s);
        if (shape.fetch) {
          reinterpret_cast<int64_t*>(h + spos_at)[s] =
              item.spilled_positions[j][t];
        }
      }
    }
    host32(newrow_at)[i] = stage(item.key, item.value);
  };

  // Without spilled candidates the selection has nothing to tell the host:
  // phase 2's rows (the new tokens only) are staged in phase 1's pass over
  // the items, and both phases' inputs go in one copy (the selection's
  // output bytes between them ride along). Every API call costs ~10 µs of
  // a batch-1 step, and every pass over the items on the worker threads
  // costs their wake-up.
  if (!round_trip) KVMEM_RETURN_IF_ERROR(count_staged());

  // Phase 1: candidates, scores, the fill.
  each_item(
      [&](size_t i) {
        const DevicePolicyItem& item = items[i];
        const int b = int(i);
        std::memcpy(h + q_at + i * G * D * elem, item.query,
                    size_t(G) * D * elem);
        const DevicePolicyState& state = *item.layer->policy_;
        reinterpret_cast<cuda::PolicyStreamPointers*>(h + policy_at)[i] =
            state.Policy(item.head);
        reinterpret_cast<cuda::CascadeStreamPointers*>(h + cascade_at)[i] =
            state.Cascade(item.head);
        const int sealed = item.sealed_pages;
        const int n = sealed + (item.open_tokens > 0 ? 1 : 0);
        if (item.open_tokens > 0) {
          std::memcpy(h + odigest_at + i * 2 * D * 4, item.open_digest,
                      size_t(2) * D * 4);
        }
        host32(otokens_at)[i] = item.open_tokens;
        host32(sbegin_at)[i] = spilled_begin[i];
        host32(scount_at)[i] = sealed;
        host32(cbegin_at)[i] = candidate_begin[i];
        host32(ccount_at)[i] = Rc + n;
        host32(budget_at)[i] = budget;
        host32(abegin_at)[i] = b * A;
        host32(rbegin_at)[i] = b * budget;
        reinterpret_cast<int64_t*>(h + newpos_at)[i] = item.position;
        host32(rfirst_at)[i] = ring_first[i];
        host32(rindex_at)[i] = ring_index[i];
        std::memcpy(h + newk_at + i * row, item.key, row);
        std::memcpy(h + newv_at + i * row, item.value, row);
        if (!round_trip) stage_item(i);
      },
      size_t(B) * (size_t(G) * D * elem + 4 * row));

  // What a step enqueues, in parts: phase 1 (its inputs' copy, candidates,
  // scores, the selection); with spilled candidates, the copy of phase 2's
  // staged rows; phase 2 (the rows to the pool, the attention, the cascade
  // update, the outputs' copy back).
  const auto* policy_streams =
      reinterpret_cast<const cuda::PolicyStreamPointers*>(d + policy_at);
  auto enqueue_phase1 =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) -> absl::Status {
    // Without spilled candidates phase 2's inputs ride along (and the
    // selection's output bytes between them).
    KVMEM_RETURN_IF_ERROR(
        cuda::CopyToDevice(d, h, round_trip ? phase1_in_end : out_at, stream));
    cuda::PlanCandidatesArgs plan;
    plan.streams = policy_streams;
    plan.queries = d + q_at;
    plan.spilled_begin = dev32(sbegin_at);
    plan.sealed_count = dev32(scount_at);
    plan.open_tokens = dev32(otokens_at);
    plan.open_digests = devf(odigest_at);
    plan.candidate_begin = dev32(cbegin_at);
    plan.scores = devf(scores_at);
    plan.fresh_tokens = dev32(fresh_at);
    plan.first_id = dev32(first_at);
    plan.fresh_mask = reinterpret_cast<uint64_t*>(d + mask_at);
    plan.always_in_ids = dev32(always_at);
    plan.always_in_count = dev32(acount_at);
    plan.max_candidates = std::max(1, most_cap);
    KVMEM_RETURN_IF_ERROR(cuda::PlanDecodeCandidates(k, plan, stream));

    cuda::SelectPagesShape select_shape;
    select_shape.streams = B;
    select_shape.max_candidates_per_stream = std::max(1, most_cap);
    select_shape.compact_rows = true;
    cuda::SelectPagesInputs select_in;
    select_in.scores = devf(scores_at);
    select_in.fresh_tokens = dev32(fresh_at);
    select_in.candidate_begin = dev32(cbegin_at);
    select_in.candidate_count = dev32(ccount_at);
    select_in.always_in_tokens = dev32(acount_at);
    select_in.budget_tokens = dev32(budget_at);
    cuda::SelectPagesOutputs select_out;
    select_out.selected = reinterpret_cast<uint8_t*>(d + selected_at);
    select_out.selected_tokens = dev32(stok_at);
    cuda::SelectPagesRows select_rows;
    select_rows.always_in_rows = dev32(always_at);
    select_rows.always_in_begin = dev32(abegin_at);
    select_rows.candidate_first_row = dev32(first_at);
    select_rows.candidate_fresh_mask =
        reinterpret_cast<const uint64_t*>(d + mask_at);
    select_rows.rows_begin = dev32(rbegin_at);
    select_rows.rows = dev32(ids_at);
    select_rows.rows_count = dev32(idcount_at);
    KVMEM_RETURN_IF_ERROR(cuda::SelectPages(select_shape, select_in, select_out,
                                            select_rows, stream));
    // With spilled candidates the host learns which were taken; nothing
    // has changed yet.
    if (round_trip) {
      KVMEM_RETURN_IF_ERROR(cuda::CopyToHost(h + selected_at, d + selected_at,
                                             phase1_out_end - selected_at,
                                             stream));
    }
    return absl::OkStatus();
  };
  auto enqueue_staged =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) -> absl::Status {
    // The tail of phase 1's inputs (the new tokens) and phase 2's inputs
    // travel together; only what staging used of the row regions is sent.
    KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d + cstage_at, h + cstage_at,
                                             stk_at - cstage_at, stream));
    KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d + stk_at, h + stk_at,
                                             size_t(staged) * row, stream));
    KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d + stv_at, h + stv_at,
                                             size_t(staged) * row, stream));
    if (shape.fetch) {
      KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d + spos_at, h + spos_at,
                                               size_t(staged) * 8, stream));
    }
    return absl::OkStatus();
  };
  auto enqueue_phase2 =
      [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) -> absl::Status {
    // From here on an error leaves the layers' state half-stepped.
    *touched = true;
    KVMEM_RETURN_IF_ERROR(impl_->ScatterStaged(staged, int(row), dev32(dst_at),
                                               d + stk_at, d + stv_at, stream));

    cuda::MapRowsArgs map;
    map.streams = policy_streams;
    map.ids = dev32(ids_at);
    map.counts = dev32(idcount_at);
    map.capacity = budget;
    map.spilled_begin = dev32(sbegin_at);
    map.ring_first = dev32(rfirst_at);
    map.spilled_stage = dev32(cstage_at);
    map.staged_rows = dev32(dst_at);
    map.new_token_rows = dev32(newrow_at);
    map.pool_rows = dev32(prow_at);
    map.row_slots = dev32(rslot_at);
    if (shape.fetch) {
      map.row_positions = reinterpret_cast<int64_t*>(d + rpos_at);
      map.staged_positions = reinterpret_cast<const int64_t*>(d + spos_at);
      map.new_token_positions = reinterpret_cast<const int64_t*>(d + newpos_at);
    }
    KVMEM_RETURN_IF_ERROR(cuda::MapSelectedRows(k, map, stream));

    cuda::DecodeAttentionShape ds;
    ds.streams = B;
    ds.group = G;
    ds.head_dim = D;
    ds.dtype = shape.dtype;
    ds.max_rows_per_stream = budget;
    ds.rows_capacity = int64_t(B) * budget;
    ds.want_probs = true;
    KVMEM_ASSIGN_OR_RETURN(
        cuda::DecodeAttentionPlan attention_plan,
        cuda::PlanDecodeAttentionSplits(ds, kAttentionSplits));
    KVMEM_RETURN_IF_ERROR(
        impl_->Grow(&impl_->workspace, attention_plan.workspace_bytes));
    cuda::DecodeAttentionInputs in;
    in.queries = d + q_at;
    in.key_rows = impl_->pool->plane_base(0);
    in.value_rows = impl_->pool->plane_base(1);
    in.rows = dev32(prow_at);
    in.row_begin = dev32(rbegin_at);
    in.row_count = dev32(idcount_at);
    in.softmax_scale = shape.softmax_scale;
    in.reduction = shape.reduction;
    cuda::DecodeAttentionOutputs out;
    out.out = d + out_at;  // rounded on the device: no host pass
    out.lse = devf(lse_at);
    out.reduced_probs = devf(rprob_at);
    KVMEM_RETURN_IF_ERROR(cuda::DecodeAttention(
        ds, in, out, attention_plan, impl_->workspace.get(),
        impl_->workspace.bytes(), stream));

    if (!sparse_update) {
      cuda::ScatterProbsArgs probs;
      probs.row_slots = dev32(rslot_at);
      probs.counts = dev32(idcount_at);
      probs.capacity = budget;
      probs.reduced_probs = devf(rprob_at);
      probs.slot_probs = devf(sprob_at);
      probs.self_probs = devf(self_at);
      KVMEM_RETURN_IF_ERROR(cuda::ScatterSlotProbs(k, probs, stream));
    }

    if (shape.fetch) {
      // The rows as they are before the update moves them, by position.
      cuda::SortRowsArgs sort;
      sort.rows = dev32(prow_at);
      sort.positions = reinterpret_cast<const int64_t*>(d + rpos_at);
      sort.counts = dev32(idcount_at);
      sort.capacity = budget;
      sort.sorted_rows = dev32(frow_at);
      sort.sorted_positions = reinterpret_cast<int64_t*>(d + fpos_at);
      KVMEM_RETURN_IF_ERROR(cuda::SortRowsByPosition(k, sort, stream));
      cuda::GatherRowsShape gather_shape;
      gather_shape.streams = B;
      gather_shape.head_dim = D;
      gather_shape.dtype = shape.dtype;
      gather_shape.max_rows_per_stream = budget;
      cuda::GatherRowsInputs gather_in;
      gather_in.key_rows = impl_->pool->plane_base(0);
      gather_in.value_rows = impl_->pool->plane_base(1);
      gather_in.rows = dev32(frow_at);
      gather_in.row_begin = dev32(rbegin_at);
      gather_in.row_count = dev32(idcount_at);
      cuda::GatherRowsOutputs gather_out;
      gather_out.keys = d + fk_at;
      gather_out.values = d + fv_at;
      KVMEM_RETURN_IF_ERROR(
          cuda::GatherRows(gather_shape, gather_in, gather_out, stream));
    }
    cuda::CascadeBatchShape cascade_shape;
    cascade_shape.streams = B;
    cascade_shape.params = shape.cascade;
    cascade_shape.head_dim = D;
    cascade_shape.dtype = shape.dtype;
    cuda::CascadeDeviceState cascade_state;
    cascade_state.key_rows = impl_->pool->plane_base(0);
    cascade_state.value_rows = impl_->pool->plane_base(1);
    cascade_state.streams =
        reinterpret_cast<const cuda::CascadeStreamPointers*>(d + cascade_at);
    cuda::CascadeStepInputs step;
    if (sparse_update) {
      step.row_slots = dev32(rslot_at);
      step.row_probs = devf(rprob_at);
      step.row_counts = dev32(idcount_at);
      step.row_capacity = budget;
    } else {
      step.probs = devf(sprob_at);
      step.self_probs = devf(self_at);
    }
    step.keys = d + newk_at;
    step.values = d + newv_at;
    cuda::CascadeStepOutputs step_out;
    step_out.evicted_positions = reinterpret_cast<int64_t*>(d + epos_at);
    step_out.evicted_keys = d + ek_at;
    step_out.evicted_values = d + ev_at;
    step_out.changed_slots = dev32(changed_at);
    step_out.changed_counts = dev32(ccnt_at);
    KVMEM_RETURN_IF_ERROR(cuda::UpdateCascades(cascade_shape, cascade_state,
                                               step, step_out, stream));
    cuda::KeepEvictedArgs keep;
    keep.streams = policy_streams;
    keep.evicted_positions = reinterpret_cast<const int64_t*>(d + epos_at);
    keep.evicted_keys = d + ek_at;
    keep.evicted_values = d + ev_at;
    keep.ring_index = dev32(rindex_at);
    keep.key_rows = impl_->pool->plane_base(0);
    keep.value_rows = impl_->pool->plane_base(1);
    // Rings off (fixed at Create): no launch, the same in every step.
    if (impl_->spill_ring_tokens > 0) {
      KVMEM_RETURN_IF_ERROR(cuda::KeepEvictedInRings(k, keep, stream));
    }

    cuda::RefreshDigestsArgs refresh;
    refresh.streams = policy_streams;
    refresh.key_rows = impl_->pool->plane_base(0);
    refresh.changed_slots = dev32(changed_at);
    refresh.changed_counts = dev32(ccnt_at);
    KVMEM_RETURN_IF_ERROR(cuda::RefreshChangedDigests(k, refresh, stream));

    KVMEM_RETURN_IF_ERROR(cuda::CopyToHost(h + out_at, d + out_at,
                                           phase2_out_end - out_at, stream));
    if (shape.fetch) {
      KVMEM_RETURN_IF_ERROR(cuda::CopyToHost(h + idcount_at, d + idcount_at,
                                             size_t(B) * 4, stream));
      KVMEM_RETURN_IF_ERROR(cuda::CopyToHost(h + fpos_at, d + fpos_at,
                                             rpos_at - fpos_at, stream));
    }
    return absl::OkStatus();
  };

  // A part's launches depend only on the batch's shape, the staging's
  // layout (its capacities) and the buffers' addresses, and on how many
  // rows are staged. Such a part is captured into a CUDA graph at the
  // second step that launches it with the same key, and later steps replay
  // it: one API call for its copies and kernels (each call costs 5–20 µs
  // of host time, which at batch 1 is most of the step). A capture that
  // fails (say, an unsupported call) falls back to plain launches, for
  // good. `key` empty: plain launches. `changes`: the part changes the
  // layers' state (*touched once launched).
  auto run = [&](const std::string& key,
                 const std::function<absl::Status()>& enqueue, bool changes)
                 ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) -> absl::Status {
    Impl::DecodeGraph* graph =
        key.empty() ? nullptr : impl_->FindDecodeGraph(key);
    if (graph != nullptr && graph->exec.valid()) {
      if (changes) *touched = true;
      impl_->graph_launches.fetch_add(1, std::memory_order_relaxed);
      return graph->exec.Launch(stream);
    }
    if (graph != nullptr && graph->seen && !graph->failed &&
        cuda::BeginCapture(stream).ok()) {
      const bool was_touched = *touched;
      const absl::Status captured = enqueue();
      absl::StatusOr<cuda::GraphExec> exec =
          cuda::GraphExec::EndCapture(stream);
      *touched = was_touched;  // a capture runs nothing
      if (captured.ok() && exec.ok()) {
        graph->exec = *std::move(exec);
        if (changes) *touched = true;
        return graph->exec.Launch(stream);
      }
      graph->failed = true;
      return enqueue();
    }
    const absl::Status enqueued = enqueue();
    if (graph != nullptr && enqueued.ok()) graph->seen = true;
    return enqueued;
  };
  const std::string key =
      impl_->graphs_on
          ? absl::StrCat(DecodeGraphKey(shape, B, most_cap,
                                        {d, h, impl_->workspace.get(),
                                         impl_->pool->plane_base(0),
                                         impl_->pool->plane_base(1)}),
                         "/", candidates, "/", spilled_cap, "/", max_staged)
          : std::string();
  auto keyed = [&](const char* part) {
    return key.empty() ? std::string() : absl::StrCat(key, part);
  };
  if (!round_trip) {
    if (spilled_total > 0) {
      impl_->ring_steps.fetch_add(1, std::memory_order_relaxed);
    }
    KVMEM_RETURN_IF_ERROR(run(
        keyed("/step"),
        [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) {
          const absl::Status first = enqueue_phase1();
          return first.ok() ? enqueue_phase2() : first;
        },
        /*changes=*/true));
  } else {
    KVMEM_RETURN_IF_ERROR(
        run(keyed("/phase1"), enqueue_phase1, /*changes=*/false));
    KVMEM_RETURN_IF_ERROR(wait_for_device());
    for (int b = 0; b < B; ++b) {
      DevicePolicyItem& item = items[size_t(b)];
      const size_t n =
          size_t(item.sealed_pages) + (item.open_tokens > 0 ? 1 : 0);
      const uint8_t* selected =
          reinterpret_cast<const uint8_t*>(h + selected_at) +
          candidate_begin[size_t(b)] + Rc;
      item.spilled_taken.assign(selected, selected + n);
      // Pages in the ring are the device's own: nothing for the host.
      for (size_t j = size_t(std::max(0, ring_first[size_t(b)])); j < n; ++j) {
        if (item.spilled_taken[j] != 0) {
          impl_->ring_pages.fetch_add(1, std::memory_order_relaxed);
        }
        item.spilled_taken[j] = 0;
      }
      item.spilled_keys.assign(n, nullptr);
      item.spilled_values.assign(n, nullptr);
      item.spilled_positions.assign(n, nullptr);
    }
    KVMEM_RETURN_IF_ERROR(recall());
    KVMEM_RETURN_IF_ERROR(count_staged());
    each_item(stage_item, size_t(staged) * 2 * row);
    // Usually no spilled page is taken and only the new tokens are staged:
    // the same launches as the previous step's. Otherwise the staged rows'
    // count is this step's own.
    KVMEM_RETURN_IF_ERROR(run(
        staged == B ? keyed("/phase2") : std::string(),
        [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) {
          const absl::Status rows = enqueue_staged();
          return rows.ok() ? enqueue_phase2() : rows;
        },
        /*changes=*/true));
  }
  KVMEM_RETURN_IF_ERROR(wait_for_device());
  each_item(
      [&](size_t i) {
        DevicePolicyItem& item = items[i];
        if (item.out != nullptr) {
          std::memcpy(item.out, h + out_at + i * G * D * elem,
                      size_t(G) * D * elem);
        }
        if (item.lse != nullptr) {
          std::memcpy(item.lse, h + lse_at + i * G * 4, size_t(G) * 4);
        }
        item.evicted_position =
            reinterpret_cast<const int64_t*>(h + epos_at)[i];
        // Each item is its own (layer, head): no two write one ring.
        item.layer->policy_->rings[size_t(item.head)].Kept(
            spilled_tokens[i], item.evicted_position >= 0 ? 1 : 0);
        if (shape.fetch && item.fetched != nullptr) {
          const size_t n = size_t(host32(idcount_at)[i]);
          const size_t from = i * size_t(budget);
          const int64_t* positions =
              reinterpret_cast<const int64_t*>(h + fpos_at) + from;
          item.fetched->positions.assign(positions, positions + n);
          item.fetched->k.assign(h + fk_at + from * row, n * row);
          item.fetched->v.assign(h + fv_at + from * row, n * row);
        }
        if (item.evicted_position >= 0) {
          item.evicted_key.assign(h + ek_at + i * row, row);
          item.evicted_value.assign(h + ev_at + i * row, row);
        }
      },
      shape.fetch ? size_t(B) * budget * 2 * row : size_t(B) * G * D * elem);
  return absl::OkStatus();
}

}  // namespace kvmem
