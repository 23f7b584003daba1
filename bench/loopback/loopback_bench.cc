// The step over loopback gRPC against a bare echo service in the same
// binary and the same run: same client path (a generic stub sending the same
// serialized request), same payload bytes in and out, no work on the echo
// side. The echo is the floor kvmem's own cost is measured against.
//
// Table 1, per mode × batch × resident: per-layer round trip median and p99,
// requests/s, payload GB/s, and the ratio to the echo.
// Table 2, per token as a worker sees it: `layers` sequential layer round
// trips of one decode token (ATTEND), ms per token.
//
// Cells whose KV would pass 60% of this machine's memory are reported as
// "does not fit (N GiB)" with the largest batch that fits measured instead.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <future>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/server_builder.h"
#include "kernels/dtype.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/engine/engine.h"
#include "service/server.h"

ABSL_FLAG(std::string, modes, "attend,fetch", "step modes of table 1");
ABSL_FLAG(std::string, batches, "1,8,32", "entries per request, table 1");
ABSL_FLAG(std::string, resident, "4096,32768", "tokens per session, table 1");
ABSL_FLAG(int, iterations, 100, "measured round trips per cell");
ABSL_FLAG(int, warmup, 10, "unmeasured round trips per cell");
ABSL_FLAG(int, token_layers, 32, "layers of the per-token table (0: skip)");
ABSL_FLAG(std::string, token_batches, "1,32", "batches of the per-token table");
ABSL_FLAG(std::string, token_resident, "4096,98304",
          "tokens per session of the per-token table");
ABSL_FLAG(int, token_iterations, 10, "decode tokens measured per cell");
ABSL_FLAG(std::string, data_dir, "/tmp/kvmem-loopback-bench",
          "server data directory (emptied first)");
ABSL_FLAG(std::string, backend, "cpu", "server --backend");
ABSL_FLAG(int, step_spin_us, -1, "server --step_spin_us");
ABSL_FLAG(int, inline_steps, -1, "server --inline_steps");
ABSL_FLAG(bool, cuda_graphs, true, "server --cuda_graphs");
ABSL_FLAG(int, device_spill_ring_tokens, 0,
          "server --device_spill_ring_tokens");

namespace kvmem {
namespace {

constexpr int kQueryHeads = 32, kKvHeads = 8, kHeadDim = 128;
constexpr int kBudget = 2048, kSinks = 64, kCascades = 4, kPage = 16;

// The echo: answers every call with `reply`, whatever was asked.
class EchoService final : public grpc::CallbackGenericService {
 public:
  void set_reply(const std::string& bytes) { reply_ = bytes; }

  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext*) override {
    return new Reactor(&reply_);
  }

 private:
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    explicit Reactor(const std::string* reply) : reply_(reply) {
      StartRead(&in_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) {
        Finish(grpc::Status::OK);
        return;
      }
      grpc::Slice slice(*reply_);
      out_ = grpc::ByteBuffer(&slice, 1);
      StartWrite(&out_);
    }
    void OnWriteDone(bool ok) override {
      if (!ok) {
        Finish(grpc::Status::CANCELLED);
        return;
      }
      StartRead(&in_);
    }
    void OnDone() override { delete this; }

   private:
    const std::string* reply_;
    grpc::ByteBuffer in_, out_;
  };

  std::string reply_;  // written between cells, read during them
};

struct Timing {
  std::vector<double> micros;
  size_t request_bytes = 0, reply_bytes = 0;
  std::string last_reply;
  bool ok = true;
  std::string error;
};

// One unary call of `method` with serialized `request` through `stub`.
grpc::Status Call(grpc::GenericStub* stub, const std::string& method,
                  const std::string& request, std::string* reply) {
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::ClientContext context;
  std::promise<grpc::Status> done;
  stub->UnaryCall(&context, method, grpc::StubOptions(), &in, &out,
                  [&done](grpc::Status s) { done.set_value(s); });
  grpc::Status status = done.get_future().get();
  if (!status.ok()) return status;
  std::vector<grpc::Slice> slices;
  (void)out.Dump(&slices);
  reply->clear();
  for (const grpc::Slice& s : slices) {
    reply->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return status;
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size())))];
}

