// The engine and the server on the CUDA backend against the CPU oracle:
// the same sessions and steps (prefill chunks, batched decode in ATTEND and
// FETCH, spill and recall) on two engines, one with a device backend, each
// with its own RocksDB. Fresh random inputs, seed printed. Tolerances
// (STYLE.md): attention outputs are rounded to the session dtype (bf16:
// 1e-2, fp16: 1e-3, atol and rtol), LSE 1e-4; FETCH positions and rows are
// exact. Decode steps (ATTEND and FETCH) and ATTEND prefill chunks of
// sparse layers run the whole policy on the device (device-owned layers):
// FETCH's positions and rows show it chose exactly as the CPU, the chunks
// included (their scores come from tensor-core attention, within fp32
// rounding of the CPU's: only a near-tie duel could go the other way).
// APPEND steps (with queries or without) run there too; describing a
// session reads the state back to the host.
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/server.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/temp_dir.h"

namespace kvmem {
namespace {

using cuda::testing::Close;
using cuda::testing::FreshSeed;
using cuda::testing::Tolerance;

SessionConfig Config(const std::string& id, DType dtype) {
  SessionConfig c;
  c.tenant = "t";
  c.session_id = id;
  c.shape.layers = 2;
  c.shape.kv_heads = 2;
  c.shape.query_heads = 8;
  c.shape.head_dim = 128;
  c.shape.dtype = dtype;
  c.policy.sinks = 4;
  c.policy.cascades = 2;
  c.policy.window = 32;
  c.policy.page_tokens = 8;
  c.policy.recent_tokens = 8;
  c.policy.step_budget_tokens = 48;  // sparse: pages chosen, some recalled
  c.policy.ema_beta = 0.99;
  c.policy.dense_layers = {};
  return c;
}

// An engine on its own store.
struct TestEngine {
  testing::TempDir dir;
  std::unique_ptr<storage::Store> store;
  std::unique_ptr<Engine> engine;

  explicit TestEngine(std::shared_ptr<DeviceBackend> device) {
    store =
        std::move(*storage::Store::Open(storage::Store::Options(), dir.path()));
    Engine::Options options;
    options.device = std::move(device);
    engine = std::move(*Engine::Open(options, store.get()));
  }
};

std::shared_ptr<DeviceBackend> MakeDevice(size_t pool_bytes, size_t block_bytes,
                                          bool decode_graphs = true,
                                          int spill_ring_tokens = 1024) {
  DeviceBackend::Options options;
  options.pool_bytes = pool_bytes;
  options.decode_graphs = decode_graphs;
  options.spill_ring_tokens = spill_ring_tokens;
  options.block_bytes = block_bytes;
  absl::StatusOr<std::unique_ptr<DeviceBackend>> device =
      DeviceBackend::Create(options);
  EXPECT_TRUE(device.ok()) << device.status();
  return device.ok() ? std::shared_ptr<DeviceBackend>(std::move(*device))
                     : nullptr;
}

class Driver {
 public:
  explicit Driver(uint32_t seed) : rng_(seed) {}

  // [n] random normal values in `dtype`, as bytes.
  std::string Tensor(size_t n, DType dtype) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::string bytes(n * DTypeBytes(dtype), '\0');
    for (size_t i = 0; i < n; ++i) {
      StoreElement(bytes.data(), dtype, int64_t(i), normal(rng_));
    }
    return bytes;
  }

