// Prefill chunks of device-owned layers (DeviceBackend::PrefillOwned): the
// chunk's tokens attend densely to every resident slot and causally to the
// chunk (selection.md: a chunk recalls nothing), their exact probabilities
// update the cascade's scores, the chunk is inserted and the changed pages'
// digests refreshed, all on the device, for every stream of every item in
// one launch per phase (kernels/cuda/chunk_attention.h, chunk_insert.h,
// decode_policy.h). One host→device copy (queries and rows of the chunk,
// the state pointers) and one device→host copy (outputs, evicted tokens).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/chunk_insert.h"
#include "kernels/cuda/cuda_status.h"
#include "service/engine/device_backend_impl.h"

namespace kvmem {

using device_internal::KernelShape;
using device_internal::Layout;

absl::Status DeviceBackend::PrefillOwned(const DevicePolicyShape& shape,
                                         int chunk_tokens,
                                         absl::Span<DevicePrefillItem> items,
                                         bool* touched) {
  *touched = false;
  if (items.empty()) return absl::OkStatus();
  const int T = chunk_tokens;
  // Streams (KV heads) numbered across the items.
  std::vector<int> first_stream(items.size());
  int B = 0;
  // Every item attends (queries), or none does (APPEND without queries).
  const bool attend = items[0].queries != nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    const DevicePrefillItem& item = items[i];
    if (item.layer == nullptr || !item.layer->owned() ||
        (item.queries != nullptr) != attend || item.keys == nullptr ||
        item.values == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device prefill: item ", i,
          " is not a device-owned layer with a chunk (queries in every item "
          "or in none)"));
    }
    const int heads = item.layer->policy_->heads;
    const size_t outputs = attend ? size_t(heads) : 0;
    if ((item.out.size() != outputs && !item.out.empty()) ||
        item.lse.size() != item.out.size() ||
        (!item.spilled.empty() && int(item.spilled.size()) != heads)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device prefill: item ", i, " has outputs for ", item.out.size(),
          " heads and spilled counts for ", item.spilled.size(), ", want ",
          outputs, " or none and ", heads, " or none"));
    }
    first_stream[i] = B;
    B += heads;
  }
  const cuda::DecodePolicyShape k = KernelShape(shape, B);
  KVMEM_RETURN_IF_ERROR(k.Validate());
  const int G = shape.group, D = shape.head_dim, C = shape.cascade.cascades;
  const size_t row = size_t(D) * DTypeBytes(shape.dtype);
  cuda::ChunkShape chunk;
  chunk.streams = B;
  chunk.group = G;
  chunk.chunk = T;
  chunk.params = shape.cascade;
  chunk.dtype = shape.dtype;
  chunk.reduction = shape.reduction;
  chunk.softmax_scale = shape.softmax_scale;
  cuda::ChunkInsertShape insert;
  insert.batch.streams = B;
  insert.batch.params = shape.cascade;
  insert.batch.head_dim = D;
  insert.batch.dtype = shape.dtype;
  insert.chunk_tokens = T;
  if ((attend && D != cuda::kChunkHeadDim) || T < 1 ||
      T > shape.cascade.window) {
    return absl::InvalidArgumentError(
        absl::StrCat("device prefill: D ", D, " and T ", T, ", want D ",
                     cuda::kChunkHeadDim, " and 1 <= T <= W"));
  }

  // Staging, one layout both sides: inputs, then outputs.
  Layout L;
  const size_t policy_at =
      L.Take(size_t(B) * sizeof(cuda::PolicyStreamPointers));
  const size_t cascade_at =
      L.Take(size_t(B) * sizeof(cuda::CascadeStreamPointers));
  const size_t q_at = L.Take(attend ? size_t(T) * B * G * row : 0);
  const size_t k_at = L.Take(size_t(T) * B * row);
  const size_t v_at = L.Take(size_t(T) * B * row);
  const size_t rindex_at = L.Take(size_t(B) * 4);  // spill rings
  const size_t in_end = L.end();
  const size_t out_at = L.Take(attend ? size_t(T) * B * G * D * 4 : 0);
  const size_t lse_at = L.Take(attend ? size_t(T) * B * G * 4 : 0);
  const size_t epos_at = L.Take(size_t(B) * T * 8);
  const size_t ecount_at = L.Take(size_t(B) * 4);
  const size_t ek_at = L.Take(size_t(B) * T * row);
  const size_t ev_at = L.Take(size_t(B) * T * row);
  const size_t out_end = L.end();
  // Device-only scratch, apart from the staging pair (whose host half is
  // pinned): the new tokens' scores, the changed slots, and the kernels'
  // workspaces (mostly the score pass's partial sums).
  Layout scratch;
  const size_t initial_at = scratch.Take(size_t(B) * T * 4);
  const size_t changed_at = scratch.Take(size_t(B) * T * C * 4);
  const size_t ccount_at = scratch.Take(size_t(B) * 4);
  const size_t work_bytes = cuda::ChunkWorkspaceBytes(chunk);
  const size_t work_at = scratch.Take(work_bytes);
  const size_t insert_bytes = cuda::ChunkInsertScratchBytes(insert);
  const size_t insert_at = scratch.Take(insert_bytes);

  MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->Reserve(L.end()));
  KVMEM_RETURN_IF_ERROR(impl_->Grow(&impl_->chunk_scratch, scratch.end()));
  char* h = impl_->host.as<char>();
  char* d = impl_->device.as<char>();
  char* x = impl_->chunk_scratch.as<char>();
  const cudaStream_t stream = impl_->stream.get();
  for (size_t i = 0; i < items.size(); ++i) {
    const DevicePrefillItem& item = items[i];
    const DevicePolicyState& state = *item.layer->policy_;
    const int heads = state.heads;
    for (int hh = 0; hh < heads; ++hh) {
      const int b = first_stream[i] + hh;
      reinterpret_cast<cuda::PolicyStreamPointers*>(h + policy_at)[b] =
          state.Policy(hh);
      reinterpret_cast<cuda::CascadeStreamPointers*>(h + cascade_at)[b] =
          state.Cascade(hh);
      // The chunk's evicted tokens go on in the stream's spill ring.
      int32_t index = -1;
      if (!item.spilled.empty()) {
        SpillRing& ring = item.layer->policy_->rings[size_t(hh)];
        ring.Sync(item.spilled[size_t(hh)]);
        index = ring.Index(item.spilled[size_t(hh)]);
      }
      reinterpret_cast<int32_t*>(h + rindex_at)[b] = index;
    }
    // The wire's [T, H·G, D] and [T, H, D] into the batch's [T, B·G, D]
    // and [T, B, D].
    for (int t = 0; t < T; ++t) {
      const size_t to = size_t(t) * B + size_t(first_stream[i]);
      const size_t from = size_t(t) * heads;
      if (attend) {
        std::memcpy(h + q_at + to * G * row, item.queries + from * G * row,
                    size_t(heads) * G * row);
      }
      std::memcpy(h + k_at + to * row, item.keys + from * row,
                  size_t(heads) * row);
      std::memcpy(h + v_at + to * row, item.values + from * row,
                  size_t(heads) * row);
    }
  }
  KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d, h, in_end, stream));

  // From here on an error leaves the layers' state half-stepped.
  *touched = true;
  const auto* cascades =
      reinterpret_cast<const cuda::CascadeStreamPointers*>(d + cascade_at);
  cuda::ChunkInputs in;
  in.queries = attend ? d + q_at : nullptr;
  in.keys = d + k_at;
  in.values = d + v_at;
  in.key_rows = impl_->pool->plane_base(0);
  in.value_rows = impl_->pool->plane_base(1);
  cuda::ChunkScoreState scores;
  scores.streams = cascades;
  cuda::ChunkOutputs out;
  out.out = reinterpret_cast<float*>(d + out_at);
  out.lse = reinterpret_cast<float*>(d + lse_at);
  out.initial_scores = reinterpret_cast<float*>(x + initial_at);
  KVMEM_RETURN_IF_ERROR(cuda::AttendChunk(chunk, in, scores, out, x + work_at,
                                          work_bytes, stream));

  cuda::CascadeDeviceState state;
  state.key_rows = impl_->pool->plane_base(0);
  state.value_rows = impl_->pool->plane_base(1);
  state.streams = cascades;
  cuda::ChunkInsertInputs insert_in;
  insert_in.keys = d + k_at;
  insert_in.values = d + v_at;
  insert_in.stream_stride = D;
  insert_in.token_stride = int64_t{B} * D;
  insert_in.initial_scores = out.initial_scores;
  cuda::ChunkInsertOutputs insert_out;
  insert_out.evicted_positions = reinterpret_cast<int64_t*>(d + epos_at);
  insert_out.evicted_counts = reinterpret_cast<int32_t*>(d + ecount_at);
  insert_out.evicted_keys = d + ek_at;
  insert_out.evicted_values = d + ev_at;
  insert_out.changed_slots = reinterpret_cast<int32_t*>(x + changed_at);
  insert_out.changed_counts = reinterpret_cast<int32_t*>(x + ccount_at);
  KVMEM_RETURN_IF_ERROR(cuda::InsertChunks(insert, state, insert_in, insert_out,
                                           x + insert_at, insert_bytes,
                                           stream));

  if (impl_->spill_ring_tokens > 0) {
    cuda::KeepEvictedArgs keep;
    keep.streams =
        reinterpret_cast<const cuda::PolicyStreamPointers*>(d + policy_at);
    keep.rows_per_stream = T;
    keep.evicted_counts = insert_out.evicted_counts;
    keep.evicted_positions = insert_out.evicted_positions;
    keep.evicted_keys = insert_out.evicted_keys;
    keep.evicted_values = insert_out.evicted_values;
    keep.ring_index = reinterpret_cast<const int32_t*>(d + rindex_at);
    keep.key_rows = impl_->pool->plane_base(0);
    keep.value_rows = impl_->pool->plane_base(1);
    KVMEM_RETURN_IF_ERROR(cuda::KeepEvictedInRings(k, keep, stream));
  }

  cuda::RefreshDigestsArgs refresh;
  refresh.streams =
      reinterpret_cast<const cuda::PolicyStreamPointers*>(d + policy_at);
  refresh.key_rows = impl_->pool->plane_base(0);
  refresh.changed_slots = insert_out.changed_slots;
  refresh.changed_counts = insert_out.changed_counts;
  refresh.changed_capacity = T * C;
  KVMEM_RETURN_IF_ERROR(cuda::RefreshChangedDigests(k, refresh, stream));

  KVMEM_RETURN_IF_ERROR(
      cuda::CopyToHost(h + out_at, d + out_at, out_end - out_at, stream));
  KVMEM_RETURN_IF_ERROR(impl_->stream.Synchronize());
  for (size_t i = 0; i < items.size(); ++i) {
    DevicePrefillItem& item = items[i];
    const int heads = item.layer->policy_->heads;
    const bool outputs = !item.out.empty();
    item.evicted.assign(size_t(heads), {});
    for (int hh = 0; hh < heads; ++hh) {
      const int b = first_stream[i] + hh;
      for (int t = 0; t < T && outputs; ++t) {
        const size_t at = (size_t(t) * B + size_t(b)) * G;
        std::memcpy(item.out[size_t(hh)] + size_t(t) * G * D,
                    h + out_at + at * D * 4, size_t(G) * D * 4);
        std::memcpy(item.lse[size_t(hh)] + size_t(t) * G, h + lse_at + at * 4,
                    size_t(G) * 4);
      }
      const int evicted = reinterpret_cast<const int32_t*>(h + ecount_at)[b];
      if (!item.spilled.empty()) {
        item.layer->policy_->rings[size_t(hh)].Kept(item.spilled[size_t(hh)],
                                                    evicted);
      }
      DevicePrefillItem::Evicted& e = item.evicted[size_t(hh)];
      const int64_t* positions =
          reinterpret_cast<const int64_t*>(h + epos_at) + size_t(b) * T;
      e.positions.assign(positions, positions + evicted);
      e.keys.assign(h + ek_at + size_t(b) * T * row, size_t(evicted) * row);
      e.values.assign(h + ev_at + size_t(b) * T * row, size_t(evicted) * row);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvmem
