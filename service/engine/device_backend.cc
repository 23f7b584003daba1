#include "service/engine/device_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "base/mutex.h"
#include "base/status_macros.h"
#include "kernels/cpu/dtype.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/device_pool.h"
#include "kernels/cuda/device_probe.h"
#include "kernels/cuda/gather_rows.h"
#include "service/engine/device_backend_impl.h"

namespace kvmem {

using device_internal::AlignUp;
using device_internal::FirstRow;
using device_internal::kAttentionSplits;
using device_internal::RowsPerBlock;

absl::StatusOr<std::unique_ptr<DeviceBackend>> DeviceBackend::Create(
    const Options& options) {
  const cuda::DeviceProbe probe = cuda::ProbeDevices();
  if (probe.device_count == 0) {
    return absl::UnavailableError(
        absl::StrCat("no CUDA device: ", probe.why_none));
  }
  auto impl = std::make_unique<Impl>();
  cuda::DevicePoolOptions pool;
  pool.block_bytes = options.block_bytes;
  pool.pool_bytes = options.pool_bytes;
  pool.free_fraction = options.free_fraction;
  pool.planes = 2;  // keys, values
  KVMEM_ASSIGN_OR_RETURN(impl->pool, cuda::DevicePool::Create(pool));
  impl->graphs_on = options.decode_graphs;
  impl->spill_ring_tokens = std::max(0, options.spill_ring_tokens);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
      &impl->multiprocessors, cudaDevAttrMultiProcessorCount, 0));
  {
    MutexLock lock(&impl->mu);
    KVMEM_ASSIGN_OR_RETURN(impl->stream, cuda::Stream::Create());
    KVMEM_RETURN_IF_ERROR(impl->Reserve(size_t{1} << 20));
    // 64 MiB a plane (2K rows for each of 128 streams at 256 bytes), at
    // most an eighth of the pool, at least one block.
    const int32_t total = impl->pool->total_blocks();
    if (total < 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device pool: ", total, " block of ", options.block_bytes,
          " bytes; want at least 2 (one is kept for staging)"));
    }
    const int32_t want = int32_t(std::max<size_t>(
        1, std::min<size_t>(size_t(total) / 8,
                            (size_t{64} << 20) / options.block_bytes)));
    KVMEM_ASSIGN_OR_RETURN(impl->reserved, impl->pool->Take(want));
    impl->reserved_count = want;
  }
  return std::unique_ptr<DeviceBackend>(
      new DeviceBackend(std::move(impl), probe.device_name));
}

DeviceBackend::DeviceBackend(std::unique_ptr<Impl> impl, std::string name)
    : impl_(std::move(impl)), device_name_(std::move(name)) {}

DeviceBackend::~DeviceBackend() = default;

// Both leave out the blocks kept for staging: what sessions can hold, and
// what they (with any staging beyond those blocks) hold now.
int64_t DeviceBackend::pool_bytes() const {
  return int64_t(impl_->pool->total_blocks() - impl_->reserved_count) *
         int64_t(impl_->pool->block_bytes()) * 2;
}

int64_t DeviceBackend::side_bytes() const {
  return impl_->scratch_bytes.load(std::memory_order_relaxed) +
         impl_->policy_bytes->load(std::memory_order_relaxed);
}

int64_t DeviceBackend::decode_graph_launches() const {
  return impl_->graph_launches.load(std::memory_order_relaxed);
}
int64_t DeviceBackend::decode_ring_steps() const {
  return impl_->ring_steps.load(std::memory_order_relaxed);
}
int64_t DeviceBackend::decode_ring_pages() const {
  return impl_->ring_pages.load(std::memory_order_relaxed);
}

int64_t DeviceBackend::used_bytes() const {
  return int64_t(impl_->pool->total_blocks() - impl_->pool->free_blocks() -
                 impl_->reserved_count) *
         int64_t(impl_->pool->block_bytes()) * 2;
}

int64_t DeviceBackend::free_plane_bytes() const {
  return int64_t(impl_->pool->free_blocks()) *
         int64_t(impl_->pool->block_bytes());
}