  // One request over `ids` (each at `positions[id]`) on both engines;
  // compares the answers. `with_query` false: APPEND without queries.
  void Step(Engine* cpu, Engine* cuda, const std::vector<SessionConfig>& cs,
            int layer, StepMode mode, int T, std::vector<int64_t>* at,
            bool with_query = true) {
    std::vector<std::string> q(cs.size()), k(cs.size()), v(cs.size());
    StepRequestView request{layer, mode, {}};
    for (size_t i = 0; i < cs.size(); ++i) {
      const ModelShape& s = cs[i].shape;
      if (with_query) {
        q[i] = Tensor(size_t(T) * s.query_heads * s.head_dim, s.dtype);
      }
      k[i] = Tensor(size_t(T) * s.kv_heads * s.head_dim, s.dtype);
      v[i] = Tensor(size_t(T) * s.kv_heads * s.head_dim, s.dtype);
      request.entries.push_back(
          {cs[i].session_id, (*at)[i], T, q[i], k[i], v[i]});
    }
    absl::StatusOr<std::vector<StepEntryResult>> want = cpu->Step("t", request);
    absl::StatusOr<std::vector<StepEntryResult>> got = cuda->Step("t", request);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < cs.size(); ++i) {
      (*at)[i] += T;
      const StepEntryResult& w = (*want)[i];
      const StepEntryResult& g = (*got)[i];
      ASSERT_EQ(g.next_position, w.next_position);
      const DType dtype = cs[i].shape.dtype;
      if (mode == StepMode::kAttend) {
        ASSERT_EQ(g.output.size(), w.output.size());
        const int64_t n = int64_t(w.output.size() / DTypeBytes(dtype));
        for (int64_t j = 0; j < n; ++j) {
          const float a = LoadElement(g.output.data(), dtype, j);
          const float b = LoadElement(w.output.data(), dtype, j);
          ASSERT_TRUE(Close(a, b, Tolerance(dtype)))
              << cs[i].session_id << " layer " << layer << " at "
              << (*at)[i] - T << " element " << j << ": cuda " << a << " cpu "
              << b;
        }
        std::vector<float> lg(g.lse.size() / 4), lw(w.lse.size() / 4);
        memcpy(lg.data(), g.lse.data(), g.lse.size());
        memcpy(lw.data(), w.lse.data(), w.lse.size());
        ASSERT_EQ(lg.size(), lw.size());
        for (size_t j = 0; j < lg.size(); ++j) {
          ASSERT_TRUE(Close(lg[j], lw[j], 1e-4)) << lg[j] << " vs " << lw[j];
        }
      } else if (mode == StepMode::kFetch) {
        ASSERT_EQ(g.heads.size(), w.heads.size());
        for (size_t h = 0; h < w.heads.size(); ++h) {
          ASSERT_EQ(g.heads[h].positions, w.heads[h].positions)
              << cs[i].session_id << " head " << h << " at " << (*at)[i] - T;
          ASSERT_EQ(g.heads[h].k, w.heads[h].k);
          ASSERT_EQ(g.heads[h].v, w.heads[h].v);
        }
      }
    }
  }

 private:
  std::mt19937 rng_;
};

// Prefill chunks (ATTEND chunks of layer 0, APPEND chunks with and without
// queries of layer 1), then batched decode steps that spill, select
// sparsely and recall, alternating ATTEND and FETCH by layer, with
// two-token ATTEND chunks and APPEND steps between them; all on the device.
void RunWorkload(Engine* cpu, Engine* cuda, uint32_t seed, int decode_steps) {
  std::vector<SessionConfig> cs = {Config("a", DType::kBf16),
                                   Config("b", DType::kBf16),
                                   Config("c", DType::kBf16)};
  for (Engine* e : {cpu, cuda}) {
    for (const SessionConfig& c : cs) ASSERT_TRUE(e->CreateSession(c).ok());
  }
  Driver driver(seed);
  std::vector<int64_t> at0(cs.size(), 0), at1(cs.size(), 0);
  for (int chunk = 0; chunk < 2; ++chunk) {
    driver.Step(cpu, cuda, cs, 0, StepMode::kAttend, 20, &at0);
    driver.Step(cpu, cuda, cs, 1, StepMode::kAppend, 20, &at1,
                /*with_query=*/chunk == 0);
  }
  for (int t = 0; t < decode_steps; ++t) {
    driver.Step(cpu, cuda, cs, 0, StepMode::kAttend, 1, &at0);
    driver.Step(cpu, cuda, cs, 1,
                t % 3 == 0 ? StepMode::kFetch : StepMode::kAttend, 1, &at1);
    // APPEND steps in the middle of decoding, with and without queries,
    // and two-token chunks: on the device too.
    if (t % 11 == 5) {
      driver.Step(cpu, cuda, cs, 1, StepMode::kAppend, 1, &at1,
                  /*with_query=*/t % 22 == 5);
    }
    if (t % 13 == 6) driver.Step(cpu, cuda, cs, 0, StepMode::kAttend, 2, &at0);
    // One session alone now and then, in either layer: batches of other
    // compositions (and, in a small pool, layers that must make room).
    if (t % 7 == 0) {
      const size_t i = size_t(t) % cs.size();
      std::vector<int64_t>& layer_at = t % 2 == 0 ? at0 : at1;
      std::vector<int64_t> at = {layer_at[i]};
      driver.Step(cpu, cuda, {cs[i]}, t % 2, StepMode::kAttend, 1, &at);
      layer_at[i] = at[0];
    }
    // Described alike: the device-owned layers' state read back equals the
    // CPU's (resident tokens per cascade, spilled pages), and the steps
    // after it go on alike.
    if (t % 25 == 24) {
      for (const SessionConfig& c : cs) {
        absl::StatusOr<SessionInfo> want = cpu->GetSession("t", c.session_id);
        absl::StatusOr<SessionInfo> got = cuda->GetSession("t", c.session_id);
        ASSERT_TRUE(want.ok()) << want.status();
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->resident_tokens_per_cascade,
                  want->resident_tokens_per_cascade)
            << c.session_id << " after " << t;
        EXPECT_EQ(got->spilled_pages, want->spilled_pages) << c.session_id;
        EXPECT_EQ(got->spilled_bytes, want->spilled_bytes) << c.session_id;
      }
    }
  }
}

