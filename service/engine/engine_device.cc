// The engine on the CUDA backend (device_backend.h): which decode entries
// attend on the device, keeping each layer's device rows, and making room
// in the device pool.
#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <tuple>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/decode_policy.h"
#include "kernels/cuda/select_pages.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/engine/live_session.h"

namespace kvmem {

namespace {

// Whether two sessions' decode steps share one DecodeOwned launch: the
// fields of the launch key in StepOwned.
bool SameLaunchShape(const StreamConfig& a, const StreamConfig& b) {
  return a.cascade.sinks == b.cascade.sinks &&
         a.cascade.cascades == b.cascade.cascades &&
         a.cascade.window == b.cascade.window &&
         a.cascade.eager_fill == b.cascade.eager_fill &&
         a.cascade.beta == b.cascade.beta && a.page_tokens == b.page_tokens &&
         a.recent_tokens == b.recent_tokens &&
         a.budget_tokens == b.budget_tokens && a.group == b.group &&
         a.head_dim == b.head_dim && a.dtype == b.dtype &&
         a.softmax_scale == b.softmax_scale && a.reduction == b.reduction;
}

// A device-owned entry that steps through PrefillOwned, not DecodeOwned:
// a chunk, or a step without queries.
bool OwnedAsChunk(const StepEntryView& e) {
  return e.num_tokens > 1 || e.q.empty();
}

DevicePolicyShape PolicyShapeOf(const StreamConfig& c) {
  DevicePolicyShape shape;
  shape.cascade = c.cascade;
  shape.page_tokens = c.page_tokens;
  shape.recent_tokens = c.recent_tokens;
  shape.budget_tokens = c.budget_tokens;
  shape.group = c.group;
  shape.head_dim = c.head_dim;
  shape.dtype = c.dtype;
  shape.softmax_scale = c.softmax_scale;
  shape.reduction = c.reduction;
  return shape;
}

// A cascade's policy state without its rows (the device holds those).
CascadeStream::Snapshot StateOf(const CascadeStream& c) {
  CascadeStream::Snapshot state;
  state.tokens_seen = c.tokens_seen();
  state.score_exponent = c.score_exponent();
  state.positions.resize(static_cast<size_t>(c.num_slots()));
  state.scores.resize(static_cast<size_t>(c.num_slots()));
  for (int s = 0; s < c.num_slots(); ++s) {
    state.positions[size_t(s)] = c.slot_position(s);
    state.scores[size_t(s)] = c.slot_score(s);
  }
  for (int i = 0; i < c.params().cascades; ++i) {
    state.stored.push_back(c.stored(i));
    state.head.push_back(c.head(i));
  }
  return state;
}

// The session's steps are refused from now on: its host copy of a layer
// is stale and the device's is gone. A restart recovers it from storage.
void MarkFailed(Engine::LiveSession& s, const absl::Status& why) {
  MutexLock lock(&s.durable_mu);
  if (s.write_error.ok()) {
    s.write_error = absl::UnavailableError(
        absl::StrCat("the device lost a layer's state (", why.message(), ")"));
  }
}

}  // namespace

void Engine::ReleaseDevice(LiveSession& s,
                           bool host_current) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (options_.device == nullptr) return;
  // A failure marks the session failed; the rows go either way.
  if (!host_current) SyncToHost(s, /*drop=*/true).IgnoreError();
  for (DeviceLayerRows& rows : s.device) options_.device->Release(&rows);
}

absl::Status Engine::SyncToHost(LiveSession& s,
                                bool drop) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (options_.device == nullptr) return absl::OkStatus();
  for (size_t layer = 0; layer < s.device.size(); ++layer) {
    KVMEM_RETURN_IF_ERROR(SyncLayerToHost(s, layer, drop));
  }
  return absl::OkStatus();
}

