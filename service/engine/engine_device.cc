// The engine on the CUDA backend (device_backend.h): which decode entries
// attend on the device, keeping each layer's device rows, and making room
// in the device pool.
#include <algorithm>
#include <chrono>
#include <map>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/decode_attention.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/engine/live_session.h"

namespace kvmem {

void Engine::ReleaseDevice(LiveSession& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (options_.device == nullptr) return;
  for (DeviceLayerRows& rows : s.device) options_.device->Release(&rows);
}

int Engine::EvictIdleDeviceRows(const std::vector<LiveSession*>& busy,
                                const std::function<bool()>& room) {
  return ForEachIdle(
      busy, room, [&](LiveSession& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        bool held = false;
        for (const DeviceLayerRows& rows : s.device) held |= !rows.empty();
        if (!held) return false;
        ReleaseDevice(s);
        device_evictions_.fetch_add(1, std::memory_order_relaxed);
        return true;
      });
}

absl::Status Engine::AttendOnDevice(
    const std::vector<std::shared_ptr<LiveSession>>& sessions,
    const std::vector<LiveSession*>& busy, const StepRequestView& request,
    const std::vector<bool>& replay, std::vector<std::vector<HeadWork>>& work,
    int64_t* rows_nanos) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const auto rows_start = std::chrono::steady_clock::now();
  DeviceBackend& device = *options_.device;
  const size_t layer = size_t(request.layer);
  // Items of one launch share a shape.
  using ShapeKey = std::tuple<int, int, int, float, int>;
  struct Launch {
    DeviceAttendShape shape;
    std::vector<DeviceAttendItem> items;
    std::vector<HeadWork*> heads;
    int64_t entries = 0;  // decode steps, for device_fallbacks_
  };
  std::map<ShapeKey, Launch> launches;
  struct ItemTask {
    Launch* launch;
    size_t index;  // in launch->items
    size_t entry;
    size_t head;
  };
  std::vector<ItemTask> items;
  for (size_t i = 0; i < sessions.size(); ++i) {
    const StepEntryView& e = request.entries[i];
    LiveSession& s = *sessions[i];
    const StreamConfig& c = s.stream_config;
    // Decode steps the kernel fits; the rest stay on the CPU oracle.
    if (replay[i] || e.num_tokens != 1 || e.q.empty() || c.cache_rank ||
        c.group > cuda::kMaxDecodeGroup ||
        c.head_dim > cuda::kMaxDecodeHeadDim) {
      continue;
    }
    std::vector<StreamState>& streams = s.streams[layer];
    DeviceLayerRows& rows = s.device[layer];
    if (rows.empty()) {
      const int slots = streams[0].cascade().num_slots();
      std::vector<const uint8_t*> keys, values;
      for (const StreamState& stream : streams) {
        keys.push_back(stream.cascade().all_keys().data());
        values.push_back(stream.cascade().all_values().data());
      }
      const int64_t need = int64_t(streams.size()) * slots * c.row_bytes();
      absl::StatusOr<DeviceLayerRows> up =
          device.Upload(c.row_bytes(), slots, keys, values);
      if (up.status().code() == absl::StatusCode::kResourceExhausted) {
        EvictIdleDeviceRows(busy, [&] {
          return device.free_plane_bytes() >= need + (int64_t{1} << 20);
        });
        up = device.Upload(c.row_bytes(), slots, keys, values);
      }
      // No room (or a device error): this entry runs on the CPU oracle,
      // which holds the same state. Counted, not refused.
      if (!up.ok()) {
        device_fallbacks_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      rows = std::move(*up);
    }
    Launch& launch = launches[ShapeKey(c.group, c.head_dim, int(c.dtype),
                                       c.softmax_scale, int(c.reduction))];
    launch.shape = {c.group, c.head_dim, c.dtype, c.softmax_scale, c.reduction};
    ++launch.entries;
    for (size_t h = 0; h < streams.size(); ++h) {
      items.push_back({&launch, launch.items.size(), i, h});
      launch.items.emplace_back();
      launch.heads.push_back(&work[i][h]);
    }
  }
  // Each head's rows, side by side (a merge over its resident slots).
  parallel_->Run(items.size(), [&](size_t t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    const ItemTask& task = items[t];
    LiveSession& s = *sessions[task.entry];
    const StreamConfig& c = s.stream_config;
    const StreamState& stream = s.streams[layer][task.head];
    const DeviceLayerRows& rows = s.device[layer];
    HeadWork& w = work[task.entry][task.head];
    DeviceAttendItem& item = task.launch->items[task.index];
    item.queries = w.queries.data();
    w.external.rows = stream.AttendedRows(w.selection, w.recalled);
    item.rows.reserve(w.external.rows.size() + 1);
    for (const AttendedRow& a : w.external.rows) {
      DeviceAttendItem::RowRef ref;
      if (a.slot >= 0) {
        ref.device_row = rows.Row(int(task.head), a.slot);
      } else {
        ref.key = stream.AttendedKey(a, w.recalled);
        ref.value = stream.AttendedValue(a, w.recalled);
        ++item.host_rows;
      }
      item.rows.push_back(ref);
    }
    DeviceAttendItem::RowRef fresh;  // the step's own token, last
    fresh.key = reinterpret_cast<const uint8_t*>(w.keys.data());
    fresh.value = reinterpret_cast<const uint8_t*>(w.values.data());
    item.rows.push_back(fresh);
    ++item.host_rows;
    w.external.out.assign(size_t(c.group) * c.head_dim, 0.0f);
    w.external.lse.assign(size_t(c.group), 0.0f);
    w.external.probs.assign(item.rows.size(), 0.0f);
    item.out = w.external.out.data();
    item.lse = w.external.lse.data();
    item.probs = w.external.probs.data();
  });
  *rows_nanos = std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now() - rows_start)
                    .count();
  for (auto& [key, launch] : launches) {
    absl::Status st =
        device.Attend(launch.shape, launch.items, parallel_.get());
    if (st.code() == absl::StatusCode::kResourceExhausted) {
      // Staging for spilled rows found no free block.
      EvictIdleDeviceRows(busy, [&] {
        return device.free_plane_bytes() >= (int64_t{64} << 20);
      });
      st = device.Attend(launch.shape, launch.items, parallel_.get());
    }
    if (!st.ok()) {
      // Counted in decode steps, as for an upload that found no room.
      device_fallbacks_.fetch_add(launch.entries, std::memory_order_relaxed);
      continue;  // the CPU oracle computes these heads
    }
    for (HeadWork* w : launch.heads) w->on_device = true;
  }
  return absl::OkStatus();
}

}  // namespace kvmem