// Random bf16 values (normal, σ = 1) for the bench's tensors, drawn once
// (64 MiB) and handed out as slices from random offsets: filling gigabytes
// of KV then costs copies, not draws (drawing each value took most of the
// fill's time and, inside the per-token loop, ~5 ms a token at batch 1).
class RandomBf16 {
 public:
  RandomBf16() : pool_(kElements * 2, '\0') {
    std::mt19937 rng(20261124);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < kElements; ++i) {
      StoreElement(pool_.data(), DType::kBf16, int64_t(i), normal(rng));
    }
  }
  // n values (n ≤ the pool) from a random offset. Thread-safe with a
  // generator per thread.
  std::string Take(std::mt19937_64* rng, size_t n) const {
    const size_t at = size_t((*rng)() % (kElements - n + 1));
    return pool_.substr(at * 2, n * 2);
  }

 private:
  static constexpr size_t kElements = size_t{32} << 20;
  std::string pool_;
};

// KV bytes of `sessions` sessions of `layers` layers holding `tokens`.
double KvGiB(int sessions, int layers, int64_t tokens) {
  return double(sessions) * layers * double(tokens) * kKvHeads * kHeadDim * 4 /
         double(1 << 30);
}

double MachineGiB() {
  return double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE)) /
         double(1 << 30);
}

