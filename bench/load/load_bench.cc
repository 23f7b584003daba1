// Load: many workers × many sessions against one in-process server for a
// bounded time (issue 7, bench/load).
//
// The server is started through StartServer() on 127.0.0.1:0 (CPU backend,
// a fresh data directory). Each of `workers` threads has its own channel
// (its own TCP connection) and one StepStream, creates its
// `sessions_per_worker` sessions, fills each layer of each with `prefill`
// tokens (APPEND, no query: the cascades are full and spilling before the
// clock starts), then decodes until `seconds` have passed. A worker's
// sessions are split into batches of `batch` entries; one token is one
// request per (batch, layer), interleaved: batch 0 layer 0, batch 1 layer 0,
// …, batch 0 layer 1, … Every request is timed from Write to the matching
// Read (the round trip a worker waits for).
//
// Reported: requests/s, entry steps/s (one session × one layer), decode
// tokens/s (entry steps / layers), round-trip p50/p99/p99.9, errors by
// code, and the process RSS every second with the server's GetStats
// figures. The server runs in this process, so RSS includes the client.
//
// Under valgrind --tool=callgrind the cost counters are zeroed when the
// timed phase starts and dumped when it ends, so the profile leaves out
// set-up and shutdown.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/create_channel.h"
#include "kernels/dtype.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/server.h"

#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define KVMEM_PROFILE_ZERO() CALLGRIND_ZERO_STATS
#define KVMEM_PROFILE_DUMP() CALLGRIND_DUMP_STATS_AT("timed phase")
#else
#define KVMEM_PROFILE_ZERO()
#define KVMEM_PROFILE_DUMP()
#endif

ABSL_FLAG(int, workers, 4, "worker threads, each with its own channel");
ABSL_FLAG(int, sessions_per_worker, 16, "sessions each worker drives");
ABSL_FLAG(int, batch, 8, "entries per request (a worker's batch)");
ABSL_FLAG(double, seconds, 20, "length of the timed phase");
ABSL_FLAG(std::string, mode, "attend", "decode step mode: attend or fetch");
ABSL_FLAG(int, layers, 2, "L of every session");
ABSL_FLAG(int, prefill, 512, "tokens appended to each layer before timing");
ABSL_FLAG(bool, recall, true, "policy.recall of every session");
ABSL_FLAG(int, handler_threads, 8, "server --handler_threads");
ABSL_FLAG(int, inline_steps, -1, "server --inline_steps");
ABSL_FLAG(std::string, backend, "cpu", "server --backend (cpu, cuda, auto)");
ABSL_FLAG(bool, callgrind_timed_phase, true,
          "under callgrind: zero the counters when the timed phase starts "
          "and dump them when it ends");
ABSL_FLAG(std::string, data_dir, "/tmp/kvmem-load-bench",
          "server data directory (emptied first and removed after)");

namespace kvmem {
namespace {

// The session shape and policy: small enough for the CPU backend, with a
// window small enough that every decode step evicts and spills.
constexpr int kQueryHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr int kSinks = 64, kCascades = 4, kWindow = 64, kPage = 16;
constexpr int kBudget = 256;  // < S + C·W = 320: layer 1 selects pages

using Clock = std::chrono::steady_clock;

// Random bf16 bytes to slice tensors from: the client's cost stays out of
// the way (no per-element work per request).
std::string RandomBf16(size_t elements) {
  std::mt19937 rng(12345);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(elements * 2, '\0');
  for (size_t i = 0; i < elements; ++i) {
    StoreElement(bytes.data(), DType::kBf16, int64_t(i), normal(rng));
  }
  return bytes;
}

struct WorkerResult {
  std::vector<float> micros;  // round trip per request of the timed phase
  int64_t requests = 0, entry_steps = 0;
  std::map<int, int64_t> errors;  // gRPC code → count
  std::string failure;            // set when the worker stopped early
};

class Worker {
 public:
  Worker(int index, const std::string& address, const std::string* pool)
      : index_(index), pool_(pool), rng_(uint32_t(index) * 7919u + 1u) {
    grpc::ChannelArguments args;
    // A connection of its own, not a subchannel shared with other workers.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("kvmem.bench.worker", index);
    args.SetMaxReceiveMessageSize(-1);
    stub_ = v1::KvMemory::NewStub(grpc::CreateCustomChannel(
        address, grpc::InsecureChannelCredentials(), args));
  }

