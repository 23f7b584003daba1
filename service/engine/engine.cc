#include "service/engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <future>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/parallel_for.h"
#include "base/status_macros.h"
#include "kernels/cpu/dtype.h"
#include "service/engine/device_backend.h"
#include "service/engine/live_session.h"
#include "service/engine/step_log.h"
#include "storage/checksum.h"

namespace kvmem {
namespace {

// FETCH replies larger than this are not kept for retries (a decode FETCH
// of B = 2048 tokens of 8 heads × 128 × bf16 is 8 MiB per layer).
constexpr size_t kMaxKeptReplyBytes = size_t{1} << 20;

// Bytes an apply pass copies (about twice its entries' q, k and v: the log
// record, the kept reply, the outputs) from which it runs on the workers.
// Waking them costs 20–50 µs; a decode entry of 32 × 8 heads × 128 bf16
// is ~3 µs of copies. At 8 such entries side by side `apply` read 66–124
// µs on the GPU machine (bench/results/loopback.md § Thirteenth session).
constexpr size_t kParallelApplyBytes = size_t{512} << 10;

size_t ReplyBytes(const StepEntryResult& r) {
  size_t bytes = r.output.size() + r.lse.size();
  for (const FetchedHead& h : r.heads) {
    bytes += h.k.size() + h.v.size() + 8 * h.positions.size();
  }
  return bytes;
}

// Stable across restarts (kept replies are checkpointed): the CRC-32C of
// q, k and v each, folded with their lengths.
uint64_t Fingerprint(const StepEntryView& e) {
  uint64_t f = 0;
  for (absl::string_view t : {e.q, e.k, e.v}) {
    f = (f * 0x100000001b3ull) ^
        ((uint64_t(storage::Crc32c(t)) << 32) | uint32_t(t.size()));
  }
  return f;
}

// "entries[i].field".
std::string Field(size_t i, const char* field) {
  return absl::StrCat("entries[", i, "].", field);
}

// `status` with `prefix: ` before its message.
absl::Status Annotate(const absl::Status& status, const std::string& prefix) {
  return absl::Status(status.code(),
                      absl::StrCat(prefix, ": ", status.message()));
}

int64_t MonotonicNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int StepThreads(const Engine::Options& options) {
  if (options.step_threads >= 0) return options.step_threads;
  const int cores = int(std::thread::hardware_concurrency());
  return std::clamp(cores - 1, 0, 15);
}

}  // namespace

std::vector<HeadWork> SplitHeads(const ModelShape& shape, int T,
                                 absl::string_view q, absl::string_view k,
                                 absl::string_view v) {
  const int H = shape.kv_heads, Hq = shape.query_heads, D = shape.head_dim;
  const int G = Hq / H;
  const size_t row = size_t(D) * DTypeBytes(shape.dtype);
  std::vector<float> q_all(q.empty() ? 0 : size_t(T) * Hq * D);
  if (!q.empty()) cpu::LoadFloats(q.data(), shape.dtype, absl::MakeSpan(q_all));
  std::vector<HeadWork> heads(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) {
    HeadWork& w = heads[size_t(h)];
    if (!q_all.empty()) w.queries.resize(size_t(T) * G * D);
    w.keys.resize(T * row);
    w.values.resize(T * row);
    for (int t = 0; t < T; ++t) {
      if (!q_all.empty()) {
        std::copy_n(&q_all[(size_t(t) * Hq + size_t(h) * G) * D], size_t(G) * D,
                    &w.queries[size_t(t) * G * D]);
      }
      memcpy(&w.keys[t * row], k.data() + (size_t(t) * H + h) * row, row);
      memcpy(&w.values[t * row], v.data() + (size_t(t) * H + h) * row, row);
    }
  }
  return heads;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Open(const Options& options,
                                                     storage::Store* store) {
  int64_t limit = options.memory_limit_bytes;
  if (limit < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_limit_bytes must be >= 0 (0: 60% of RAM), got ", limit));
  }
  if (options.wal_sync_ms < 1 || options.max_log_bytes < (int64_t{1} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "wal_sync_ms must be >= 1 and max_log_bytes >= 1 MiB, got ",
        options.wal_sync_ms, " and ", options.max_log_bytes));
  }
  if (limit == 0) {
    limit = int64_t(0.6 * double(sysconf(_SC_PHYS_PAGES)) *
                    double(sysconf(_SC_PAGESIZE)));
  }
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<SessionRegistry> registry,
                         SessionRegistry::Open(options.registry, store));
  std::unique_ptr<Engine> engine(
      new Engine(options, store, std::move(registry), limit));
  storage::SpillWriter::Options writer;
  writer.max_queued_bytes = options.spill_queue_bytes;
  KVMEM_ASSIGN_OR_RETURN(engine->writer_,
                         storage::SpillWriter::Start(writer, store));
  engine->sync_thread_ = std::thread([e = engine.get()] { e->SyncLoop(); });
  return engine;
}