TEST(EngineCuda, DecodeOnTheDeviceAnswersLikeTheCpuOracle) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = FreshSeed();
  TestEngine cpu(nullptr);
  std::shared_ptr<DeviceBackend> device =
      MakeDevice(size_t{256} << 20, size_t{1} << 20);
  TestEngine cuda(device);
  ASSERT_NE(cuda.engine, nullptr);
  RunWorkload(cpu.engine.get(), cuda.engine.get(), seed, 150);
  // Steps with spilled candidates replayed captured graphs too (the
  // selection's part, and the rest when no spilled page was taken), and
  // answered as the CPU engine (the driver compared every answer).
  EXPECT_GT(device->decode_graph_launches(), 0);
  // Steps whose spilled pages all lay in the streams' spill rings (chunks
  // keep their evicted tokens there too) ran without the host.
  EXPECT_GT(device->decode_ring_steps(), 0);
  const EngineStats stats = cuda.engine->Stats();
  EXPECT_GT(stats.device_pool_used_bytes, 0);  // the layers live there
  EXPECT_EQ(stats.device_fallbacks, 0);        // and every decode ran there
  // Every step ran the policy on the device: 150 decode steps × 3 sessions
  // × 2 layers, the 22 single-session ones; 2 prefill chunks × 2 layers, 12
  // two-token chunks and 14 APPEND steps, × 3 sessions.
  EXPECT_GE(stats.device_policy_steps, 900 + 22 + 12 + 36 + 42);
  // The device-owned layers' state and the staging, beside the pool; the
  // sessions' deletion gives the state back (the staging stays).
  EXPECT_GT(stats.device_side_bytes, 0);
  for (const char* id : {"a", "b", "c"}) {
    ASSERT_TRUE(cuda.engine->DeleteSession("t", id).ok());
  }
  EXPECT_LT(cuda.engine->Stats().device_side_bytes, stats.device_side_bytes);
  EXPECT_EQ(stats.device_evictions, 0);
  EXPECT_GT(stats.spilled_bytes, 0);  // the workload spilled (and recalled)
}