  // Creates and fills the sessions; false (with result_.failure) on error.
  bool SetUp() {
    const int count = absl::GetFlag(FLAGS_sessions_per_worker);
    const int layers = absl::GetFlag(FLAGS_layers);
    for (int i = 0; i < count; ++i) {
      v1::CreateSessionRequest create;
      create.set_session_id(absl::StrCat("load-", index_, "-", i));
      v1::ModelShape* s = create.mutable_shape();
      s->set_layers(layers);
      s->set_kv_heads(kKvHeads);
      s->set_query_heads(kQueryHeads);
      s->set_head_dim(kHeadDim);
      s->set_dtype(v1::DTYPE_BF16);
      v1::CachePolicy* p = create.mutable_policy();
      p->set_sinks(kSinks);
      p->set_cascades(kCascades);
      p->set_window(kWindow);
      p->set_page_tokens(kPage);
      p->set_step_budget_tokens(kBudget);
      p->set_recall(absl::GetFlag(FLAGS_recall));
      p->add_dense_layers(0);  // as the default's first layer; layer 1 sparse
      p->set_dense_layers_set(true);
      grpc::ClientContext context;
      v1::Session session;
      grpc::Status st = stub_->CreateSession(&context, create, &session);
      if (!st.ok()) {
        result_.failure = "CreateSession: " + st.error_message();
        return false;
      }
      ids_.push_back(create.session_id());
    }
    stream_ = stub_->StepStream(&stream_context_);
    const int prefill = absl::GetFlag(FLAGS_prefill);
    for (const std::string& id : ids_) {
      for (int l = 0; l < layers && prefill > 0; ++l) {
        v1::StepRequest r;
        r.set_layer(l);
        r.set_mode(v1::STEP_MODE_APPEND);
        v1::StepEntry* e = r.add_entries();
        e->set_session_id(id);
        e->set_position(0);
        e->set_num_tokens(prefill);
        const size_t bytes = size_t{2} * prefill * kKvHeads * kHeadDim;
        e->set_k(Slice(bytes));
        e->set_v(Slice(bytes));
        v1::StepStreamResponse reply;
        if (!RoundTrip(r, &reply) || reply.error_code() != 0) {
          result_.failure = "prefill: " + reply.error_message();
          return false;
        }
      }
    }
    position_ = prefill;
    return true;
  }

  // Decodes until `deadline` (or `stop`); results in result().
  void Run(Clock::time_point deadline, const std::atomic<bool>* stop) {
    const int layers = absl::GetFlag(FLAGS_layers);
    const int batch = std::max(1, absl::GetFlag(FLAGS_batch));
    const v1::StepMode mode = absl::GetFlag(FLAGS_mode) == "fetch"
                                  ? v1::STEP_MODE_FETCH
                                  : v1::STEP_MODE_ATTEND;
    const size_t q_bytes = size_t{2} * kQueryHeads * kHeadDim;
    const size_t kv_bytes = size_t{2} * kKvHeads * kHeadDim;
    v1::StepStreamResponse reply;
    while (Clock::now() < deadline && !stop->load()) {
      for (int l = 0; l < layers; ++l) {
        for (size_t first = 0; first < ids_.size(); first += size_t(batch)) {
          v1::StepRequest r;
          r.set_layer(l);
          r.set_mode(mode);
          r.set_request_id(uint64_t(++request_id_));
          const size_t end = std::min(ids_.size(), first + size_t(batch));
          for (size_t i = first; i < end; ++i) {
            v1::StepEntry* e = r.add_entries();
            e->set_session_id(ids_[i]);
            e->set_position(position_);
            e->set_num_tokens(1);
            e->set_q(Slice(q_bytes));
            e->set_k(Slice(kv_bytes));
            e->set_v(Slice(kv_bytes));
          }
          const Clock::time_point sent = Clock::now();
          if (!RoundTrip(r, &reply)) {
            result_.failure = "the stream broke";
            return;
          }
          result_.micros.push_back(float(
              std::chrono::duration<double, std::micro>(Clock::now() - sent)
                  .count()));
          ++result_.requests;
          if (reply.error_code() != 0) {
            // Nothing of it was applied, but the batches' layers now
            // disagree on the next position: this worker stops, and the
            // errors are reported (none are expected at the default load).
            ++result_.errors[reply.error_code()];
            result_.failure =
                absl::StrCat("stopped after error ", reply.error_code(), ": ",
                             reply.error_message());
            return;
          }
          result_.entry_steps += int64_t(end - first);
        }
      }
      ++position_;
    }
  }