Engine::Engine(const Options& options, storage::Store* store,
               std::unique_ptr<SessionRegistry> registry,
               int64_t memory_limit_bytes)
    : options_(options),
      store_(store),
      registry_(std::move(registry)),
      page_cache_(
          std::make_unique<storage::PageCache>(options.page_cache_bytes)),
      parallel_(std::make_unique<ParallelFor>(
          StepThreads(options),
          options.step_spin_us >= 0
              ? std::chrono::microseconds(options.step_spin_us)
              : ParallelFor::DefaultSpin())),
      memory_limit_bytes_(memory_limit_bytes) {}

Engine::~Engine() {
  {
    MutexLock lock(&sync_mu_);
    stopping_ = true;
  }
  sync_wake_.notify_all();
  if (sync_thread_.joinable()) sync_thread_.join();
  writer_.reset();  // drains what is queued
}

absl::Status Engine::MakeStreams(LiveSession& s, int layer,
                                 const std::string& field)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  std::vector<StreamState>& streams = s.streams[size_t(layer)];
  const int H = s.config().shape.kv_heads;
  for (int h = 0; h < H; ++h) {
    absl::StatusOr<StreamState> stream = StreamState::Create(&s.stream_config);
    if (!stream.ok()) {
      streams.clear();
      return absl::InternalError(absl::StrCat(
          field, ": cannot make its streams: ", stream.status().message()));
    }
    streams.push_back(std::move(*stream));
  }
  // The streams exist from now on, whatever becomes of the request.
  const int64_t made = int64_t{H} * StreamState::FixedBytes(s.stream_config);
  s.memory_bytes += made;
  memory_bytes_.fetch_add(made);
  return absl::OkStatus();
}

absl::Status Engine::LoadRecalled(uint64_t seq, int layer, int head,
                                  HeadWork* work) {
  const std::vector<uint64_t>& wanted = work->selection.recall;
  work->recalled.assign(wanted.size(), nullptr);
  std::vector<uint64_t> missing;
  std::vector<size_t> missing_at;
  for (size_t i = 0; i < wanted.size(); ++i) {
    const storage::PageId id{seq, uint32_t(layer), uint32_t(head), wanted[i]};
    // Still queued for the writer (read-your-writes), else cached.
    std::shared_ptr<const storage::SpillPage> page = writer_->Lookup(id);
    if (page == nullptr) page = page_cache_->Lookup(id);
    if (page == nullptr) {
      missing.push_back(wanted[i]);
      missing_at.push_back(i);
    }
    work->recalled[i] = std::move(page);
  }
  if (missing.empty()) return absl::OkStatus();
  KVMEM_ASSIGN_OR_RETURN(
      std::vector<storage::SpillPage> pages,
      store_->ReadPages(seq, uint32_t(layer), uint32_t(head), missing));
  for (size_t j = 0; j < pages.size(); ++j) {
    auto page = std::make_shared<const storage::SpillPage>(std::move(pages[j]));
    page_cache_->Insert(
        storage::PageId{seq, uint32_t(layer), uint32_t(head), missing[j]},
        page);
    work->recalled[missing_at[j]] = std::move(page);
  }
  return absl::OkStatus();
}

void Engine::PrepareHeads(LiveSession& s, int layer,
                          HeadsApplied* done) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const std::vector<StreamState>& streams = s.streams[size_t(layer)];
  done->outputs.assign(streams.size(), StreamStepOutput());
  done->status.assign(streams.size(), absl::OkStatus());
  done->bytes_before = 0;
  for (const StreamState& stream : streams) {
    done->bytes_before += stream.memory_bytes();
  }
}

