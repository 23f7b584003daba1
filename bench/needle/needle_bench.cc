// Needle (passkey) retrieval through the engine, in-process, no gRPC.
//
// A one-layer session is fed `length` haystack tokens in APPEND chunks (with
// queries, so that the cascade's attention scores move as in a prefill).
// Keys, values and queries are N(0, 1) per channel. One token at `depth` is
// the needle: per KV head h its key is needle_key_scale·√D·u_h (u_h a random
// unit direction) and its value a random vector w_h of the haystack's norm.
// Then a decode query aligned with the needle (per query head of group h:
// query_scale·√D·u_h + N(0, 1) noise) is stepped twice: FETCH at position
// `length`, then ATTEND at `length` + 1 (an identical repeat would be a
// retry, so each mode gets its own step; both steps add a random token).
//
// Per stream (trial × KV head) the bench records whether FETCH returned the
// needle's position, the softmax weight on the needle that the returned
// keys give (the worker's view, averaged over the group's query heads; 0
// when the needle is missing), and the cosine of each ATTEND output head
// with w_h. Rows are four policies with the same resident budget
// S + C·W: StreamingLLM (C = 1), the cascade with a step budget that
// covers every resident token, the cascade with a small Quest budget, and
// the latter with recall of spilled pages.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/dtype.h"
#include "service/engine/engine.h"
#include "storage/store.h"

ABSL_FLAG(std::string, lengths, "1024,4096,16384", "haystack tokens");
ABSL_FLAG(std::string, depths, "10,30,50,70,90",
          "needle depth, percent of the haystack");
ABSL_FLAG(int, trials, 1, "seeds per (length, depth)");
ABSL_FLAG(std::string, policies, "streaming,cascade,quest,recall",
          "rows to run, of streaming, cascade, quest, recall");
ABSL_FLAG(int, sinks, 64, "S of every policy");
ABSL_FLAG(int, cache_tokens, 1024, "C·W of every policy");
ABSL_FLAG(int, cascades, 4, "C of the cascade rows (StreamingLLM has 1)");
ABSL_FLAG(int, page_tokens, 16, "P");
ABSL_FLAG(int, small_budget, 256, "step budget B of the Quest rows");
ABSL_FLAG(int, query_heads, 4, "Hq");
ABSL_FLAG(int, kv_heads, 2, "H");
ABSL_FLAG(int, head_dim, 64, "D");
ABSL_FLAG(int, chunk_tokens, 256, "tokens per APPEND chunk of the haystack");
ABSL_FLAG(double, needle_key_scale, 2.0, "needle key norm, units of sqrt(D)");
ABSL_FLAG(double, query_scale, 2.0,
          "decode query's component along the needle, units of sqrt(D)");
ABSL_FLAG(int, threads, 2, "policies run at once");
ABSL_FLAG(std::string, data_dir, "",
          "RocksDB directory (emptied first); default a fresh temp dir");