class Bench {
 public:
  Bench(std::string address, std::string echo_address, EchoService* echo)
      : echo_(echo) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
        address, grpc::InsecureChannelCredentials(), args);
    kvmem_ = std::make_unique<grpc::GenericStub>(channel);
    kvmem_stream_ = v1::KvMemory::NewStub(channel);
    echo_stub_ = std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
        echo_address, grpc::InsecureChannelCredentials(), args));
    rng_.seed(12345);
  }

  // Creates `count` sessions of `layers` layers and fills each layer to
  // `tokens` tokens (APPEND chunks, no query; sessions side by side on up
  // to 16 client threads). Returns their ids.
  std::vector<std::string> MakeSessions(int count, int layers, int64_t tokens) {
    std::vector<std::string> ids;
    const int64_t window = std::max<int64_t>(
        1024, (tokens + kCascades - 1) / kCascades / kPage * kPage + kPage);
    for (int i = 0; i < count; ++i) {
      v1::CreateSessionRequest create;
      create.set_session_id(absl::StrCat("bench-", next_id_++));
      v1::ModelShape* s = create.mutable_shape();
      s->set_layers(layers);
      s->set_kv_heads(kKvHeads);
      s->set_query_heads(kQueryHeads);
      s->set_head_dim(kHeadDim);
      s->set_dtype(v1::DTYPE_BF16);
      v1::CachePolicy* p = create.mutable_policy();
      p->set_sinks(kSinks);
      p->set_cascades(kCascades);
      p->set_window(int(window));
      p->set_page_tokens(kPage);
      p->set_step_budget_tokens(kBudget);
      p->set_dense_layers_set(true);  // every layer sparse, as measured
      std::string reply;
      grpc::Status st = Call(kvmem_.get(), "/kvmem.v1.KvMemory/CreateSession",
                             create.SerializeAsString(), &reply);
      if (!st.ok()) {
        std::fprintf(stderr, "create: %s\n", st.error_message().c_str());
        std::exit(1);
      }
      ids.push_back(create.session_id());
      position_[ids.back()] = tokens;
    }
    std::atomic<size_t> next{0};
    auto fill = [&](uint64_t seed) {
      std::mt19937_64 rng(seed);
      for (size_t i = next++; i < ids.size(); i = next++) {
        for (int l = 0; l < layers; ++l) {
          for (int64_t at = 0; at < tokens; at += 1024) {
            const int T = int(std::min<int64_t>(1024, tokens - at));
            v1::StepRequest r;
            r.set_layer(l);
            r.set_mode(v1::STEP_MODE_APPEND);
            v1::StepEntry* e = r.add_entries();
            e->set_session_id(ids[i]);
            e->set_position(at);
            e->set_num_tokens(T);
            e->set_k(random_.Take(&rng, size_t(T) * kKvHeads * kHeadDim));
            e->set_v(random_.Take(&rng, size_t(T) * kKvHeads * kHeadDim));
            std::string reply;
            grpc::Status st = Call(kvmem_.get(), "/kvmem.v1.KvMemory/Step",
                                   r.SerializeAsString(), &reply);
            if (!st.ok()) {
              std::fprintf(stderr, "fill: %s\n", st.error_message().c_str());
              std::exit(1);
            }
          }
        }
      }
    };
    std::vector<std::thread> threads;
    for (size_t t = 0; t < std::min<size_t>(ids.size(), 16); ++t) {
      threads.emplace_back(fill, rng_() + t);
    }
    for (std::thread& t : threads) t.join();
    return ids;
  }

  // Deletes `ids`, returning their memory before the next cells.
  void DeleteSessions(const std::vector<std::string>& ids) {
    for (const std::string& id : ids) {
      v1::DeleteSessionRequest del;
      del.set_session_id(id);
      std::string reply;
      Call(kvmem_.get(), "/kvmem.v1.KvMemory/DeleteSession",
           del.SerializeAsString(), &reply)
          .IgnoreError();
      position_.erase(id);
    }
  }

  // A decode step of `layer` for `ids` at their next positions.
  v1::StepRequest DecodeRequest(const std::vector<std::string>& ids, int layer,
                                v1::StepMode mode) {
    v1::StepRequest r;
    r.set_layer(layer);
    r.set_mode(mode);
    for (const std::string& id : ids) {
      v1::StepEntry* e = r.add_entries();
      e->set_session_id(id);
      e->set_position(position_[id]);
      e->set_num_tokens(1);
      e->set_q(random_.Take(&rng_, size_t(kQueryHeads) * kHeadDim));
      e->set_k(random_.Take(&rng_, size_t(kKvHeads) * kHeadDim));
      e->set_v(random_.Take(&rng_, size_t(kKvHeads) * kHeadDim));
    }
    return r;
  }

  // Round trips of decode steps on layer 0 of `ids` (each applies a token).
  Timing RunKvmem(const std::vector<std::string>& ids, v1::StepMode mode,
                  int warmup, int iterations) {
    Timing t;
    for (int i = 0; i < warmup + iterations; ++i) {
      std::string request = DecodeRequest(ids, 0, mode).SerializeAsString();
      absl::Time start = absl::Now();
      grpc::Status st =
          Call(kvmem_.get(), "/kvmem.v1.KvMemory/Step", request, &t.last_reply);
      double us = absl::ToDoubleMicroseconds(absl::Now() - start);
      if (!st.ok()) {
        t.ok = false;
        t.error = st.error_message();
        return t;
      }
      for (const std::string& id : ids) ++position_[id];
      if (i >= warmup) t.micros.push_back(us);
      t.request_bytes = request.size();
      t.reply_bytes = t.last_reply.size();
    }
    return t;
  }

  // GetStats' step_phase_seconds: where the server's Step time went.
  std::map<std::string, double> Phases() {
    std::string reply;
    std::map<std::string, double> phases;
    if (!Call(kvmem_.get(), "/kvmem.v1.KvMemory/GetStats",
              v1::GetStatsRequest().SerializeAsString(), &reply)
             .ok()) {
      return phases;
    }
    v1::GetStatsResponse stats;
    stats.ParseFromString(reply);
    for (const auto& [name, seconds] : stats.step_phase_seconds()) {
      phases[name] = seconds;
    }
    return phases;
  }

  // The echo with the same request and reply bytes.
  Timing RunEcho(const std::string& request, const std::string& reply,
                 int warmup, int iterations) {
    echo_->set_reply(reply);
    Timing t;
    for (int i = 0; i < warmup + iterations; ++i) {
      absl::Time start = absl::Now();
      grpc::Status st =
          Call(echo_stub_.get(), "/bench.Echo/Step", request, &t.last_reply);
      double us = absl::ToDoubleMicroseconds(absl::Now() - start);
      if (!st.ok()) {
        t.ok = false;
        t.error = st.error_message();
        return t;
      }
      if (i >= warmup) t.micros.push_back(us);
    }
    t.request_bytes = request.size();
    t.reply_bytes = reply.size();
    return t;
  }

  // Decode tokens through every layer in order; ms per token. A token's
  // requests are built before its clock starts (the model computes q, k
  // and v; the worker's cost here is the round trips).
  std::vector<double> RunTokens(const std::vector<std::string>& ids, int layers,
                                int tokens, std::string* error) {
    std::vector<double> ms;
    for (int i = 0; i < tokens; ++i) {
      std::vector<std::string> requests;
      for (int l = 0; l < layers; ++l) {
        requests.push_back(
            DecodeRequest(ids, l, v1::STEP_MODE_ATTEND).SerializeAsString());
      }
      absl::Time start = absl::Now();
      for (int l = 0; l < layers; ++l) {
        std::string reply;
        grpc::Status st = Call(kvmem_.get(), "/kvmem.v1.KvMemory/Step",
                               requests[size_t(l)], &reply);
        if (!st.ok()) {
          *error = st.error_message();
          return ms;
        }
      }
      for (const std::string& id : ids) ++position_[id];
      ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    }
    return ms;
  }

  // The same tokens as a worker streams them: every layer's request a
  // message on one open StepStream, its reply read before the next layer.
  std::vector<double> RunTokensStream(const std::vector<std::string>& ids,
                                      int layers, int tokens,
                                      std::string* error) {
    std::vector<double> ms;
    grpc::ClientContext context;
    std::unique_ptr<
        grpc::ClientReaderWriter<v1::StepRequest, v1::StepStreamResponse>>
        stream = kvmem_stream_->StepStream(&context);
    for (int i = 0; i < tokens && error->empty(); ++i) {
      std::vector<v1::StepRequest> requests;
      for (int l = 0; l < layers; ++l) {
        requests.push_back(DecodeRequest(ids, l, v1::STEP_MODE_ATTEND));
      }
      absl::Time start = absl::Now();
      for (int l = 0; l < layers && error->empty(); ++l) {
        v1::StepStreamResponse reply;
        if (!stream->Write(requests[size_t(l)]) || !stream->Read(&reply)) {
          *error = "StepStream closed";
        } else if (reply.error_code() != 0) {
          *error = reply.error_message();
        }
      }
      if (!error->empty()) break;
      for (const std::string& id : ids) ++position_[id];
      ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    }
    stream->WritesDone();
    grpc::Status st = stream->Finish();
    if (error->empty() && !st.ok()) *error = st.error_message();
    return ms;
  }

 private:
  EchoService* echo_;
  std::unique_ptr<grpc::GenericStub> kvmem_, echo_stub_;
  std::unique_ptr<v1::KvMemory::Stub> kvmem_stream_;  // for StepStream
  RandomBf16 random_;
  std::mt19937_64 rng_;
  std::map<std::string, int64_t> position_;
  int next_id_ = 0;
};