// Spill rings of any size answer alike: none (every step with spilled
// candidates goes back to the host for them), and one of two pages (most
// steps take some pages from the ring and the older ones from the host;
// a 20-token chunk evicts more than the ring keeps).
TEST(EngineCuda, SpillRingsOfAnySizeAnswerLikeTheCpuOracle) {
  KVMEM_REQUIRE_DEVICE();
  for (int ring : {0, 16}) {
    const uint32_t seed = FreshSeed();
    SCOPED_TRACE(::testing::Message() << "spill ring of " << ring << " tokens");
    TestEngine cpu(nullptr);
    std::shared_ptr<DeviceBackend> device =
        MakeDevice(size_t{256} << 20, size_t{1} << 20, true, ring);
    TestEngine cuda(device);
    ASSERT_NE(cuda.engine, nullptr);
    RunWorkload(cpu.engine.get(), cuda.engine.get(), seed, 80);
    if (ring == 0) {
      EXPECT_EQ(device->decode_ring_steps() + device->decode_ring_pages(), 0);
    } else {
      // The ring was used: whole steps, or pages of steps that also took
      // older ones from the host.
      EXPECT_GT(device->decode_ring_steps() + device->decode_ring_pages(), 0);
    }
    const EngineStats stats = cuda.engine->Stats();
    EXPECT_EQ(stats.device_fallbacks, 0);
    EXPECT_GT(stats.spilled_bytes, 0);
  }
}

// Creates `cs` on both engines, runs a 20-token ATTEND chunk into each of
// two layers, then `steps` decode steps of both: layer 0 ATTEND, layer 1
// FETCH and ATTEND in turn (the driver compares every answer).
void PrefillThenDecode(Engine* cpu, Engine* cuda,
                       const std::vector<SessionConfig>& cs, uint32_t seed,
                       int steps) {
  for (Engine* e : {cpu, cuda}) {
    for (const SessionConfig& c : cs) EXPECT_TRUE(e->CreateSession(c).ok());
  }
  Driver driver(seed);
  std::vector<int64_t> at0(cs.size(), 0), at1(cs.size(), 0);
  driver.Step(cpu, cuda, cs, 0, StepMode::kAttend, 20, &at0);
  driver.Step(cpu, cuda, cs, 1, StepMode::kAttend, 20, &at1);
  for (int t = 0; t < steps; ++t) {
    driver.Step(cpu, cuda, cs, 0, StepMode::kAttend, 1, &at0);
    driver.Step(cpu, cuda, cs, 1,
                t % 2 == 0 ? StepMode::kFetch : StepMode::kAttend, 1, &at1);
  }
}

// Steps without spilled candidates (60 tokens in 68 slots) on a device
// with or without decode graphs; returns how many steps replayed a graph.
int64_t RunStepsWithoutSpills(bool decode_graphs) {
  const uint32_t seed = FreshSeed();
  TestEngine cpu(nullptr);
  std::shared_ptr<DeviceBackend> device =
      MakeDevice(size_t{256} << 20, size_t{1} << 20, decode_graphs);
  TestEngine cuda(device);
  EXPECT_NE(cuda.engine, nullptr);
  if (cuda.engine == nullptr) return -1;
  PrefillThenDecode(cpu.engine.get(), cuda.engine.get(),
                    {Config("a", DType::kBf16), Config("b", DType::kBf16)},
                    seed, 40);
  const EngineStats stats = cuda.engine->Stats();
  EXPECT_EQ(stats.device_fallbacks, 0);
  EXPECT_EQ(stats.spilled_bytes, 0);             // nothing left the cascades
  EXPECT_GE(stats.device_policy_steps, 2 * 80);  // every decode step
  return device->decode_graph_launches();
}

// Such steps replay a CUDA graph captured at the second step of each batch
// shape (ATTEND and FETCH), and answer as the CPU engine does (the driver
// compares every step); with decode graphs off, every step launches plainly
// and answers alike.
TEST(EngineCuda, RepeatedStepsReplayACapturedGraphAndAnswerAlike) {
  KVMEM_REQUIRE_DEVICE();
  // Per mode, the first step runs plainly and the second is captured: the
  // other 36 or more of each replay the graph.
  EXPECT_GE(RunStepsWithoutSpills(/*decode_graphs=*/true), 3 * 18);
  EXPECT_EQ(RunStepsWithoutSpills(/*decode_graphs=*/false), 0);
}