namespace kvmem {
namespace {

constexpr char kTenant[] = "needle-bench";

struct Policy {
  std::string name;
  int cascades = 1;
  int budget_tokens = 0;
  bool recall = false;
};

struct Shape {
  int hq = 8, h = 2, d = 64;
};

// One trial's inputs, shared by every policy: [length, Hq|H, D] fp32.
struct Haystack {
  int64_t length = 0;
  int64_t needle_position = 0;
  std::string q, k, v;     // per token, fp32 LE
  std::string decode_q;    // [Hq, D]
  std::string extra_k[2];  // the two decode steps' own tokens, [H, D]
  std::string extra_v[2];
  std::vector<float> needle_value;  // [H, D]
};

void PutFloat(std::string* bytes, size_t i, float x) {
  StoreElement(bytes->data(), DType::kFp32, static_cast<int64_t>(i), x);
}
float GetFloat(const std::string& bytes, size_t i) {
  return LoadElement(bytes.data(), DType::kFp32, static_cast<int64_t>(i));
}

std::string Noise(std::mt19937* rng, size_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string bytes(n * 4, '\0');
  for (size_t i = 0; i < n; ++i) PutFloat(&bytes, i, normal(*rng));
  return bytes;
}

// A random unit vector of `d` floats.
std::vector<float> Direction(std::mt19937* rng, int d) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> u(static_cast<size_t>(d));
  double norm = 0;
  for (float& x : u) {
    x = normal(*rng);
    norm += double(x) * x;
  }
  for (float& x : u) x = float(x / std::sqrt(norm));
  return u;
}

Haystack MakeHaystack(const Shape& s, int64_t length, int depth_percent,
                      uint32_t seed) {
  std::mt19937 rng(seed);
  Haystack hs;
  hs.length = length;
  hs.needle_position = length * depth_percent / 100;
  const size_t n = static_cast<size_t>(length);
  hs.q = Noise(&rng, n * s.hq * s.d);
  hs.k = Noise(&rng, n * s.h * s.d);
  hs.v = Noise(&rng, n * s.h * s.d);
  const float root_d = std::sqrt(float(s.d));
  const float key_norm = float(absl::GetFlag(FLAGS_needle_key_scale)) * root_d;
  const float query_along = float(absl::GetFlag(FLAGS_query_scale)) * root_d;
  hs.decode_q = Noise(&rng, static_cast<size_t>(s.hq) * s.d);
  hs.needle_value.assign(static_cast<size_t>(s.h) * s.d, 0.0f);
  const int group = s.hq / s.h;
  const size_t needle_row = static_cast<size_t>(hs.needle_position) * s.h;
  for (int h = 0; h < s.h; ++h) {
    const std::vector<float> u = Direction(&rng, s.d);
    const std::vector<float> w = Direction(&rng, s.d);
    for (int i = 0; i < s.d; ++i) {
      const size_t at = (needle_row + h) * s.d + i;
      PutFloat(&hs.k, at, key_norm * u[i]);
      PutFloat(&hs.v, at, root_d * w[i]);
      hs.needle_value[static_cast<size_t>(h) * s.d + i] = root_d * w[i];
      for (int g = 0; g < group; ++g) {
        const size_t qa = static_cast<size_t>(h * group + g) * s.d + i;
        PutFloat(&hs.decode_q, qa,
                 GetFloat(hs.decode_q, qa) + query_along * u[i]);
      }
    }
  }
  for (int i = 0; i < 2; ++i) {
    hs.extra_k[i] = Noise(&rng, static_cast<size_t>(s.h) * s.d);
    hs.extra_v[i] = Noise(&rng, static_cast<size_t>(s.h) * s.d);
  }
  return hs;
}

// One stream's measurements (per KV head).
struct StreamResult {
  bool found = false;
  double weight = 0;  // mean over the group's query heads
  double cosine = 0;  // mean over the group's query heads
};

struct Totals {
  int64_t streams = 0, found = 0;
  double weight = 0, cosine = 0;
  void Add(const StreamResult& r) {
    ++streams;
    found += r.found;
    weight += r.weight;
    cosine += r.cosine;
  }
  void Add(const Totals& t) {
    streams += t.streams;
    found += t.found;
    weight += t.weight;
    cosine += t.cosine;
  }
};

SessionConfig Config(const Shape& s, const Policy& p, const std::string& id) {
  SessionConfig c;
  c.tenant = kTenant;
  c.session_id = id;
  c.shape.layers = 1;
  c.shape.kv_heads = s.h;
  c.shape.query_heads = s.hq;
  c.shape.head_dim = s.d;
  c.shape.dtype = DType::kFp32;
  c.policy.sinks = absl::GetFlag(FLAGS_sinks);
  c.policy.cascades = p.cascades;
  c.policy.window = absl::GetFlag(FLAGS_cache_tokens) / p.cascades;
  c.policy.page_tokens = absl::GetFlag(FLAGS_page_tokens);
  c.policy.recent_tokens = c.policy.page_tokens;
  c.policy.step_budget_tokens = p.budget_tokens;
  c.policy.recall = p.recall;
  c.policy.dense_layers = {};  // the one layer is sparse
  return c;
}

// Feeds `hs` to a fresh session of policy `p`, steps the decode query,
// measures one StreamResult per KV head, and deletes the session.
absl::Status RunTrial(Engine* engine, const Shape& s, const Policy& p,
                      const Haystack& hs, const std::string& id,
                      std::vector<StreamResult>* results) {
  absl::StatusOr<SessionInfo> created = engine->CreateSession(Config(s, p, id));
  if (!created.ok()) return created.status();
  const int chunk = absl::GetFlag(FLAGS_chunk_tokens);
  const size_t q_row = static_cast<size_t>(s.hq) * s.d * 4;
  const size_t kv_row = static_cast<size_t>(s.h) * s.d * 4;
  for (int64_t at = 0; at < hs.length; at += chunk) {
    const int T = int(std::min<int64_t>(chunk, hs.length - at));
    const size_t first = static_cast<size_t>(at);
    StepRequestView r;
    r.layer = 0;
    r.mode = StepMode::kAppend;
    r.entries.push_back(
        {id, at, T, absl::string_view(hs.q).substr(first * q_row, T * q_row),
         absl::string_view(hs.k).substr(first * kv_row, T * kv_row),
         absl::string_view(hs.v).substr(first * kv_row, T * kv_row)});
    absl::StatusOr<std::vector<StepEntryResult>> fed = engine->Step(kTenant, r);
    if (!fed.ok()) return fed.status();
  }
  StepRequestView fetch{
      0,
      StepMode::kFetch,
      {{id, hs.length, 1, hs.decode_q, hs.extra_k[0], hs.extra_v[0]}}};
  absl::StatusOr<std::vector<StepEntryResult>> fetched =
      engine->Step(kTenant, fetch);
  if (!fetched.ok()) return fetched.status();
  StepRequestView attend{
      0,
      StepMode::kAttend,
      {{id, hs.length + 1, 1, hs.decode_q, hs.extra_k[1], hs.extra_v[1]}}};
  absl::StatusOr<std::vector<StepEntryResult>> attended =
      engine->Step(kTenant, attend);
  if (!attended.ok()) return attended.status();

  const int group = s.hq / s.h;
  const float scale = 1.0f / std::sqrt(float(s.d));
  const std::string& out = (*attended)[0].output;
  results->assign(static_cast<size_t>(s.h), StreamResult());
  for (int h = 0; h < s.h; ++h) {
    const FetchedHead& head = (*fetched)[0].heads[h];
    const auto hit = std::find(head.positions.begin(), head.positions.end(),
                               hs.needle_position);
    StreamResult& r = (*results)[h];
    r.found = hit != head.positions.end();
    const size_t needle_index =
        static_cast<size_t>(hit - head.positions.begin());
    const size_t n = head.positions.size();
    const float* w = &hs.needle_value[static_cast<size_t>(h) * s.d];
    double w_norm = 0;
    for (int i = 0; i < s.d; ++i) w_norm += double(w[i]) * w[i];
    for (int g = 0; g < group; ++g) {
      const size_t qh = static_cast<size_t>(h * group + g);
      if (r.found) {
        std::vector<double> logits(n);
        double max_logit = -1e300;
        for (size_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int i = 0; i < s.d; ++i) {
            dot += double(GetFloat(hs.decode_q, qh * s.d + i)) *
                   GetFloat(head.k, j * s.d + i);
          }
          logits[j] = scale * dot;
          max_logit = std::max(max_logit, logits[j]);
        }
        double sum = 0;
        for (double& x : logits) sum += (x = std::exp(x - max_logit));
        r.weight += logits[needle_index] / sum / group;
      }
      double dot = 0, o_norm = 0;
      for (int i = 0; i < s.d; ++i) {
        const double o = GetFloat(out, qh * s.d + i);
        dot += o * w[i];
        o_norm += o * o;
      }
      r.cosine += dot / std::sqrt(o_norm * w_norm + 1e-30) / group;
    }
  }
  return engine->DeleteSession(kTenant, id);
}