// Tables 1b and 2b: `intro`, then a header of `first` | batch | resident,
// a column per step phase, server and `last`, then `rows` (PhaseRow's).
void PrintPhaseTable(const char* intro, const char* first, const char* last,
                     const std::vector<std::string>& rows) {
  if (rows.empty()) return;
  std::string header = absl::StrCat("| ", first, " | batch | resident |");
  std::string rule = "|---|---|---|";
  for (const char* phase : kStepPhaseNames) {
    absl::StrAppend(&header, " ", phase, " |");
    rule += "---|";
  }
  std::printf("\n%s:\n%s server | %s |\n%s---|---|\n", intro, header.c_str(),
              last, rule.c_str());
  for (const std::string& row : rows) std::printf("%s", row.c_str());
  std::fflush(stdout);
}

// `label` then the mean µs per step of each server phase between two
// GetStats readings over `steps` steps, their sum, and `last`.
std::string PhaseRow(const std::string& label,
                     const std::map<std::string, double>& before,
                     const std::map<std::string, double>& after, int64_t steps,
                     const std::string& last) {
  std::string row = label;
  double inside = 0;
  for (const char* phase : kStepPhaseNames) {
    auto b = before.find(phase);
    auto a = after.find(phase);
    const double us = a == after.end() || b == before.end() || steps <= 0
                          ? 0.0
                          : (a->second - b->second) * 1e6 / double(steps);
    inside += us;
    absl::StrAppend(&row, " ", absl::StrFormat("%.0f", us), " |");
  }
  absl::StrAppend(&row, " ", absl::StrFormat("%.0f", inside), " | ", last,
                  " |\n");
  return row;
}

std::vector<int64_t> Numbers(const std::string& list) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int64_t v;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