// A dense layer's prefill chunks and APPEND steps run on the device too
// (a chunk selects the same on dense and sparse layers); its decode steps
// then bring the state back to the host path, which attends densely with
// recall. Answers agree with the CPU engine throughout.
TEST(EngineCuda, DenseLayersPrefillOnTheDeviceAndDecodeOnTheHost) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = FreshSeed();
  TestEngine cpu(nullptr);
  TestEngine cuda(MakeDevice(size_t{256} << 20, size_t{1} << 20));
  ASSERT_NE(cuda.engine, nullptr);
  std::vector<SessionConfig> cs = {Config("d", DType::kBf16),
                                   Config("e", DType::kBf16)};
  for (SessionConfig& c : cs) c.policy.dense_layers = {0};
  for (Engine* e : {cpu.engine.get(), cuda.engine.get()}) {
    for (const SessionConfig& c : cs) ASSERT_TRUE(e->CreateSession(c).ok());
  }
  Driver driver(seed);
  std::vector<int64_t> at(cs.size(), 0);
  for (int round = 0; round < 3; ++round) {
    // Chunks (the last round's without queries), on the device.
    for (int chunk = 0; chunk < 3; ++chunk) {
      driver.Step(cpu.engine.get(), cuda.engine.get(), cs, 0,
                  round < 2 ? StepMode::kAttend : StepMode::kAppend, 24, &at,
                  /*with_query=*/round < 2);
    }
    // Decode on the host path (dense: everything resident and recalled).
    for (int t = 0; t < 20; ++t) {
      driver.Step(cpu.engine.get(), cuda.engine.get(), cs, 0, StepMode::kAttend,
                  1, &at);
    }
  }
  const EngineStats stats = cuda.engine->Stats();
  EXPECT_GE(stats.device_policy_steps, 3 * 3 * 2);  // every chunk
  EXPECT_GT(stats.spilled_bytes, 0);  // 216 tokens past 68 slots: recalled
}

// CACHE_RANK sessions (keys stored before rotary, rotated at their cache
// rank on every step) keep the policy on the host and attend on the device,
// keys and queries rotated inside the kernel: ATTEND outputs, and FETCH's
// rotated keys and positions, agree with the CPU engine through spill and
// recall, for half-split pairs over all channels and interleaved pairs
// over half of them.
TEST(EngineCuda, CacheRankSessionsAttendOnTheDeviceWithRotaryInTheKernel) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = FreshSeed();
  TestEngine cpu(nullptr);
  TestEngine cuda(MakeDevice(size_t{256} << 20, size_t{1} << 20));
  ASSERT_NE(cuda.engine, nullptr);
  std::vector<SessionConfig> cs = {Config("r", DType::kBf16),
                                   Config("s", DType::kBf16)};
  for (SessionConfig& c : cs) {
    c.policy.positions_mode = PositionsMode::kCacheRank;
    c.shape.rotary.base_theta = 500000.0;
  }
  cs[1].shape.rotary.interleaved = true;
  cs[1].shape.rotary.rotary_dims = 64;
  constexpr int kSteps = 100;
  PrefillThenDecode(cpu.engine.get(), cuda.engine.get(), cs, seed, kSteps);
  const EngineStats stats = cuda.engine->Stats();
  EXPECT_EQ(stats.device_fallbacks, 0);
  EXPECT_EQ(stats.device_attend_steps, int64_t{kSteps} * 2 * 2);
  EXPECT_EQ(stats.device_policy_steps, 0);  // the policy stayed on the host
  EXPECT_GT(stats.spilled_bytes, 0);        // 120 tokens past 68 slots
  EXPECT_EQ(cpu.engine->Stats().device_attend_steps, 0);
}

TEST(EngineCuda, AFullPoolEvictsIdleSessionsRowsAndStillAnswersAlike) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = FreshSeed();
  TestEngine cpu(nullptr);
  // A layer of a session is 2 heads × 68 slots × 256 B = 34 KiB: one 64 KiB
  // block. Four blocks a plane: one kept for staging, three for layers, of
  // six. A request of the three sessions finds layers of the other layer's
  // requests holding blocks and no idle room, so some of its entries fall
  // back to the CPU; single-session steps evict idle layers.
  TestEngine cuda(MakeDevice(2 * 4 * (size_t{64} << 10), size_t{64} << 10));
  ASSERT_NE(cuda.engine, nullptr);
  RunWorkload(cpu.engine.get(), cuda.engine.get(), seed, 60);
  const EngineStats stats = cuda.engine->Stats();
  EXPECT_GT(stats.device_evictions, 0);
  EXPECT_GT(stats.device_fallbacks, 0);
  EXPECT_LE(stats.device_pool_used_bytes, stats.device_pool_bytes);
}