absl::StatusOr<DeviceLayerRows> DeviceBackend::Upload(
    int row_bytes, int slots, absl::Span<const uint8_t* const> keys,
    absl::Span<const uint8_t* const> values) {
  const size_t block_bytes = impl_->pool->block_bytes();
  const int64_t per_block = RowsPerBlock(block_bytes, row_bytes);
  if (per_block < 1 || slots < 1 || keys.size() != values.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device upload: ", slots, " slots of ", row_bytes, " bytes, ",
        keys.size(), " key and ", values.size(), " value streams"));
  }
  const int64_t rows = int64_t(keys.size()) * slots;
  const int64_t count = (rows + per_block - 1) / per_block;
  absl::StatusOr<std::vector<int32_t>> taken =
      impl_->pool->Take(int32_t(count));
  if (!taken.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device pool: ", count, " blocks of ", block_bytes,
                     " bytes wanted, ", impl_->pool->free_blocks(), " of ",
                     impl_->pool->total_blocks(), " free (--device_memory)"));
  }
  DeviceLayerRows layer;
  layer.blocks_ = std::move(*taken);
  layer.slots_ = slots;
  layer.rows_per_block_ = int(per_block);
  for (int32_t b : layer.blocks_) {
    layer.first_row_.push_back(FirstRow(b, block_bytes, row_bytes));
  }
  MutexLock lock(&impl_->mu);
  char* const key_plane = static_cast<char*>(impl_->pool->plane_base(0));
  char* const value_plane = static_cast<char*>(impl_->pool->plane_base(1));
  absl::Status copied;
  // Runs of rows that sit in one block are one copy each.
  for (size_t h = 0; h < keys.size() && copied.ok(); ++h) {
    for (int s = 0; s < slots && copied.ok();) {
      const int64_t i = int64_t(h) * slots + s;
      const int run =
          int(std::min<int64_t>(slots - s, per_block - i % per_block));
      const size_t at = size_t(layer.Row(int(h), s)) * size_t(row_bytes);
      const size_t from = size_t(s) * size_t(row_bytes);
      const size_t bytes = size_t(run) * size_t(row_bytes);
      copied = cuda::CopyToDevice(key_plane + at, keys[h] + from, bytes,
                                  impl_->stream.get());
      if (copied.ok()) {
        copied = cuda::CopyToDevice(value_plane + at, values[h] + from, bytes,
                                    impl_->stream.get());
      }
      s += run;
    }
  }
  if (copied.ok()) copied = impl_->stream.Synchronize();
  if (!copied.ok()) {
    impl_->pool->Give(layer.blocks_).IgnoreError();
    return copied;
  }
  return layer;
}

void DeviceBackend::Release(DeviceLayerRows* rows) {
  if (rows->blocks_.empty()) return;
  impl_->pool->Give(rows->blocks_).IgnoreError();
  if (!rows->ring_blocks_.empty()) {
    impl_->pool->Give(rows->ring_blocks_).IgnoreError();
  }
  *rows = DeviceLayerRows();
}

absl::Status DeviceBackend::Write(int row_bytes,
                                  absl::Span<const DeviceSlotWrite> writes) {
  if (writes.empty()) return absl::OkStatus();
  const size_t n = writes.size(), row = size_t(row_bytes);
  const size_t keys_at = AlignUp(n * 4);
  const size_t values_at = keys_at + AlignUp(n * row);
  MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->Reserve(values_at + n * row));
  char* host = impl_->host.as<char>();
  for (size_t i = 0; i < n; ++i) {
    memcpy(host + 4 * i, &writes[i].device_row, 4);
    memcpy(host + keys_at + i * row, writes[i].key, row);
    memcpy(host + values_at + i * row, writes[i].value, row);
  }
  const cudaStream_t stream = impl_->stream.get();
  KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(impl_->device.get(), host,
                                           values_at + n * row, stream));
  KVMEM_RETURN_IF_ERROR(
      impl_->ScatterStaged(int(n), row_bytes, impl_->device.as<int32_t>(),
                           impl_->device.as<char>() + keys_at,
                           impl_->device.as<char>() + values_at, stream));
  return impl_->stream.Synchronize();
}