int Main() {
  std::filesystem::remove_all(absl::GetFlag(FLAGS_data_dir));
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.data_dir = absl::GetFlag(FLAGS_data_dir);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.max_message_bytes = 1 << 30;
  options.max_queued_bytes = int64_t{4} << 30;
  // No checkpoints while filling: each writes a session's whole state, so
  // at the default (every 256 MiB of log) filling a 96K-token × 32-layer
  // session would write its state ~48 times. Recovery is not measured here.
  options.max_log_bytes = int64_t{1} << 40;
  options.step_spin_us = absl::GetFlag(FLAGS_step_spin_us);
  options.inline_steps = absl::GetFlag(FLAGS_inline_steps);
  options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  options.device_spill_ring_tokens =
      absl::GetFlag(FLAGS_device_spill_ring_tokens);
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  EchoService echo;
  grpc::ServerBuilder builder;
  int echo_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &echo_port);
  builder.RegisterCallbackGenericService(&echo);
  builder.SetMaxReceiveMessageSize(1 << 30);
  builder.SetMaxSendMessageSize(1 << 30);
  std::unique_ptr<grpc::Server> echo_server = builder.BuildAndStart();
  Bench bench((*server)->address(), absl::StrCat("127.0.0.1:", echo_port),
              &echo);
  const double fit_gib = 0.6 * MachineGiB();
  std::printf(
      "kvmem loopback: backend %s on %s; shape %d query / %d KV "
      "heads × %d bf16, budget %d, page %d; %.0f GiB RAM\n\n",
      (*server)->backend().c_str(), (*server)->device().c_str(), kQueryHeads,
      kKvHeads, kHeadDim, kBudget, kPage, MachineGiB());

  std::printf(
      "| mode | batch | resident | kvmem p50 µs | kvmem p99 µs | "
      "echo p50 µs | echo p99 µs | kvmem req/s | kvmem GB/s | "
      "echo GB/s | p50 / echo |\n|---|---|---|---|---|---|---|---|---|"
      "---|---|\n");
  const int warmup = absl::GetFlag(FLAGS_warmup);
  const int iterations = absl::GetFlag(FLAGS_iterations);
  std::vector<std::string> phase_rows;  // table 1b, printed after table 1
  for (int64_t resident : Numbers(absl::GetFlag(FLAGS_resident))) {
    std::vector<int64_t> batches = Numbers(absl::GetFlag(FLAGS_batches));
    int64_t most = *std::max_element(batches.begin(), batches.end());
    while (most > 1 && KvGiB(int(most), 1, resident) > fit_gib) most /= 2;
    std::vector<std::string> ids = bench.MakeSessions(int(most), 1, resident);
    const std::vector<std::string> modes =
        absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty());
    for (const std::string& mode_name : modes) {
      const v1::StepMode mode =
          mode_name == "fetch" ? v1::STEP_MODE_FETCH : v1::STEP_MODE_ATTEND;
      for (int64_t batch : batches) {
        if (batch > most) {
          std::printf(
              "| %s | %lld | %lld | does not fit (%.1f GiB) |||||||| "
              "|\n",
              mode_name.c_str(), (long long)batch, (long long)resident,
              KvGiB(int(batch), 1, resident));
          continue;
        }
        std::vector<std::string> cell(ids.begin(), ids.begin() + batch);
        // The phases of the measured requests only: the warm-up's first
        // steps move layers to the device (or back), once per layer.
        Timing k = bench.RunKvmem(cell, mode, warmup, 0);
        const std::map<std::string, double> before = bench.Phases();
        if (k.ok) k = bench.RunKvmem(cell, mode, 0, iterations);
        const std::map<std::string, double> after = bench.Phases();
        if (!k.ok) {
          std::printf("| %s | %lld | %lld | error: %s |||||||| |\n",
                      mode_name.c_str(), (long long)batch, (long long)resident,
                      k.error.c_str());
          continue;
        }
        Timing e = bench.RunEcho(
            bench.DecodeRequest(cell, 0, mode).SerializeAsString(),
            k.last_reply, warmup, iterations);
        const double kp50 = Percentile(k.micros, 0.5);
        const double ep50 = Percentile(e.micros, 0.5);
        const double bytes = double(k.request_bytes + k.reply_bytes);
        std::printf(
            "| %s | %lld | %lld | %.0f | %.0f | %.0f | %.0f | %.0f | "
            "%.3f | %.3f | %.2f |\n",
            mode_name.c_str(), (long long)batch, (long long)resident, kp50,
            Percentile(k.micros, 0.99), ep50, Percentile(e.micros, 0.99),
            1e6 / kp50, bytes / kp50 / 1e3, bytes / ep50 / 1e3, kp50 / ep50);
        std::fflush(stdout);
        phase_rows.push_back(PhaseRow(
            absl::StrCat("| ", mode_name, " | ", batch, " | ", resident, " |"),
            before, after, iterations, absl::StrFormat("%.0f", kp50)));
      }
    }
    bench.DeleteSessions(ids);
  }
  PrintPhaseTable(
      "Where the server's time went (GetStats step_phase_seconds, mean µs "
      "per measured request of each cell; `server` is their sum, from the "
      "handler's start to the reply's message; the rest of p50 is gRPC's "
      "parsing and serialization and the wire)",
      "mode", "kvmem p50", phase_rows);

  const int layers = absl::GetFlag(FLAGS_token_layers);
  std::vector<std::string> token_phase_rows;  // table 2b
  if (layers > 0) {
    std::printf(
        "\n| layers | batch | resident | ms per token p50 | "
        "ms per token max | over StepStream p50 | over StepStream max | "
        "first token ms |\n|---|---|---|---|---|---|---|---|\n");
    for (int64_t resident : Numbers(absl::GetFlag(FLAGS_token_resident))) {
      for (int64_t batch : Numbers(absl::GetFlag(FLAGS_token_batches))) {
        int64_t fits = batch;
        while (fits > 1 && KvGiB(int(fits), layers, resident) > fit_gib) {
          fits /= 2;
        }
        if (KvGiB(int(fits), layers, resident) > fit_gib) {
          std::printf("| %d | %lld | %lld | does not fit (%.1f GiB) | |\n",
                      layers, (long long)batch, (long long)resident,
                      KvGiB(int(batch), layers, resident));
          continue;
        }
        if (fits != batch) {
          std::printf("| %d | %lld | %lld | does not fit (%.1f GiB) | |\n",
                      layers, (long long)batch, (long long)resident,
                      KvGiB(int(batch), layers, resident));
        }
        std::vector<std::string> ids =
            bench.MakeSessions(int(fits), layers, resident);
        std::string error;
        // The first token after the fill moves every layer to the device
        // (CUDA backend): reported apart, not in the figures.
        std::vector<double> first = bench.RunTokens(ids, layers, 1, &error);
        const std::map<std::string, double> before = bench.Phases();
        std::vector<double> ms =
            error.empty()
                ? bench.RunTokens(ids, layers,
                                  absl::GetFlag(FLAGS_token_iterations), &error)
                : std::vector<double>();
        std::vector<double> streamed =
            error.empty() ? bench.RunTokensStream(
                                ids, layers,
                                absl::GetFlag(FLAGS_token_iterations), &error)
                          : std::vector<double>();
        if (!error.empty() || ms.empty() || streamed.empty()) {
          std::printf("| %d | %lld | %lld | error: %s | |\n", layers,
                      (long long)fits, (long long)resident, error.c_str());
          bench.DeleteSessions(ids);
          continue;
        }
        std::printf(
            "| %d | %lld | %lld | %.1f | %.1f | %.1f | %.1f | %.1f |\n", layers,
            (long long)fits, (long long)resident, Percentile(ms, 0.5),
            *std::max_element(ms.begin(), ms.end()), Percentile(streamed, 0.5),
            *std::max_element(streamed.begin(), streamed.end()), first[0]);
        std::fflush(stdout);
        // Mean µs per layer step of the measured tokens, unary and streamed.
        token_phase_rows.push_back(PhaseRow(
            absl::StrCat("| ", layers, " | ", fits, " | ", resident, " |"),
            before, bench.Phases(),
            int64_t(ms.size() + streamed.size()) * layers,
            absl::StrFormat(
                "%.0f", 1e3 *
                            (Percentile(ms, 0.5) + Percentile(streamed, 0.5)) /
                            (2.0 * layers))));
        bench.DeleteSessions(ids);
      }
    }
  }
  PrintPhaseTable(
      "Where the server's time went per layer step of the measured tokens "
      "(unary and StepStream together; mean µs; the last column is the mean "
      "of the two p50s per token, over the layers)",
      "layers", "µs per layer step", token_phase_rows);
  echo_server->Shutdown();
  (*server)->Shutdown(absl::Seconds(10));
  std::filesystem::remove_all(absl::GetFlag(FLAGS_data_dir));
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  kvmem::ConfigureServingProcess();
  return kvmem::Main();
}