absl::Status Engine::SyncLayerToHost(LiveSession& s, size_t layer,
                                     bool drop) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (options_.device == nullptr || layer >= s.device.size() ||
      !s.device[layer].owned()) {
    return absl::OkStatus();
  }
  DeviceBackend& device = *options_.device;
  DeviceLayerRows& rows = s.device[layer];
  std::vector<StreamState>& streams = s.streams[layer];
  absl::StatusOr<std::vector<CascadeStream::Snapshot>> snapshots =
      device.ReadPolicy(PolicyShapeOf(s.stream_config), rows);
  absl::Status st = snapshots.status();
  if (st.ok() && snapshots->size() != streams.size()) {
    st = absl::InternalError(absl::StrCat(snapshots->size(), " heads read, ",
                                          streams.size(), " expected"));
  }
  for (size_t h = 0; st.ok() && h < streams.size(); ++h) {
    st = streams[h].AdoptCascade(std::move((*snapshots)[h]));
  }
  if (!st.ok()) {
    device.Release(&rows);
    MarkFailed(s, st);
    return absl::UnavailableError(
        absl::StrCat("layer ", layer,
                     "'s state could not be read back from "
                     "the device (",
                     st.message(), "); the session recovers on a restart"));
  }
  if (drop) device.DropPolicy(&rows);
  return absl::OkStatus();
}

bool Engine::UploadLayer(LiveSession& s, size_t layer,
                         const std::vector<LiveSession*>& busy)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  DeviceBackend& device = *options_.device;
  DeviceLayerRows& rows = s.device[layer];
  if (!rows.empty()) return true;
  const StreamConfig& c = s.stream_config;
  const std::vector<StreamState>& streams = s.streams[layer];
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
    return false;
  }
  rows = std::move(*up);
  return true;
}

bool Engine::TakeLayer(LiveSession& s, size_t layer, StepMode mode,
                       const StepEntryView& e, size_t entries,
                       const std::vector<LiveSession*>& busy)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const StreamConfig& c = s.stream_config;
  const std::vector<StreamState>& streams = s.streams[layer];
  // What the device policy does, for ABSOLUTE layers within the kernels'
  // bounds (selection.md):
  // - decode steps with a query (DecodeOwned) of sparse layers: ATTEND,
  //   FETCH, and APPEND (which attends for the scores and answers nothing);
  // - chunks (PrefillOwned), T ≤ W, of sparse and dense layers alike (a
  //   chunk selects the same either way): ATTEND or APPEND with queries
  //   and T > 1 (dense over the resident tokens, causal, nothing recalled)
  //   in D 128, bf16 or fp16, G 1, 2, 4 or 8; APPEND without queries, any
  //   T. A dense layer's state comes back at its first decode step.
  // The rest stays on the host path (its attention on the device where
  // AttendOnDevice can).
  if (mode == StepMode::kFetch && c.budget_tokens > cuda::kMaxSortRows) {
    return false;
  }
  if (OwnedAsChunk(e)) {
    if (mode == StepMode::kFetch || e.num_tokens > c.cascade.window) {
      return false;
    }
    if (!e.q.empty() &&
        (c.head_dim != cuda::kChunkHeadDim || c.dtype == DType::kFp32 ||
         c.group > cuda::kMaxChunkGroup || (c.group & (c.group - 1)) != 0)) {
      return false;
    }
  }
  if (e.num_tokens < 1 || c.cache_rank ||
      (s.dense[layer] && !OwnedAsChunk(e)) || c.group > cuda::kMaxPolicyGroup ||
      c.head_dim > cuda::kMaxPolicyHeadDim ||
      c.page_tokens > cuda::kMaxPolicyPageTokens ||
      c.cascade.window % c.page_tokens != 0) {
    return false;
  }
  const int64_t slots = streams[0].cascade().num_slots();
  if (slots * int64_t(streams.size()) * int64_t(entries) >=
      cuda::kSpilledIdBase) {
    return false;
  }
  const int resident_pages =
      c.cascade.cascades * (c.cascade.window / c.page_tokens);
  for (const StreamState& stream : streams) {
    const int64_t spilled =
        c.recall ? int64_t(stream.sealed_pages().size()) + 1 : 0;
    if (resident_pages + spilled > cuda::kMaxSelectCandidates) return false;
  }
  if (!UploadLayer(s, layer, busy)) return false;
  DeviceLayerRows& rows = s.device[layer];
  if (rows.owned()) return true;
  std::vector<CascadeStream::Snapshot> snapshots;
  std::vector<const CascadeStream::Snapshot*> heads;
  std::vector<absl::Span<const float>> digests;
  snapshots.reserve(streams.size());
  for (const StreamState& stream : streams) {
    snapshots.push_back(StateOf(stream.cascade()));
    digests.push_back(stream.resident_digests());
  }
  for (const CascadeStream::Snapshot& snapshot : snapshots) {
    heads.push_back(&snapshot);
  }
  // No device memory for the state: the host path takes the step (its
  // attention still on the device), and the next step tries again.
  return options_.device
      ->TakePolicy(PolicyShapeOf(c), heads, digests, &rows,
                   /*spill_ring=*/c.recall && !s.dense[layer])
      .ok();
}