void Engine::ApplyHead(LiveSession& s, int layer, StepMode mode,
                       int64_t position, int T, HeadWork& w, HeadsApplied* done,
                       size_t h) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  done->status[h] = s.streams[size_t(layer)][h].Apply(
      mode, w.Input(position, T), w.selection, w.recalled, &done->outputs[h],
      w.on_device ? &w.external : nullptr);
}

absl::Status Engine::ApplyEntry(
    LiveSession& s, int layer, StepMode mode, int64_t position, int T,
    std::vector<HeadWork>& work, StepEntryResult* result,
    storage::SpillBatch* batch, DeviceWrites* device_writes,
    HeadsApplied* done) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const ModelShape& shape = s.config().shape;
  const int H = shape.kv_heads, Hq = shape.query_heads;
  const int D = shape.head_dim, G = Hq / H;
  std::vector<StreamState>& streams = s.streams[size_t(layer)];
  // ATTEND: each head's rows go straight to their places in the reply,
  // [T, Hq, D] in the session dtype and [T, Hq] fp32.
  const size_t elem = DTypeBytes(shape.dtype);
  if (mode == StepMode::kAttend) {
    result->output.resize(size_t(T) * Hq * D * elem);
    result->lse.resize(size_t(T) * Hq * sizeof(float));
  }
  HeadsApplied own;
  if (done == nullptr) {
    // The heads' policy steps side by side (each touches its own stream).
    done = &own;
    PrepareHeads(s, layer, done);
    parallel_->Run(size_t(H), [&](size_t h) {
      ApplyHead(s, layer, mode, position, T, work[h], done, h);
    });
  }
  std::vector<StreamStepOutput>& outputs = done->outputs;
  const int64_t bytes_before = done->bytes_before;
  int64_t bytes_after = 0;
  for (int h = 0; h < H; ++h) {
    StreamStepOutput& output = outputs[size_t(h)];
    const absl::Status& st = done->status[size_t(h)];
    if (!st.ok()) {
      return absl::InternalError(absl::StrCat(
          "step of KV head ", h, " failed after validation: ", st.message()));
    }
    // The device copy of the layer follows the slots that changed.
    const DeviceLayerRows& rows = s.device[size_t(layer)];
    if (device_writes != nullptr && !rows.empty() &&
        !output.changed_slots.empty()) {
      const CascadeStream& cascade = streams[size_t(h)].cascade();
      std::vector<DeviceSlotWrite>& writes =
          (*device_writes)[s.stream_config.row_bytes()];
      for (int slot : output.changed_slots) {
        writes.push_back({rows.Row(h, slot), cascade.key_row(slot).data(),
                          cascade.value_row(slot).data()});
      }
    }
    if (mode == StepMode::kAttend && !done->outputs_in_reply) {
      for (int t = 0; t < T; ++t) {
        const size_t at = size_t(t) * Hq + size_t(h) * G;  // first row
        cpu::StoreFloats(
            absl::MakeConstSpan(&output.out[size_t(t) * G * D], size_t(G) * D),
            shape.dtype, &result->output[at * D * elem]);
        std::memcpy(&result->lse[at * sizeof(float)],
                    &output.lse[size_t(t) * G], size_t(G) * sizeof(float));
      }
    } else if (mode == StepMode::kFetch) {
      result->heads.push_back(std::move(output.fetched));
    }
    if (batch == nullptr) continue;  // replay: the pages are stored already
    for (size_t p = 0; p < output.sealed.size(); ++p) {
      batch->pages.push_back(
          {storage::PageId{s.manifest.seq, uint32_t(layer), uint32_t(h),
                           output.sealed_seqs[p]},
           std::move(output.sealed[p])});
    }
  }
  for (const StreamState& stream : streams) {
    bytes_after += stream.memory_bytes();
  }
  s.memory_bytes += bytes_after - bytes_before;
  memory_bytes_.fetch_add(bytes_after - bytes_before);
  s.layer_next[size_t(layer)] += T;
  result->next_position = s.layer_next[size_t(layer)];
  return absl::OkStatus();
}