absl::Status DeviceBackend::Attend(const DeviceAttendShape& shape,
                                   absl::Span<const DeviceAttendItem> items,
                                   ParallelFor* parallel) {
  if (items.empty()) return absl::OkStatus();
  const int G = shape.group, D = shape.head_dim;
  const size_t elem = size_t(DTypeBytes(shape.dtype));
  const size_t row = size_t(D) * elem;
  const size_t I = items.size();
  // Where each item's rows and host rows go.
  std::vector<size_t> row_at(I), host_at(I);
  size_t R = 0, S = 0;
  int max_rows = 1;
  for (size_t i = 0; i < I; ++i) {
    row_at[i] = R;
    host_at[i] = S;
    R += items[i].rows.size();
    S += size_t(items[i].host_rows);
    max_rows = std::max(max_rows, int(items[i].rows.size()));
  }
  auto each_item = [&](const std::function<void(size_t)>& fn) {
    if (parallel != nullptr) {
      parallel->Run(I, fn);
    } else {
      for (size_t i = 0; i < I; ++i) fn(i);
    }
  };
  MutexLock lock(&impl_->mu);
  // Host rows go to pool rows kept (or taken) for staging.
  Impl::Blocks taken{impl_->pool.get(), {}};
  KVMEM_ASSIGN_OR_RETURN(const Impl::StagingRows staging,
                         impl_->Stage(int64_t(S), int(row), &taken));

  // Staging, one layout both sides: inputs, then outputs.
  const size_t q_at = 0;
  const size_t rows_at = q_at + AlignUp(I * G * D * elem);
  const size_t begin_at = rows_at + AlignUp(R * 4);
  const size_t count_at = begin_at + AlignUp(I * 4);
  const size_t dst_at = count_at + AlignUp(I * 4);
  const size_t keys_at = dst_at + AlignUp(S * 4);
  const size_t values_at = keys_at + AlignUp(S * row);
  // CACHE_RANK: the rows' and queries' positions, then the speeds.
  const bool rotary = shape.inv_freq != nullptr;
  const size_t freq_count = rotary ? shape.inv_freq->size() : 0;
  const size_t positions_at = values_at + AlignUp(S * row);
  const size_t query_positions_at =
      positions_at + (rotary ? AlignUp(R * 4) : 0);
  const size_t freq_at = query_positions_at + (rotary ? AlignUp(I * 4) : 0);
  const size_t inputs_end = freq_at + AlignUp(freq_count * sizeof(double));
  const size_t out_at = inputs_end;
  const size_t lse_at = out_at + AlignUp(I * G * D * 4);
  const size_t probs_at = lse_at + AlignUp(I * G * 4);
  const size_t end = probs_at + AlignUp(R * 4);

  KVMEM_RETURN_IF_ERROR(impl_->Reserve(end));
  char* h = impl_->host.as<char>();
  char* d = impl_->device.as<char>();
  int32_t* rows = reinterpret_cast<int32_t*>(h + rows_at);
  int32_t* begin = reinterpret_cast<int32_t*>(h + begin_at);
  int32_t* count = reinterpret_cast<int32_t*>(h + count_at);
  int32_t* dst = reinterpret_cast<int32_t*>(h + dst_at);
  int32_t* positions = reinterpret_cast<int32_t*>(h + positions_at);
  int32_t* query_positions = reinterpret_cast<int32_t*>(h + query_positions_at);
  if (rotary) {
    memcpy(h + freq_at, shape.inv_freq->data(), freq_count * sizeof(double));
  }
  std::atomic<bool> counts_match{true};  // host_rows as the items said
  each_item([&](size_t i) {
    const DeviceAttendItem& item = items[i];
    if (rotary) {
      if (item.row_positions.size() != item.rows.size()) {
        counts_match = false;
        return;
      }
      std::copy(item.row_positions.begin(), item.row_positions.end(),
                positions + row_at[i]);
      query_positions[i] = item.query_position;
    }
    cpu::StoreFloats(absl::MakeConstSpan(item.queries, size_t(G) * D),
                     shape.dtype, h + q_at + i * G * D * elem);
    begin[i] = int32_t(row_at[i]);
    count[i] = int32_t(item.rows.size());
    size_t r = row_at[i], s = host_at[i];
    for (const DeviceAttendItem::RowRef& ref : item.rows) {
      if (ref.device_row >= 0) {
        rows[r++] = ref.device_row;
        continue;
      }
      if (s >= host_at[i] + size_t(item.host_rows)) {
        counts_match = false;
        return;
      }
      const int32_t at = staging.Row(int64_t(s));
      dst[s] = at;
      memcpy(h + keys_at + s * row, ref.key, row);
      memcpy(h + values_at + s * row, ref.value, row);
      rows[r++] = at;
      ++s;
    }
  });
  if (!counts_match) {
    return absl::InvalidArgumentError(
        "device attention: an item has more host rows than host_rows says, "
        "or (CACHE_RANK) not a position a row");
  }
  const cudaStream_t stream = impl_->stream.get();
  KVMEM_RETURN_IF_ERROR(cuda::CopyToDevice(d, h, inputs_end, stream));
  KVMEM_RETURN_IF_ERROR(impl_->ScatterStaged(
      int(S), int(row), reinterpret_cast<const int32_t*>(d + dst_at),
      d + keys_at, d + values_at, stream));

  cuda::DecodeAttentionShape ds;
  ds.streams = int(I);
  ds.group = G;
  ds.head_dim = D;
  ds.dtype = shape.dtype;
  ds.max_rows_per_stream = max_rows;
  ds.rows_capacity = int64_t(R);
  ds.want_probs = true;
  KVMEM_ASSIGN_OR_RETURN(cuda::DecodeAttentionPlan plan,
                         cuda::PlanDecodeAttentionSplits(ds, kAttentionSplits));
  KVMEM_RETURN_IF_ERROR(impl_->Grow(&impl_->workspace, plan.workspace_bytes));
  cuda::DecodeAttentionInputs in;
  in.queries = d + q_at;
  in.key_rows = impl_->pool->plane_base(0);
  in.value_rows = impl_->pool->plane_base(1);
  in.rows = reinterpret_cast<const int32_t*>(d + rows_at);
  in.row_begin = reinterpret_cast<const int32_t*>(d + begin_at);
  in.row_count = reinterpret_cast<const int32_t*>(d + count_at);
  in.softmax_scale = shape.softmax_scale;
  in.reduction = shape.reduction;
  if (rotary) {
    in.row_positions = reinterpret_cast<const int32_t*>(d + positions_at);
    in.query_positions =
        reinterpret_cast<const int32_t*>(d + query_positions_at);
    in.inv_freq = reinterpret_cast<const double*>(d + freq_at);
    in.rotated_dims = int(2 * freq_count);
    in.pairing = shape.pairing;
  }
  cuda::DecodeAttentionOutputs out;
  out.out_fp32 = reinterpret_cast<float*>(d + out_at);
  out.lse = reinterpret_cast<float*>(d + lse_at);
  out.reduced_probs = reinterpret_cast<float*>(d + probs_at);
  KVMEM_RETURN_IF_ERROR(
      cuda::DecodeAttention(ds, in, out, plan, impl_->workspace.get(),
                            impl_->workspace.bytes(), stream));
  KVMEM_RETURN_IF_ERROR(
      cuda::CopyToHost(h + out_at, d + out_at, end - out_at, stream));
  KVMEM_RETURN_IF_ERROR(impl_->stream.Synchronize());
  each_item([&](size_t i) {
    const DeviceAttendItem& item = items[i];
    memcpy(item.out, h + out_at + i * G * D * 4, size_t(G) * D * 4);
    memcpy(item.lse, h + lse_at + i * G * 4, size_t(G) * 4);
    memcpy(item.probs, h + probs_at + row_at[i] * 4, item.rows.size() * 4);
  });
  return absl::OkStatus();
}

}  // namespace kvmem