absl::Status Engine::FailOwnedSteps(
    const std::vector<std::shared_ptr<LiveSession>>& sessions, size_t layer,
    const std::set<size_t>& entries,
    const absl::Status& cause) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  for (size_t i : entries) {
    LiveSession& s = *sessions[i];
    options_.device->Release(&s.device[layer]);
    MarkFailed(s, cause);
  }
  return absl::UnavailableError(
      absl::StrCat("device: a step failed after the device state of ",
                   entries.size(), " entries had changed (", cause.message(),
                   "); their sessions recover on a restart"));
}

absl::Status Engine::StepOwnedChunks(
    const std::vector<std::shared_ptr<LiveSession>>& sessions,
    const StepRequestView& request, const std::vector<bool>& owned,
    std::vector<HeadsApplied>& done,
    std::set<size_t>* stepped) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const size_t layer = size_t(request.layer);
  // Entries of one launch share a config shape and a chunk length.
  struct Launch {
    DevicePolicyShape shape;
    int tokens = 0;
    std::vector<DevicePrefillItem> items;
    std::vector<size_t> at;  // entry of each item
  };
  std::map<std::string, Launch> launches;
  for (size_t i = 0; i < sessions.size(); ++i) {
    const StepEntryView& e = request.entries[i];
    if (!owned[i] || !OwnedAsChunk(e)) continue;
    LiveSession& s = *sessions[i];
    const StreamConfig& c = s.stream_config;
    const bool attend = !e.q.empty();
    const std::string key = absl::StrCat(
        e.num_tokens, "/", attend, "/", c.cascade.sinks, "/",
        c.cascade.cascades, "/", c.cascade.window, "/", c.cascade.eager_fill,
        "/", c.cascade.beta, "/", c.page_tokens, "/", c.group, "/", c.head_dim,
        "/", int(c.dtype), "/", c.softmax_scale, "/", int(c.reduction));
    Launch& launch = launches[key];
    launch.shape = PolicyShapeOf(c);
    launch.tokens = e.num_tokens;
    DevicePrefillItem item;
    item.layer = &s.device[layer];
    item.queries =
        attend ? reinterpret_cast<const uint8_t*>(e.q.data()) : nullptr;
    item.keys = reinterpret_cast<const uint8_t*>(e.k.data());
    item.values = reinterpret_cast<const uint8_t*>(e.v.data());
    if (c.recall) {  // for the spill rings
      for (const StreamState& stream : s.streams[layer]) {
        item.spilled.push_back(stream.spilled_tokens());
      }
    }
    for (StreamStepOutput& output : done[i].outputs) {
      if (request.mode != StepMode::kAttend) break;  // APPEND answers none
      output.out.assign(size_t(e.num_tokens) * c.group * c.head_dim, 0.0f);
      output.lse.assign(size_t(e.num_tokens) * c.group, 0.0f);
      item.out.push_back(output.out.data());
      item.lse.push_back(output.lse.data());
    }
    launch.items.push_back(std::move(item));
    launch.at.push_back(i);
  }
  for (auto& keyed : launches) {
    Launch& launch = keyed.second;
    bool touched = false;
    const absl::Status st = options_.device->PrefillOwned(
        launch.shape, launch.tokens, absl::MakeSpan(launch.items), &touched);
    if (touched) stepped->insert(launch.at.begin(), launch.at.end());
    if (!st.ok()) {
      // Entries stepped already (this launch's, if touched, and earlier
      // ones') cannot be undone; the rest of the request is refused.
      return stepped->empty() ? st
                              : FailOwnedSteps(sessions, layer, *stepped, st);
    }
    device_policy_steps_.fetch_add(int64_t(launch.items.size()),
                                   std::memory_order_relaxed);
    // The tokens the chunk evicted go to the host's spilled pages, in
    // order, as the host path spills them.
    const size_t row =
        size_t(launch.shape.head_dim) * size_t(DTypeBytes(launch.shape.dtype));
    for (size_t t = 0; t < launch.items.size(); ++t) {
      const size_t i = launch.at[t];
      DevicePrefillItem& item = launch.items[t];
      std::vector<StreamState>& streams = sessions[i]->streams[layer];
      for (size_t h = 0; h < item.evicted.size(); ++h) {
        const DevicePrefillItem::Evicted& e = item.evicted[h];
        for (size_t j = 0; j < e.positions.size(); ++j) {
          streams[h].SpillEvicted(
              e.positions[j], absl::string_view(e.keys).substr(j * row, row),
              absl::string_view(e.values).substr(j * row, row),
              &done[i].outputs[h]);
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::StepOwned(
    const std::vector<std::shared_ptr<LiveSession>>& sessions,
    const std::vector<LiveSession*>& busy, const StepRequestView& request,
    const std::vector<bool>& owned, std::vector<HeadsApplied>& done,
    std::vector<StepEntryResult>& results,
    OwnedStepNanos* nanos) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  *nanos = OwnedStepNanos();
  const size_t layer = size_t(request.layer);
  // Streams of one launch share a config shape.
  struct Launch {
    DevicePolicyShape shape;
    std::vector<DevicePolicyItem> items;
    std::vector<std::pair<size_t, size_t>> at;  // (entry, head) per item
    int64_t entries = 0;                        // decode steps
  };
  std::map<std::string, Launch> launches;
  // Entries whose device state has changed in this request: if a later
  // launch fails, they are stepped on the device but will not be logged.
  std::set<size_t> stepped;
  KVMEM_RETURN_IF_ERROR(
      StepOwnedChunks(sessions, request, owned, done, &stepped));
  // Entries usually share one config: the previous entry's launch is
  // reused without building its key. (This loop took 281 µs for 32
  // entries × 8 heads, 190–234 µs after; what is left is per head.)
  const StreamConfig* last_config = nullptr;
  Launch* last_launch = nullptr;
  for (size_t i = 0; i < sessions.size(); ++i) {
    if (!owned[i] || OwnedAsChunk(request.entries[i])) continue;
    LiveSession& s = *sessions[i];
    const StreamConfig& c = s.stream_config;
    const StepEntryView& e = request.entries[i];
    if (last_launch == nullptr || !SameLaunchShape(*last_config, c)) {
      // Exact bits for beta and the scale: StrCat prints 6 digits, which
      // would put betas such as 0.9999999 and 0.99999991 in one launch.
      const std::string key = absl::StrCat(
          c.cascade.sinks, "/", c.cascade.cascades, "/", c.cascade.window, "/",
          c.cascade.eager_fill, "/", absl::bit_cast<uint64_t>(c.cascade.beta),
          "/", c.page_tokens, "/", c.recent_tokens, "/", c.budget_tokens, "/",
          c.group, "/", c.head_dim, "/", int(c.dtype), "/",
          absl::bit_cast<uint32_t>(c.softmax_scale), "/", int(c.reduction));
      last_launch = &launches[key];
      last_launch->shape = PolicyShapeOf(c);
      last_launch->shape.fetch = request.mode == StepMode::kFetch;
      last_launch->items.reserve(sessions.size() * s.streams[layer].size());
      last_config = &c;
    }
    Launch& launch = *last_launch;
    ++launch.entries;
    const size_t elem = size_t(DTypeBytes(c.dtype));
    const size_t q_head = size_t(c.group) * c.head_dim * elem;
    const size_t kv_head = size_t(c.head_dim) * elem;
    std::vector<StreamState>& streams = s.streams[layer];
    // ATTEND: the device writes each head's [G, D] rows in the dtype, and
    // its [G] LSEs, at their places in the reply ([1, Hq, D], [1, Hq]).
    uint8_t* reply_out = nullptr;
    uint8_t* reply_lse = nullptr;
    if (request.mode == StepMode::kAttend) {
      StepEntryResult& result = results[i];
      result.output.resize(streams.size() * q_head);
      result.lse.resize(streams.size() * size_t(c.group) * sizeof(float));
      reply_out = reinterpret_cast<uint8_t*>(result.output.data());
      reply_lse = reinterpret_cast<uint8_t*>(result.lse.data());
      done[i].outputs_in_reply = true;
    }
    for (size_t h = 0; h < streams.size(); ++h) {
      const StreamState& stream = streams[h];
      // Built in place: an item is a few hundred bytes of vectors and
      // strings, 256 of them at batch 32.
      DevicePolicyItem& item = launch.items.emplace_back();
      item.layer = &s.device[layer];
      item.head = int(h);
      item.query = reinterpret_cast<const uint8_t*>(e.q.data()) + h * q_head;
      item.key = reinterpret_cast<const uint8_t*>(e.k.data()) + h * kv_head;
      item.value = reinterpret_cast<const uint8_t*>(e.v.data()) + h * kv_head;
      item.position = e.position;
      if (c.recall) {
        // Only the pages the device does not hold yet (usually none).
        const std::vector<SealedPageRef>& sealed = stream.sealed_pages();
        item.sealed_pages = int(sealed.size());
        item.sealed_from =
            std::min(item.sealed_pages, item.layer->sealed_on_device(int(h)));
        for (size_t p = size_t(item.sealed_from); p < sealed.size(); ++p) {
          item.sealed_digests.push_back(sealed[p].digest.data());
        }
        const storage::SpillPage& open = stream.open_page();
        if (!open.positions.empty()) {
          item.open_digest = open.digest.data();
          item.open_tokens = int(open.positions.size());
        }
      }
      if (launch.shape.fetch) item.fetched = &done[i].outputs[h].fetched;
      if (reply_out != nullptr) {
        item.out = reply_out + h * q_head;
        item.lse = reply_lse + h * size_t(c.group) * sizeof(float);
      }
      launch.at.emplace_back(i, h);
    }
  }
  for (auto& keyed : launches) {
    Launch& launch = keyed.second;
    // Pages the selection took from storage, held until the launch ends.
    std::vector<HeadWork> reads(launch.items.size());
    auto recall = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::Status {
      const auto start = std::chrono::steady_clock::now();
      struct Clock {
        std::chrono::steady_clock::time_point start;
        int64_t* total;
        ~Clock() {
          *total += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
        }
      } clock{start, &nanos->recall};
      std::vector<absl::Status> recalled(launch.items.size());
      auto recall_item = [&](size_t t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        DevicePolicyItem& item = launch.items[t];
        const auto [i, h] = launch.at[t];
        LiveSession& s = *sessions[i];
        const StreamState& stream = s.streams[layer][h];
        const std::vector<SealedPageRef>& sealed = stream.sealed_pages();
        HeadWork& w = reads[t];
        w.selection.recall.clear();  // a retried launch recalls anew
        std::vector<size_t> wanted;  // spilled candidate of each read
        for (size_t j = 0; j < item.spilled_taken.size(); ++j) {
          if (!item.spilled_taken[j]) continue;
          if (j < sealed.size()) {
            w.selection.recall.push_back(sealed[j].page_seq);
            wanted.push_back(j);
          } else {  // the open page, in memory
            item.spilled_keys[j] = reinterpret_cast<const uint8_t*>(
                stream.open_page().keys.data());
            item.spilled_values[j] = reinterpret_cast<const uint8_t*>(
                stream.open_page().values.data());
            item.spilled_positions[j] = stream.open_page().positions.data();
          }
        }
        if (wanted.empty()) return;
        absl::Status loaded =
            LoadRecalled(s.manifest.seq, int(layer), int(h), &w);
        if (!loaded.ok()) {
          recalled[t] = absl::Status(
              loaded.code(),
              absl::StrCat("entries[", i, "].session_id: recall of KV head ", h,
                           ": ", loaded.message()));
          return;
        }
        for (size_t r = 0; r < wanted.size(); ++r) {
          const storage::SpillPage& page = *w.recalled[r];
          item.spilled_keys[wanted[r]] =
              reinterpret_cast<const uint8_t*>(page.keys.data());
          item.spilled_values[wanted[r]] =
              reinterpret_cast<const uint8_t*>(page.values.data());
          item.spilled_positions[wanted[r]] = page.positions.data();
        }
      };
      // Each item's pages are its own: side by side when there are many
      // (a page from storage is a read, a decompression and a checksum;
      // at batch 32 a step took ~40 pages a head, 560 µs one by one).
      size_t taken = 0;
      for (const DevicePolicyItem& item : launch.items) {
        for (uint8_t t : item.spilled_taken) taken += t;
      }
      parallel_->Run(launch.items.size(), recall_item,
                     taken >= size_t(kParallelRecallPages));
      for (const absl::Status& st : recalled) KVMEM_RETURN_IF_ERROR(st);
      return absl::OkStatus();
    };
    bool touched = false;
    absl::Status st = options_.device->DecodeOwned(
        launch.shape, absl::MakeSpan(launch.items), recall, &touched,
        parallel_.get(), &nanos->wait);
    if (st.code() == absl::StatusCode::kResourceExhausted && !touched) {
      // Staging found no free block: idle sessions' rows make room.
      EvictIdleDeviceRows(busy, [&] {
        return options_.device->free_plane_bytes() >= (int64_t{64} << 20);
      });
      st = options_.device->DecodeOwned(
          launch.shape, absl::MakeSpan(launch.items), recall, &touched,
          parallel_.get(), &nanos->wait);
    }
    if (touched) {
      for (const auto& [i, h] : launch.at) stepped.insert(i);
    }
    if (!st.ok()) {
      // Half-stepped on the device and stale on the host (this launch, if
      // touched), or stepped by an earlier launch of the request: those
      // sessions recover from storage. Otherwise nothing changed.
      return stepped.empty() ? st
                             : FailOwnedSteps(sessions, layer, stepped, st);
    }
    device_policy_steps_.fetch_add(launch.entries, std::memory_order_relaxed);
    // The tokens the device evicted go to the host's spilled pages (a
    // row copy each, and a digest fold: side by side for many of them).
    const auto spill_start = std::chrono::steady_clock::now();
    std::vector<size_t> evicted;
    for (size_t t = 0; t < launch.items.size(); ++t) {
      if (launch.items[t].evicted_position >= 0) evicted.push_back(t);
    }
    auto spill = [&](size_t e) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      const DevicePolicyItem& item = launch.items[evicted[e]];
      const auto [i, h] = launch.at[evicted[e]];
      sessions[i]->streams[layer][h].SpillEvicted(
          item.evicted_position, item.evicted_key, item.evicted_value,
          &done[i].outputs[h]);
    };
    parallel_->Run(evicted.size(), spill,
                   evicted.size() >= size_t(kParallelDeviceSpills));
    nanos->spill += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - spill_start)
                        .count();
  }
  return absl::OkStatus();
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
    const std::vector<bool>& skip, std::vector<std::vector<HeadWork>>& work,
    int64_t* rows_nanos) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const auto rows_start = std::chrono::steady_clock::now();
  DeviceBackend& device = *options_.device;
  const size_t layer = size_t(request.layer);
  // Items of one launch share a shape (CACHE_RANK: and rotary speeds, by
  // value, so that sessions of one model share a launch).
  using ShapeKey =
      std::tuple<int, int, int, float, int, std::vector<double>, int>;
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
    if (skip[i] || e.num_tokens != 1 || e.q.empty() ||
        c.group > cuda::kMaxDecodeGroup ||
        c.head_dim > cuda::kMaxDecodeHeadDim ||
        (c.cache_rank &&
         !cuda::DecodeAttentionRotarySupported(
             c.head_dim, c.dtype, 2 * int(c.inv_freq.size()), c.pairing))) {
      continue;
    }
    std::vector<StreamState>& streams = s.streams[layer];
    if (!UploadLayer(s, layer, busy)) continue;
    const std::vector<double>* inv_freq = c.cache_rank ? &c.inv_freq : nullptr;
    Launch& launch = launches[ShapeKey(
        c.group, c.head_dim, int(c.dtype), c.softmax_scale, int(c.reduction),
        c.cache_rank ? c.inv_freq : std::vector<double>(),
        c.cache_rank ? int(c.pairing) : 0)];
    launch.shape = {c.group,     c.head_dim, c.dtype,  c.softmax_scale,
                    c.reduction, inv_freq,   c.pairing};
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
    if (c.cache_rank) {
      // Ranks below the stream's token count, far below 2^31.
      int64_t query_base = 0;
      const std::vector<int64_t> ranks =
          stream.RotaryPositions(w.external.rows, &query_base);
      item.row_positions.assign(ranks.begin(), ranks.end());
      item.row_positions.push_back(int32_t(query_base));  // the new token
      item.query_position = int32_t(query_base);
    }
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
    device_attend_steps_.fetch_add(launch.entries, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

}  // namespace kvmem