void KeepLastStep(StepMode mode, const StepEntryView& e,
                  const StepEntryResult& result, Engine::LastStep* last) {
  last->position = e.position;
  last->num_tokens = e.num_tokens;
  last->mode = mode;
  last->fingerprint = Fingerprint(e);
  last->kept =
      mode != StepMode::kFetch || ReplyBytes(result) <= kMaxKeptReplyBytes;
  last->reply = last->kept ? result : StepEntryResult();
}

// The per-session locks taken depend on the request, which Clang's
// analysis cannot follow; the locking is confined to this function.
absl::StatusOr<std::vector<StepEntryResult>> Engine::Step(
    const std::string& tenant,
    const StepRequestView& request) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const StepMode mode = request.mode;
  if (mode != StepMode::kFetch && mode != StepMode::kAttend &&
      mode != StepMode::kAppend) {
    return absl::InvalidArgumentError(
        "mode must be one of STEP_MODE_FETCH, STEP_MODE_ATTEND, "
        "STEP_MODE_APPEND");
  }
  const size_t n = request.entries.size();
  if (n == 0 || n > size_t{kMaxEntriesPerStep}) {
    return absl::InvalidArgumentError(absl::StrCat(
        "entries: ", n, " entries, want 1 to ", kMaxEntriesPerStep));
  }

  // Sessions: known, each once.
  const int64_t lookup_start = MonotonicNanos();
  const int64_t used_at = Now();
  std::vector<std::shared_ptr<LiveSession>> sessions(n);
  std::map<std::string, size_t> first_entry;
  for (size_t i = 0; i < n; ++i) {
    const std::string& id = request.entries[i].session_id;
    if (!ValidateSessionId(id, "session_id").ok()) {  // the field named
      return ValidateSessionId(id, Field(i, "session_id").c_str());
    }
    auto [it, fresh] = first_entry.emplace(id, i);
    if (!fresh) {
      return absl::InvalidArgumentError(absl::StrCat(
          Field(i, "session_id"), ": session \"", id, "\" repeats entries[",
          it->second, "]; a request holds at most one entry per session"));
    }
    absl::StatusOr<std::shared_ptr<LiveSession>> live =
        LiveForStep(Key(tenant, id), used_at);
    if (!live.ok()) return Annotate(live.status(), Field(i, "session_id"));
    sessions[i] = *std::move(live);
  }
  AddStepPhaseNanos(StepPhase::kSessions, MonotonicNanos() - lookup_start);

  std::vector<StepEntryResult> results(n);
  std::shared_ptr<std::promise<absl::Status>> synced;  // STEP_SYNC requests
  {
    // Each phase's time, added to phase_nanos_ when the request ends.
    int64_t phase_start = MonotonicNanos();
    int64_t phase_nanos[int(StepPhase::kCount)] = {};
    auto phase_done = [&](StepPhase phase) {
      const int64_t now = MonotonicNanos();
      phase_nanos[int(phase)] += now - phase_start;
      phase_start = now;
    };
    struct PhaseCommit {
      std::atomic<int64_t>* totals;
      int64_t* nanos;
      ~PhaseCommit() {
        for (int p = 0; p < int(StepPhase::kCount); ++p) {
          totals[p].fetch_add(nanos[p], std::memory_order_relaxed);
        }
      }
    } phase_commit{phase_nanos_, phase_nanos};
    // Lock every session of the request in address order.
    std::vector<LiveSession*> order;
    for (const auto& s : sessions) order.push_back(s.get());
    std::sort(order.begin(), order.end());
    for (LiveSession* s : order) s->mu.Lock();
    struct Unlocker {
      std::vector<LiveSession*>* order;
      ~Unlocker() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        for (LiveSession* s : *order) s->mu.Unlock();
      }
    } unlocker{&order};
    phase_done(StepPhase::kLock);

    // Sessions are woken (recovered from storage) and healthy.
    const int64_t now_used = use_clock_.fetch_add(1) + 1;
    for (size_t i = 0; i < n; ++i) {
      LiveSession& s = *sessions[i];
      s.last_used.store(now_used, std::memory_order_relaxed);
      if (!s.woken) {
        absl::Status woke = Wake(s);
        if (!woke.ok()) return Annotate(woke, Field(i, "session_id"));
      }
      MutexLock lock(&s.durable_mu);
      if (!s.write_error.ok()) {
        return absl::UnavailableError(absl::StrCat(
            Field(i, "session_id"),
            ": an earlier write of this session "
            "failed (",
            s.write_error.message(),
            "); its steps are refused "
            "until a restart recovers it at its durable position"));
      }
    }

    // Validate every entry against its session before applying any.
    const int layer = request.layer;
    std::vector<bool> replay(n, false);  // an identical retry of the last step
    int64_t step_growth = 0;             // bytes this request may add
    for (size_t i = 0; i < n; ++i) {
      const StepEntryView& e = request.entries[i];
      LiveSession& s = *sessions[i];
      const ModelShape& shape = s.config().shape;
      if (s.deleted) {
        return absl::NotFoundError(absl::StrCat(Field(i, "session_id"),
                                                ": session \"", e.session_id,
                                                "\" was deleted"));
      }
      if (layer < 0 || layer >= shape.layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layer: ", layer, " is out of range for ", Field(i, "session_id"),
            " \"", e.session_id, "\", which has ", shape.layers, " layers"));
      }
      if (e.num_tokens < 1 || e.num_tokens > kMaxTokensPerEntry) {
        return absl::InvalidArgumentError(
            absl::StrCat(Field(i, "num_tokens"), " must be in [1, ",
                         kMaxTokensPerEntry, "], got ", e.num_tokens));
      }
      const int64_t e_bytes = DTypeBytes(shape.dtype);
      const int64_t want_q =
          int64_t{e.num_tokens} * shape.query_heads * shape.head_dim * e_bytes;
      const int64_t want_kv =
          int64_t{e.num_tokens} * shape.kv_heads * shape.head_dim * e_bytes;
      const bool q_optional = mode == StepMode::kAppend && e.q.empty();
      if (!q_optional && int64_t(e.q.size()) != want_q) {
        return absl::InvalidArgumentError(absl::StrCat(
            Field(i, "q"), ": ", e.q.size(), " bytes, want ", want_q,
            " ([T=", e.num_tokens, ", Hq=", shape.query_heads,
            ", D=", shape.head_dim, "] × ", e_bytes, " bytes)",
            mode == StepMode::kAppend ? "; or empty in APPEND" : ""));
      }
      if (int64_t(e.k.size()) != want_kv) {
        return absl::InvalidArgumentError(
            absl::StrCat(Field(i, "k"), ": ", e.k.size(), " bytes, want ",
                         want_kv, " ([T=", e.num_tokens, ", H=", shape.kv_heads,
                         ", D=", shape.head_dim, "] × ", e_bytes, " bytes)"));
      }
      if (int64_t(e.v.size()) != want_kv) {
        return absl::InvalidArgumentError(absl::StrCat(
            Field(i, "v"), ": ", e.v.size(), " bytes, want ", want_kv));
      }
      const int64_t expected = s.layer_next[size_t(layer)];
      const LastStep& last = s.last[size_t(layer)];
      if (e.position == last.position && e.num_tokens == last.num_tokens &&
          e.position + e.num_tokens == expected && mode == last.mode &&
          Fingerprint(e) == last.fingerprint) {
        if (!last.kept) {
          return absl::FailedPreconditionError(absl::StrCat(
              Field(i, "position"), ": ", e.position,
              " repeats the last FETCH step, whose reply was too large to keep "
              "for a retry; expected ",
              expected));
        }
        replay[i] = true;
        continue;
      }
      if (e.position != expected) {
        return absl::FailedPreconditionError(absl::StrCat(
            Field(i, "position"), ": got ", e.position, ", expected ", expected,
            " (session \"", e.session_id, "\", layer ", layer, ")"));
      }
      std::vector<StreamState>& streams = s.streams[size_t(layer)];
      int64_t growth =
          int64_t{shape.kv_heads} *
          StreamState::StepGrowthBytes(s.stream_config, e.num_tokens);
      if (streams.empty()) {
        growth +=
            int64_t{shape.kv_heads} * StreamState::FixedBytes(s.stream_config);
      }
      step_growth += growth;
      int64_t in_use = memory_bytes_.load(std::memory_order_relaxed);
      if (in_use + step_growth > memory_limit_bytes_) {
        const int hibernated = HibernateIdle(order, step_growth);
        in_use = memory_bytes_.load(std::memory_order_relaxed);
        if (in_use + step_growth > memory_limit_bytes_) {
          return absl::ResourceExhaustedError(absl::StrCat(
              Field(i, "session_id"), ": memory limit of ", memory_limit_bytes_,
              " bytes reached (", in_use, " in use after hibernating ",
              hibernated, " idle sessions, this request needs up to ",
              step_growth, "); delete sessions or raise --memory_limit_bytes"));
        }
      }
      const int64_t quota = s.config().policy.spill_quota_bytes;
      if (quota > 0) {
        // A step evicts at most T tokens per stream.
        const int64_t row = s.stream_config.row_bytes();
        int64_t spilled = 0;
        for (const std::vector<StreamState>& layer_streams : s.streams) {
          for (const StreamState& stream : layer_streams) {
            spilled += stream.spilled_tokens() * 2 * row;
          }
        }
        const int64_t may_spill =
            int64_t{e.num_tokens} * shape.kv_heads * 2 * row;
        if (spilled + may_spill > quota) {
          return absl::ResourceExhaustedError(absl::StrCat(
              Field(i, "session_id"), ": spill quota of ", quota,
              " bytes (policy.spill_quota_bytes) reached: ", spilled,
              " bytes spilled, this step may spill ", may_spill, " more"));
        }
      }
      if (streams.empty()) {
        KVMEM_RETURN_IF_ERROR(MakeStreams(s, layer, Field(i, "session_id")));
      }
    }

    // CUDA backend: decode entries whose layer is (or can become)
    // device-owned run the whole policy there (StepOwned). The others read
    // their layer's host state, which a device-owned layer brings back.
    std::vector<bool> owned(n, false);
    std::vector<bool> host_skip = replay;  // entries the host path skips
    if (options_.device != nullptr) {
      for (size_t i = 0; i < n; ++i) {
        if (replay[i]) continue;
        LiveSession& s = *sessions[i];
        owned[i] =
            TakeLayer(s, size_t(layer), mode, request.entries[i], n, order);
        if (owned[i]) {
          host_skip[i] = true;
        } else {
          absl::Status back = SyncLayerToHost(s, size_t(layer), /*drop=*/true);
          if (!back.ok()) return Annotate(back, Field(i, "session_id"));
        }
      }
    }

    // Plan: each stream's selection, and the spilled pages it recalls, read
    // before anything changes (a failed read refuses the whole request).
    // Selections of every (entry, KV head) side by side, then the reads.
    std::vector<std::vector<HeadWork>> work(n);
    std::vector<std::pair<size_t, size_t>> heads;  // (entry, head)
    for (size_t i = 0; i < n; ++i) {
      if (host_skip[i]) continue;
      const StepEntryView& e = request.entries[i];
      work[i] =
          SplitHeads(sessions[i]->config().shape, e.num_tokens, e.q, e.k, e.v);
      for (size_t h = 0; h < work[i].size(); ++h) heads.emplace_back(i, h);
    }
    std::vector<absl::Status> selected(heads.size());
    parallel_->Run(heads.size(), [&](size_t t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      const auto [i, h] = heads[t];
      const StepEntryView& e = request.entries[i];
      LiveSession& s = *sessions[i];
      HeadWork& w = work[i][h];
      absl::StatusOr<StreamSelection> selection =
          s.streams[size_t(layer)][h].Select(s.dense[size_t(layer)],
                                             w.Input(e.position, e.num_tokens));
      if (selection.ok()) {
        w.selection = std::move(*selection);
      } else {
        selected[t] = selection.status();
      }
    });
    for (size_t t = 0; t < heads.size(); ++t) {
      if (!selected[t].ok()) {
        return absl::InternalError(absl::StrCat(
            Field(heads[t].first, "session_id"),
            ": selection failed after validation: ", selected[t].message()));
      }
    }
    phase_done(StepPhase::kPlan);
    // Each head's pages are its own: read side by side when there are many
    // (as the device path does, engine_device.cc).
    size_t recalled_pages = 0;
    for (const auto& [i, h] : heads) {
      recalled_pages += work[i][h].selection.recall.size();
    }
    std::vector<absl::Status> recalled(heads.size());
    auto recall_head = [&](size_t t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      const auto [i, h] = heads[t];
      recalled[t] =
          LoadRecalled(sessions[i]->manifest.seq, layer, int(h), &work[i][h]);
    };
    parallel_->Run(heads.size(), recall_head,
                   recalled_pages >= size_t(kParallelRecallPages));
    for (size_t t = 0; t < heads.size(); ++t) {
      if (!recalled[t].ok()) {
        return Annotate(recalled[t],
                        absl::StrCat(Field(heads[t].first, "session_id"),
                                     ": recall of KV head ", heads[t].second));
      }
    }

    phase_done(StepPhase::kRecall);
    std::vector<HeadsApplied> heads_applied(n);
    for (size_t i = 0; i < n; ++i) {
      if (!replay[i]) PrepareHeads(*sessions[i], layer, &heads_applied[i]);
    }
    // CUDA backend: the host path's decode entries' attention, still
    // before anything changes (what does not fit falls back to the CPU
    // path); then the device-owned entries' whole steps.
    if (options_.device != nullptr) {
      int64_t rows_nanos = 0;
      if (mode != StepMode::kAppend) {
        KVMEM_RETURN_IF_ERROR(AttendOnDevice(sessions, order, request,
                                             host_skip, work, &rows_nanos));
      }
      OwnedStepNanos owned_nanos;
      KVMEM_RETURN_IF_ERROR(StepOwned(sessions, order, request, owned,
                                      heads_applied, results, &owned_nanos));
      phase_done(StepPhase::kDevice);
      phase_nanos[int(StepPhase::kDevice)] -= rows_nanos + owned_nanos.recall +
                                              owned_nanos.wait +
                                              owned_nanos.spill;
      phase_nanos[int(StepPhase::kDeviceRows)] += rows_nanos;
      phase_nanos[int(StepPhase::kRecall)] += owned_nanos.recall;
      phase_nanos[int(StepPhase::kDeviceWait)] += owned_nanos.wait;
      phase_nanos[int(StepPhase::kDeviceSpill)] += owned_nanos.spill;
    }

    // Apply. Every input was checked and read above, so a stream step
    // cannot fail here; INTERNAL would mean a bug, and says so.
    // Every (entry, KV head) policy step side by side; then each entry's
    // reply, pages and log record in order.
    parallel_->Run(heads.size(), [&](size_t t) {
      const auto [i, h] = heads[t];
      const StepEntryView& e = request.entries[i];
      ApplyHead(*sessions[i], layer, mode, e.position, e.num_tokens, work[i][h],
                &heads_applied[i], h);
    });
    storage::SpillBatch batch;
    DeviceWrites device_writes;
    bool sync = false;
    struct Written {
      std::shared_ptr<LiveSession> session;
      int64_t end;
    };
    std::vector<Written> written;
    // Each entry's reply, pages, device writes, log record and kept reply,
    // side by side (every entry is a different session); then merged into
    // the request's batch in entry order.
    std::vector<storage::SpillBatch> entry_pages(n);
    std::vector<DeviceWrites> entry_writes(n);
    std::vector<std::string> entry_logs(n);
    std::vector<absl::Status> entry_status(n);
    auto apply_entry = [&](size_t i) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      LiveSession& s = *sessions[i];
      if (replay[i]) {
        results[i] = s.last[size_t(layer)].reply;
        return;
      }
      const StepEntryView& e = request.entries[i];
      entry_status[i] = ApplyEntry(s, layer, mode, e.position, e.num_tokens,
                                   work[i], &results[i], &entry_pages[i],
                                   &entry_writes[i], &heads_applied[i]);
      if (!entry_status[i].ok()) return;
      entry_logs[i] = EncodeLoggedStep(mode, e.num_tokens, e.q, e.k, e.v);
      KeepLastStep(mode, e, results[i], &s.last[size_t(layer)]);
    };
    // An entry's part here is copies of about its request's bytes (the
    // log record, the kept reply, the outputs): side by side only when
    // they outweigh waking the workers.
    size_t entry_bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      const StepEntryView& e = request.entries[i];
      if (replay[i]) continue;
      entry_bytes += 2 * (e.q.size() + e.k.size() + e.v.size());
      if (mode == StepMode::kFetch) {  // and the kept reply: a budget of rows
        const SessionConfig& c = sessions[i]->config();
        entry_bytes += size_t(c.policy.step_budget_tokens) * c.shape.kv_heads *
                       2 * size_t(sessions[i]->stream_config.row_bytes());
      }
    }
    parallel_->Run(n, apply_entry, entry_bytes >= kParallelApplyBytes);
    for (size_t i = 0; i < n; ++i) {
      if (!entry_status[i].ok()) {
        return Annotate(entry_status[i], Field(i, "session_id"));
      }
    }
    for (size_t i = 0; i < n; ++i) {
      if (replay[i]) continue;
      LiveSession& s = *sessions[i];
      const StepEntryView& e = request.entries[i];
      for (storage::SpillBatch::Entry& page : entry_pages[i].pages) {
        batch.pages.push_back(std::move(page));
      }
      for (auto& [row_bytes, writes] : entry_writes[i]) {
        std::vector<DeviceSlotWrite>& all = device_writes[row_bytes];
        all.insert(all.end(), writes.begin(), writes.end());
      }
      // The step log record, in the same batch as the pages it sealed.
      batch.log.push_back({s.manifest.seq, uint32_t(layer), e.position,
                           std::move(entry_logs[i])});
      s.log_bytes += int64_t(batch.log.back().body.size());
      sync = sync || s.config().durability == Durability::kStepSync;
      written.push_back({sessions[i], s.layer_next[size_t(layer)]});
      steps_.fetch_add(1, std::memory_order_relaxed);
      tokens_appended_.fetch_add(e.num_tokens, std::memory_order_relaxed);
    }

    phase_done(StepPhase::kApply);
    for (const auto& [row_bytes, writes] : device_writes) {
      absl::Status wrote = options_.device->Write(row_bytes, writes);
      if (!wrote.ok()) {
        // The device copies are stale now: dropped, uploaded again from
        // the host state (which is right) on the next use.
        for (const auto& s : sessions) ReleaseDevice(*s);
      }
    }

    if (!device_writes.empty()) phase_done(StepPhase::kDeviceWrite);

    // Write the request's batch: STEP_SYNC waits for it (below, unlocked).
    if (!written.empty()) {
      if (sync) synced = std::make_shared<std::promise<absl::Status>>();
      auto done = [written, layer, sync, synced](const absl::Status& st) {
        for (const Written& w : written) {
          MutexLock lock(&w.session->durable_mu);
          if (!st.ok()) {
            if (w.session->write_error.ok()) w.session->write_error = st;
            continue;
          }
          int64_t& at = w.session->written_next[size_t(layer)];
          at = std::max(at, w.end);
          if (sync) {
            int64_t& durable = w.session->synced_next[size_t(layer)];
            durable = std::max(durable, w.end);
          }
        }
        if (synced != nullptr) synced->set_value(st);
      };
      storage::SpillWriter::EnqueueOptions enqueue;
      enqueue.sync = sync;
      absl::Status queued = writer_->Enqueue(std::move(batch), enqueue, done);
      if (!queued.ok()) {
        // Applied in memory but not logged: the sessions refuse steps until
        // a restart recovers them from storage.
        for (const Written& w : written) {
          MutexLock lock(&w.session->durable_mu);
          if (w.session->write_error.ok()) w.session->write_error = queued;
        }
        return absl::UnavailableError(absl::StrCat(
            "storage: the step's write was refused (", queued.message(),
            "); retry after the server recovers"));
      }
    }
    // Sessions whose log grew past max_log_bytes checkpoint now.
    for (size_t i = 0; i < n; ++i) {
      LiveSession& s = *sessions[i];
      if (s.log_bytes > options_.max_log_bytes) {
        absl::Status st = CheckpointLocked(s);
        if (!st.ok()) {
          MutexLock lock(&s.durable_mu);
          if (s.write_error.ok()) s.write_error = st;
        }
      }
    }
    phase_done(StepPhase::kWrite);
  }

  if (synced != nullptr) {
    absl::Status st = synced->get_future().get();
    if (!st.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "storage: the step was applied but its synced write failed (",
          st.message(),
          "); the session resumes at its durable position "
          "after a restart"));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    results[i].durable_position = sessions[i]->DurablePosition();
  }
  return results;
}

}  // namespace kvmem