// The server: --backend=cuda answers a decode like --backend=cpu, over
// gRPC on 127.0.0.1:0.
std::unique_ptr<Server> Start(const std::string& backend,
                              const std::string& dir) {
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.data_dir = dir;
  options.backend = backend;
  options.device_memory_bytes = int64_t{512} << 20;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

TEST(ServerCuda, BackendCudaAnswersLikeBackendCpu) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = FreshSeed();
  testing::TempDir cpu_dir, cuda_dir;
  std::unique_ptr<Server> cpu = Start("cpu", cpu_dir.path());
  std::unique_ptr<Server> cuda = Start("cuda", cuda_dir.path());
  ASSERT_NE(cpu, nullptr);
  ASSERT_NE(cuda, nullptr);
  EXPECT_EQ(cuda->backend(), "cuda");
  auto cpu_stub = v1::KvMemory::NewStub(
      grpc::CreateChannel(cpu->address(), grpc::InsecureChannelCredentials()));
  auto cuda_stub = v1::KvMemory::NewStub(
      grpc::CreateChannel(cuda->address(), grpc::InsecureChannelCredentials()));
  v1::CreateSessionRequest create;
  create.set_session_id("s");
  v1::ModelShape* shape = create.mutable_shape();
  shape->set_layers(1);
  shape->set_kv_heads(8);
  shape->set_query_heads(32);
  shape->set_head_dim(128);
  shape->set_dtype(v1::DTYPE_BF16);
  v1::CachePolicy* policy = create.mutable_policy();
  policy->set_sinks(16);
  policy->set_cascades(2);
  policy->set_window(64);
  policy->set_page_tokens(16);
  policy->set_step_budget_tokens(96);
  for (auto* stub : {cpu_stub.get(), cuda_stub.get()}) {
    grpc::ClientContext context;
    v1::Session session;
    ASSERT_TRUE(stub->CreateSession(&context, create, &session).ok());
  }
  Driver driver(seed);
  for (int t = 0; t < 300; ++t) {
    v1::StepRequest request;
    request.set_layer(0);
    request.set_mode(v1::STEP_MODE_ATTEND);
    v1::StepEntry* e = request.add_entries();
    e->set_session_id("s");
    e->set_position(t);
    e->set_num_tokens(1);
    e->set_q(driver.Tensor(32 * 128, DType::kBf16));
    e->set_k(driver.Tensor(8 * 128, DType::kBf16));
    e->set_v(driver.Tensor(8 * 128, DType::kBf16));
    v1::StepResponse want, got;
    grpc::ClientContext c1, c2;
    ASSERT_TRUE(cpu_stub->Step(&c1, request, &want).ok());
    grpc::Status st = cuda_stub->Step(&c2, request, &got);
    ASSERT_TRUE(st.ok()) << st.error_message();
    const std::string& a = got.results(0).output();
    const std::string& b = want.results(0).output();
    ASSERT_EQ(a.size(), b.size());
    for (int64_t j = 0; j < int64_t(a.size() / 2); ++j) {
      const float x = LoadElement(a.data(), DType::kBf16, j);
      const float y = LoadElement(b.data(), DType::kBf16, j);
      ASSERT_TRUE(Close(x, y, Tolerance(DType::kBf16)))
          << "step " << t << " element " << j << ": " << x << " vs " << y;
    }
  }
  grpc::ClientContext context;
  v1::GetStatsResponse stats;
  ASSERT_TRUE(
      cuda_stub->GetStats(&context, v1::GetStatsRequest(), &stats).ok());
  EXPECT_EQ(stats.backend(), "cuda");
  EXPECT_GT(stats.device_pool_used_bytes(), 0);
  EXPECT_EQ(stats.device_fallbacks(), 0);
  cpu->Shutdown(absl::Seconds(5));
  cuda->Shutdown(absl::Seconds(5));
}

}  // namespace
}  // namespace kvmem