  // Ends the stream; its status (OK unless the server broke it).
  grpc::Status Close() {
    if (stream_ == nullptr) return grpc::Status::OK;
    stream_->WritesDone();
    return stream_->Finish();
  }

  const WorkerResult& result() const { return result_; }

 private:
  bool RoundTrip(const v1::StepRequest& request, v1::StepStreamResponse* out) {
    return stream_->Write(request) && stream_->Read(out);
  }

  // `bytes` random bytes from the shared pool at a random even offset.
  std::string Slice(size_t bytes) {
    std::uniform_int_distribution<size_t> at(0, (pool_->size() - bytes) / 2);
    return pool_->substr(2 * at(rng_), bytes);
  }

  const int index_;
  const std::string* pool_;  // not owned; outlives the worker
  std::mt19937 rng_;
  std::unique_ptr<v1::KvMemory::Stub> stub_;
  grpc::ClientContext stream_context_;
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::StepRequest, v1::StepStreamResponse>>
      stream_;
  std::vector<std::string> ids_;
  int64_t position_ = 0;
  int64_t request_id_ = 0;
  WorkerResult result_;
};

// Resident set size of this process, MB (10^6 bytes), from /proc.
double RssMegabytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::strtod(line.c_str() + 6, nullptr) * 1024 / 1e6;
    }
  }
  return 0;
}

double Percentile(std::vector<float>* v, double p) {
  if (v->empty()) return 0;
  const size_t at =
      std::min(v->size() - 1, static_cast<size_t>(p * double(v->size())));
  std::nth_element(v->begin(), v->begin() + long(at), v->end());
  return (*v)[at];
}

struct Sample {
  double seconds = 0, rss_mb = 0;
  int64_t steps = 0, resident_bytes = 0, spilled_bytes = 0, queue_bytes = 0;
};