std::vector<int64_t> Numbers(const std::string& list) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int64_t v;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

std::string LengthName(int64_t tokens) {
  return tokens % 1024 == 0 ? absl::StrCat(tokens / 1024, "K")
                            : absl::StrCat(tokens);
}

int Main() {
  const Shape s{absl::GetFlag(FLAGS_query_heads), absl::GetFlag(FLAGS_kv_heads),
                absl::GetFlag(FLAGS_head_dim)};
  const int S = absl::GetFlag(FLAGS_sinks);
  const int cw = absl::GetFlag(FLAGS_cache_tokens);
  const int C = absl::GetFlag(FLAGS_cascades);
  const int dense_budget = S + cw + 1;  // every resident token + the new one
  const int small = absl::GetFlag(FLAGS_small_budget);
  std::vector<Policy> all = {
      {"streaming", 1, dense_budget, false},
      {"cascade", C, dense_budget, false},
      {"quest", C, small, false},
      {"recall", C, small, true},
  };
  std::vector<Policy> policies;
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_policies), ',', absl::SkipEmpty())) {
    for (const Policy& p : all) {
      if (p.name == name) policies.push_back(p);
    }
  }
  const std::vector<int64_t> lengths = Numbers(absl::GetFlag(FLAGS_lengths));
  const std::vector<int64_t> depths = Numbers(absl::GetFlag(FLAGS_depths));
  const int trials = absl::GetFlag(FLAGS_trials);
  if (policies.empty() || lengths.empty() || depths.empty() || trials < 1 ||
      s.h < 1 || s.hq % s.h != 0 || cw % C != 0) {
    std::fprintf(stderr,
                 "bad flags: need policies, lengths, depths, "
                 "trials >= 1, Hq a multiple of H, C dividing C·W\n");
    return 2;
  }

  std::string dir = absl::GetFlag(FLAGS_data_dir);
  if (dir.empty()) {
    const char* base = std::getenv("TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/kvmem-needle-XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) {
      std::fprintf(stderr, "cannot make a temp dir\n");
      return 1;
    }
    dir = pattern;
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  absl::StatusOr<std::unique_ptr<storage::Store>> store =
      storage::Store::Open(storage::Store::Options(), dir);
  if (!store.ok()) {
    std::fprintf(stderr, "store: %s\n", store.status().ToString().c_str());
    return 1;
  }
  Engine::Options options;
  options.registry.sync_manifests = false;  // nothing here survives a crash
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Open(options, store->get());
  if (!engine.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine.status().ToString().c_str());
    return 1;
  }

  std::printf(
      "kvmem needle: 1 layer, %d query / %d KV heads x %d fp32; resident "
      "budget S + C·W = %d + %d = %d tokens for every row (streaming: C 1, "
      "W %d; cascade rows: C %d, W %d), P %d; step budget B: %d (streaming, "
      "cascade), %d (quest, recall); haystack fed in APPEND chunks of %d; "
      "needle key %.1f·√D, decode query %.1f·√D along it; %d trials per "
      "cell; found and weight per stream (trial × KV head)\n\n",
      s.hq, s.h, s.d, S, cw, S + cw, cw, C, cw / C,
      absl::GetFlag(FLAGS_page_tokens), dense_budget, small,
      absl::GetFlag(FLAGS_chunk_tokens), absl::GetFlag(FLAGS_needle_key_scale),
      absl::GetFlag(FLAGS_query_scale), trials);
  // totals[policy][length]
  std::vector<std::vector<Totals>> totals(policies.size(),
                                          std::vector<Totals>(lengths.size()));
  std::vector<std::vector<Totals>> cells(
      policies.size(), std::vector<Totals>(lengths.size() * depths.size()));
  std::vector<double> policy_seconds(policies.size(), 0.0);
  const auto start = std::chrono::steady_clock::now();
  int64_t next_id = 0;
  for (size_t li = 0; li < lengths.size(); ++li) {
    for (size_t di = 0; di < depths.size(); ++di) {
      for (int trial = 0; trial < trials; ++trial) {
        const uint32_t seed =
            uint32_t(lengths[li] * 7919 + depths[di] * 104729 + trial * 31);
        const Haystack hs = MakeHaystack(s, lengths[li], int(depths[di]), seed);
        std::atomic<size_t> next_policy{0};
        std::vector<absl::Status> errors(policies.size());
        std::vector<std::vector<StreamResult>> results(policies.size());
        auto work = [&]() {
          for (size_t p; (p = next_policy++) < policies.size();) {
            const auto t0 = std::chrono::steady_clock::now();
            errors[p] =
                RunTrial(engine->get(), s, policies[p], hs,
                         absl::StrCat("n", next_id, "-", p), &results[p]);
            policy_seconds[p] += std::chrono::duration<double>(
                                     std::chrono::steady_clock::now() - t0)
                                     .count();
          }
        };
        std::vector<std::thread> threads;
        for (int t = 0; t < absl::GetFlag(FLAGS_threads); ++t) {
          threads.emplace_back(work);
        }
        for (std::thread& t : threads) t.join();
        ++next_id;
        for (size_t p = 0; p < policies.size(); ++p) {
          if (!errors[p].ok()) {
            std::fprintf(stderr, "%s, length %lld, depth %lld: %s\n",
                         policies[p].name.c_str(), (long long)lengths[li],
                         (long long)depths[di], errors[p].ToString().c_str());
            return 1;
          }
          for (const StreamResult& r : results[p]) {
            cells[p][li * depths.size() + di].Add(r);
            totals[p][li].Add(r);
          }
        }
      }
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();

  std::printf(
      "| policy | length | depth | found %% | mean weight on needle | "
      "mean cos(ATTEND, needle value) |\n|---|---|---|---:|---:|---:|\n");
  for (size_t p = 0; p < policies.size(); ++p) {
    for (size_t li = 0; li < lengths.size(); ++li) {
      for (size_t di = 0; di < depths.size(); ++di) {
        const Totals& t = cells[p][li * depths.size() + di];
        std::printf("| %s | %s | %lld%% | %.0f | %.3f | %.3f |\n",
                    policies[p].name.c_str(), LengthName(lengths[li]).c_str(),
                    (long long)depths[di], 100.0 * t.found / t.streams,
                    t.weight / t.streams, t.cosine / t.streams);
      }
    }
  }
  std::printf("\n| policy |");
  for (int64_t length : lengths) {
    std::printf(" %s found %% / weight |", LengthName(length).c_str());
  }
  std::printf(" all found %% | all weight | all cos | seconds |\n|---|");
  for (size_t li = 0; li < lengths.size(); ++li) std::printf("---:|");
  std::printf("---:|---:|---:|---:|\n");
  for (size_t p = 0; p < policies.size(); ++p) {
    Totals all_lengths;
    std::printf("| %s |", policies[p].name.c_str());
    for (size_t li = 0; li < lengths.size(); ++li) {
      const Totals& t = totals[p][li];
      all_lengths.Add(t);
      std::printf(" %.0f / %.3f |", 100.0 * t.found / t.streams,
                  t.weight / t.streams);
    }
    std::printf(" %.0f | %.3f | %.3f | %.1f |\n",
                100.0 * all_lengths.found / all_lengths.streams,
                all_lengths.weight / all_lengths.streams,
                all_lengths.cosine / all_lengths.streams, policy_seconds[p]);
  }
  std::printf("\n%.1f s in all\n", seconds);
  engine->reset();
  store->reset();
  std::filesystem::remove_all(dir, ignored);
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvmem::Main();
}