int Main() {
  const std::string dir = absl::GetFlag(FLAGS_data_dir);
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.data_dir = dir;
  options.backend = absl::GetFlag(FLAGS_backend);
  options.handler_threads = absl::GetFlag(FLAGS_handler_threads);
  options.inline_steps = absl::GetFlag(FLAGS_inline_steps);
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  const int workers = absl::GetFlag(FLAGS_workers);
  const int sessions = absl::GetFlag(FLAGS_sessions_per_worker);
  const int layers = absl::GetFlag(FLAGS_layers);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  std::printf(
      "kvmem load: backend %s on %s; %d workers × %d sessions, batch %d, "
      "%s; shape %d layers, %d query / %d KV heads × %d bf16; policy S %d, "
      "C %d, W %d, P %d, B %d, dense layers {0}, recall %s, ASYNC; prefill "
      "%d tokens; %.0f s timed; handler threads %d, inline steps %d\n\n",
      (*server)->backend().c_str(), (*server)->device().c_str(), workers,
      sessions, absl::GetFlag(FLAGS_batch), absl::GetFlag(FLAGS_mode).c_str(),
      layers, kQueryHeads, kKvHeads, kHeadDim, kSinks, kCascades, kWindow,
      kPage, kBudget, absl::GetFlag(FLAGS_recall) ? "on" : "off",
      absl::GetFlag(FLAGS_prefill), seconds,
      absl::GetFlag(FLAGS_handler_threads), absl::GetFlag(FLAGS_inline_steps));
  std::fflush(stdout);

  const std::string pool = RandomBf16(size_t{1} << 20);
  std::vector<std::unique_ptr<Worker>> pool_workers;
  for (int w = 0; w < workers; ++w) {
    pool_workers.push_back(
        std::make_unique<Worker>(w, (*server)->address(), &pool));
  }
  // Set-up in parallel, then every worker starts at once.
  std::atomic<int> ready{0};
  std::atomic<bool> go{false}, stop{false}, setup_failed{false};
  Clock::time_point deadline;
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      if (!pool_workers[w]->SetUp()) setup_failed = true;
      ++ready;
      while (!go.load()) std::this_thread::yield();
      if (!setup_failed.load()) pool_workers[w]->Run(deadline, &stop);
    });
  }
  const Clock::time_point setup_start = Clock::now();
  while (ready.load() < workers) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::printf(
      "set-up (sessions created and filled): %.1f s\n\n",
      std::chrono::duration<double>(Clock::now() - setup_start).count());
  // The sampler's own channel: GetStats once a second.
  auto stats_stub = v1::KvMemory::NewStub(grpc::CreateChannel(
      (*server)->address(), grpc::InsecureChannelCredentials()));
  auto sample = [&](Clock::time_point start) {
    Sample s;
    s.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    s.rss_mb = RssMegabytes();
    grpc::ClientContext context;
    v1::GetStatsResponse stats;
    if (stats_stub->GetStats(&context, v1::GetStatsRequest(), &stats).ok()) {
      s.steps = stats.steps();
      s.resident_bytes = stats.resident_bytes();
      s.spilled_bytes = stats.spilled_bytes();
      s.queue_bytes = stats.spill_queue_bytes();
    }
    return s;
  };
  std::vector<Sample> samples;
  const Clock::time_point start = Clock::now();
  samples.push_back(sample(start));
  deadline = start + std::chrono::microseconds(int64_t(seconds * 1e6));
  const bool profile_phase = absl::GetFlag(FLAGS_callgrind_timed_phase);
  if (profile_phase) KVMEM_PROFILE_ZERO();
  go = true;
  for (int tick = 1; Clock::now() < deadline; ++tick) {
    std::this_thread::sleep_until(
        std::min(deadline, start + std::chrono::seconds(tick)));
    samples.push_back(sample(start));
  }
  for (std::thread& t : threads) t.join();
  const double elapsed =
      std::chrono::duration<double>(Clock::now() - start).count();
  if (profile_phase) KVMEM_PROFILE_DUMP();
  samples.push_back(sample(start));

  WorkerResult all;
  for (const auto& w : pool_workers) {
    const WorkerResult& r = w->result();
    all.micros.insert(all.micros.end(), r.micros.begin(), r.micros.end());
    all.requests += r.requests;
    all.entry_steps += r.entry_steps;
    for (const auto& [code, count] : r.errors) all.errors[code] += count;
    if (!r.failure.empty()) {
      std::printf("worker failed: %s\n", r.failure.c_str());
    }
    grpc::Status closed = w->Close();
    if (!closed.ok()) {
      std::printf("stream closed with %d: %s\n", int(closed.error_code()),
                  closed.error_message().c_str());
    }
  }
  std::printf(
      "| requests/s | entry steps/s | tokens/s | round trip p50 µs | p99 µs "
      "| p99.9 µs | max µs | requests | errors |\n"
      "|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  std::string errors = all.errors.empty() ? "none" : "";
  for (const auto& [code, count] : all.errors) {
    absl::StrAppend(&errors, "code ", code, ": ", count, " ");
  }
  const double max_us =
      all.micros.empty()
          ? 0
          : *std::max_element(all.micros.begin(), all.micros.end());
  std::printf(
      "| %.0f | %.0f | %.1f | %.0f | %.0f | %.0f | %.0f | %lld | %s |\n",
      double(all.requests) / elapsed, double(all.entry_steps) / elapsed,
      double(all.entry_steps) / layers / elapsed, Percentile(&all.micros, 0.5),
      Percentile(&all.micros, 0.99), Percentile(&all.micros, 0.999), max_us,
      (long long)all.requests, errors.c_str());
  std::printf(
      "\n| t s | RSS MB | server steps | resident MB | spilled MB | "
      "spill queue MB |\n|---:|---:|---:|---:|---:|---:|\n");
  for (const Sample& s : samples) {
    std::printf("| %.1f | %.1f | %lld | %.1f | %.1f | %.1f |\n", s.seconds,
                s.rss_mb, (long long)s.steps, s.resident_bytes / 1e6,
                s.spilled_bytes / 1e6, s.queue_bytes / 1e6);
  }
  std::fflush(stdout);
  pool_workers.clear();
  (*server)->Shutdown(absl::Seconds(10));
  (*server)->Wait();
  std::filesystem::remove_all(dir, ignored);
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  kvmem::ConfigureServingProcess();
  return kvmem::Main();
}
