// UpdateCascades (kernels/cuda/cascade_update.h) against the CPU oracle
// CascadeStream (UpdateScores(1, …) then InsertTokens), decode step by
// decode step, from the same random histories, probabilities and rows.
// After every step: positions, stored/head, n, tokens_seen, the evicted
// token and the changed slots exactly, u bit for bit; every
// kCheckpointEvery steps and at the end, every pool row byte for byte
// (unmapped rows untouched). A stream whose state differs right after a
// duel that DESIGN.md § Backend parity calls a near-tie is no failure: it
// is counted and no longer compared. Outputs are poisoned before each step.
#include "kernels/cuda/cascade_update.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cascade_policy.h"
#include "kernels/policy_math.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Download;
using testing::Upload;

constexpr int kSteps = 24;
constexpr int kCheckpointEvery = 8;
constexpr int kMaxStreams = 64;
constexpr int kMaxReportedFailures = 20;

struct SweepConfig {
  CascadeParams params;
  int head_dim = 64;
  DType dtype = DType::kBf16;

  std::string Describe() const {
    return absl::StrCat("S=", params.sinks, " C=", params.cascades,
                        " W=", params.window, " eager=", params.eager_fill,
                        " beta=", params.beta, " D=", head_dim, " ",
                        testing::DTypeName(dtype));
  }
};

struct SweepCounts {
  int64_t configs = 0;
  int64_t streams = 0;
  int64_t stream_steps = 0;  // compared
  int64_t evictions = 0;
  int64_t sink_inserts = 0;
  int64_t duels = 0;
  int64_t near_tie_duels = 0;
  int64_t near_tie_divergences = 0;  // streams stopped at a near-tie
  int64_t renormalisations = 0;
  int64_t sparse_steps = 0;             // attended rows instead of probs
  int64_t sparse_renormalisations = 0;  // stream-steps of those
  int64_t steps_without_attention = 0;
  int64_t row_checks = 0;   // stream checkpoints whose rows were compared
  int64_t long_chains = 0;  // insertions that changed more than 8 slots
  int64_t failures = 0;
};

// The smallest n at which a stream renormalises (DESIGN.md: β^(−n) > 2^20).
int64_t FirstRenormalisingExponent(double beta) {
  int64_t n = int64_t(20.0 * std::log(2.0) / -std::log(beta));
  while (n > 1 && NeedsRenormalisation(beta, n - 1)) --n;
  while (!NeedsRenormalisation(beta, n)) ++n;
  return n;
}

// Whether inserting the next token into `cs` (scores already updated)
// decides a duel (cascade.md §2 d), and whether it is a near-tie.
struct DuelInfo {
  bool duel = false;
  bool near_tie = false;
};

DuelInfo NextDuel(const CascadeStream& cs) {
  const CascadeParams& p = cs.params();
  const int64_t t = cs.tokens_seen();
  DuelInfo info;
  if (t < p.sinks) return info;
  const int k =
      AcceptingCascades(t, p.sinks, p.cascades, p.window, p.eager_fill);
  for (int i = 0; i < k; ++i) {
    if (cs.stored(i) < p.window) return info;  // rule a stops it
  }
  if (k >= p.cascades || cs.stored(k) == 0) return info;  // drop, or rule c
  // The carry into cascade k is cascade k−1's oldest (k ≥ 1: cascade 0
  // always accepts).
  const float carry =
      cs.slot_score(p.sinks + (k - 1) * p.window + cs.head(k - 1));
  const int newest =
      p.sinks + k * p.window + (cs.head(k) + cs.stored(k) - 1) % cs.stored(k);
  info.duel = true;
  info.near_tie = IsScoreNearTie(carry, cs.slot_score(newest));
  return info;
}

// One CPU decode step; *duel describes the insertion's duel.
void CpuStep(CascadeStream& cs, bool attended, absl::Span<const float> probs,
             float self_prob, absl::Span<const uint8_t> key,
             absl::Span<const uint8_t> value, InsertResult* result,
             DuelInfo* duel) {
  float initial = 0.0f;
  const absl::Span<const float> self =
      attended ? absl::MakeConstSpan(&self_prob, 1) : absl::Span<const float>();
  ASSERT_TRUE(cs.UpdateScores(1, attended ? probs : absl::Span<const float>(),
                              self, absl::MakeSpan(&initial, 1))
                  .ok());
  *duel = NextDuel(cs);
  ASSERT_TRUE(cs.InsertTokens(cs.tokens_seen(), 1, key, value,
                              absl::MakeConstSpan(&initial, 1), result)
                  .ok());
}

std::vector<float> RandomProbs(size_t count, std::mt19937& rng) {
  // Non-zero, like a softmax over a selection that holds every slot.
  std::uniform_real_distribution<float> prob(1e-3f, 1.0f);
  std::vector<float> probs(count);
  for (float& p : probs) p = prob(rng);
  return probs;
}

void Copy(const DeviceBuffer& dst, const void* src, size_t bytes,
          const Stream& stream) {
  ASSERT_TRUE(CopyToDevice(dst.get(), src, bytes, stream.get()).ok());
}

DeviceBuffer Allocate(size_t bytes) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(bytes + 16);
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  return buffer.ok() ? std::move(*buffer) : DeviceBuffer();
}

// The device state and step buffers of one batch.
struct DeviceBatch {
  DeviceBuffer positions, scores, stored, head, exponent, seen, keys, values,
      slot_rows;
  DeviceBuffer probs, self_probs, new_keys, new_values;
  DeviceBuffer row_slots, row_probs, row_counts;
  DeviceBuffer evicted_positions, evicted_keys, evicted_values, changed,
      changed_counts;

  CascadeDeviceState State() const {
    return CascadeDeviceState{positions.as<int64_t>(),
                              scores.as<float>(),
                              stored.as<int32_t>(),
                              head.as<int32_t>(),
                              exponent.as<int64_t>(),
                              seen.as<int64_t>(),
                              keys.get(),
                              values.get(),
                              slot_rows.as<int32_t>()};
  }
  CascadeStepOutputs Outputs() const {
    return CascadeStepOutputs{evicted_positions.as<int64_t>(),
                              evicted_keys.get(), evicted_values.get(),
                              changed.as<int32_t>(),
                              changed_counts.as<int32_t>()};
  }
};

void Fail(SweepCounts* counts, const std::string& message) {
  if (++counts->failures <= kMaxReportedFailures) ADD_FAILURE() << message;
}

void RunConfig(const SweepConfig& config, std::mt19937& rng,
               SweepCounts* counts) {
  SCOPED_TRACE(config.Describe());
  const CascadeParams& p = config.params;
  const int slots = p.sinks + p.cascades * p.window;
  const int cascades = p.cascades;
  const int d = config.head_dim;
  const size_t row_bytes = size_t(d) * DTypeBytes(config.dtype);
  const int streams = std::uniform_int_distribution<int>(1, kMaxStreams)(rng);
  const int64_t renorm_n = FirstRenormalisingExponent(p.beta);
  ++counts->configs;
  counts->streams += streams;

  // Streams with different histories (lengths, and for half of them an
  // exponent that crosses a renormalisation during the compared steps).
  std::vector<CascadeStream> cpu;
  for (int b = 0; b < streams; ++b) {
    absl::StatusOr<CascadeStream> made =
        CascadeStream::Create(p, int(row_bytes));
    ASSERT_TRUE(made.ok()) << made.status();
    const int history =
        std::uniform_int_distribution<int>(0, 2 * slots + 8)(rng);
    CascadeStream::Snapshot start = made->Export();
    if (rng() % 2 == 0) {
      start.score_exponent = std::max<int64_t>(
          0, renorm_n - history -
                 std::uniform_int_distribution<int>(1, kSteps)(rng));
    }
    made = CascadeStream::Import(p, int(row_bytes), std::move(start));
    ASSERT_TRUE(made.ok()) << made.status();
    for (int h = 0; h < history; ++h) {
      InsertResult ignored;
      DuelInfo duel;
      const std::vector<float> probs = RandomProbs(slots + 1, rng);
      const std::vector<uint8_t> rows =
          testing::RandomRows(size_t(2) * d, config.dtype, rng);
      CpuStep(*made, true, absl::MakeConstSpan(probs).first(slots),
              probs[slots], absl::MakeConstSpan(rows).first(row_bytes),
              absl::MakeConstSpan(rows).subspan(row_bytes), &ignored, &duel);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
    }
    cpu.push_back(std::move(*made));
  }

  // The device copy: slots scattered over a pool with spare rows.
  const int pool_rows = streams * slots + streams + 3;
  std::vector<int32_t> pool_order(pool_rows);
  std::iota(pool_order.begin(), pool_order.end(), 0);
  std::shuffle(pool_order.begin(), pool_order.end(), rng);
  const std::vector<int32_t> slot_rows(pool_order.begin(),
                                       pool_order.begin() + streams * slots);
  const std::vector<uint8_t> initial_keys =
      testing::RandomRows(size_t(pool_rows) * d, config.dtype, rng);
  const std::vector<uint8_t> initial_values =
      testing::RandomRows(size_t(pool_rows) * d, config.dtype, rng);
  std::vector<uint8_t> key_pool = initial_keys;
  std::vector<uint8_t> value_pool = initial_values;
  std::vector<int64_t> positions, exponents, seen;
  std::vector<float> scores;
  std::vector<int32_t> stored, head;
  for (int b = 0; b < streams; ++b) {
    const CascadeStream::Snapshot snap = cpu[b].Export();
    positions.insert(positions.end(), snap.positions.begin(),
                     snap.positions.end());
    scores.insert(scores.end(), snap.scores.begin(), snap.scores.end());
    stored.insert(stored.end(), snap.stored.begin(), snap.stored.end());
    head.insert(head.end(), snap.head.begin(), snap.head.end());
    exponents.push_back(snap.score_exponent);
    seen.push_back(snap.tokens_seen);
    for (int s = 0; s < slots; ++s) {
      const size_t row = size_t(slot_rows[size_t(b) * slots + s]);
      std::memcpy(key_pool.data() + row * row_bytes,
                  snap.keys.data() + size_t(s) * row_bytes, row_bytes);
      std::memcpy(value_pool.data() + row * row_bytes,
                  snap.values.data() + size_t(s) * row_bytes, row_bytes);
    }
  }
  Stream stream = testing::MakeStream();
  DeviceBatch dev;
  dev.positions = Upload(positions, stream.get());
  dev.scores = Upload(scores, stream.get());
  dev.stored = Upload(stored, stream.get());
  dev.head = Upload(head, stream.get());
  dev.exponent = Upload(exponents, stream.get());
  dev.seen = Upload(seen, stream.get());
  dev.keys = Upload(key_pool, stream.get());
  dev.values = Upload(value_pool, stream.get());
  dev.slot_rows = Upload(slot_rows, stream.get());
  dev.probs = Allocate(size_t(streams) * slots * sizeof(float));
  dev.self_probs = Allocate(size_t(streams) * sizeof(float));
  dev.new_keys = Allocate(streams * row_bytes);
  dev.new_values = Allocate(streams * row_bytes);
  dev.evicted_positions = Allocate(streams * sizeof(int64_t));
  dev.evicted_keys = Allocate(streams * row_bytes);
  dev.evicted_values = Allocate(streams * row_bytes);
  dev.changed = Allocate(size_t(streams) * cascades * sizeof(int32_t));
  dev.changed_counts = Allocate(streams * sizeof(int32_t));
  ASSERT_FALSE(::testing::Test::HasFailure());

  CascadeBatchShape shape;
  shape.streams = streams;
  shape.params = p;
  shape.head_dim = d;
  shape.dtype = config.dtype;
  std::vector<bool> alive(streams, true);
  const size_t state_slots = size_t(streams) * slots;
  for (int step = 0; step < kSteps; ++step) {
    const bool attended = rng() % 8 != 0;
    counts->steps_without_attention += !attended;
    std::vector<float> probs = RandomProbs(state_slots, rng);
    const std::vector<float> self_probs = RandomProbs(streams, rng);
    // Every third attended step passes the attended rows instead (what
    // the engine does): half the slots get r = 0 on both sides, the rest
    // are listed in a shuffled order with the new token's row (−2) and an
    // ignored one (−1).
    const int row_capacity = slots + 2;
    const bool sparse =
        attended && step % 3 == 1 && row_capacity <= kMaxSparseStepRows;
    counts->sparse_steps += sparse;
    std::vector<int32_t> row_slots, row_counts;
    std::vector<float> row_probs;
    if (sparse) {
      row_slots.assign(size_t(streams) * row_capacity, -7);
      row_probs.assign(row_slots.size(), -1.0f);
      for (int b = 0; b < streams; ++b) {
        std::vector<std::pair<int32_t, float>> rows = {{-2, self_probs[b]},
                                                       {-1, 0.5f}};
        for (int s = 0; s < slots; ++s) {
          float& r = probs[size_t(b) * slots + s];
          if (rng() % 2 == 0) r = 0.0f;
          if (r != 0.0f) rows.push_back({s, r});
        }
        std::shuffle(rows.begin(), rows.end(), rng);
        for (size_t j = 0; j < rows.size(); ++j) {
          row_slots[size_t(b) * row_capacity + j] = rows[j].first;
          row_probs[size_t(b) * row_capacity + j] = rows[j].second;
        }
        row_counts.push_back(int32_t(rows.size()));
      }
      dev.row_slots = Upload(row_slots, stream.get());
      dev.row_probs = Upload(row_probs, stream.get());
      dev.row_counts = Upload(row_counts, stream.get());
    }
    const std::vector<uint8_t> new_keys =
        testing::RandomRows(size_t(streams) * d, config.dtype, rng);
    const std::vector<uint8_t> new_values =
        testing::RandomRows(size_t(streams) * d, config.dtype, rng);
    Copy(dev.probs, probs.data(), state_slots * sizeof(float), stream);
    Copy(dev.self_probs, self_probs.data(), streams * sizeof(float), stream);
    Copy(dev.new_keys, new_keys.data(), streams * row_bytes, stream);
    Copy(dev.new_values, new_values.data(), streams * row_bytes, stream);
    // 0xff: −1 in the index outputs would read as "none"; 0xa5 catches that.
    const int poison = step % 2 == 0 ? 0xa5 : 0xff;
    for (const DeviceBuffer* out :
         {&dev.evicted_positions, &dev.evicted_keys, &dev.evicted_values,
          &dev.changed, &dev.changed_counts}) {
      ASSERT_TRUE(
          FillDevice(out->get(), poison, out->bytes(), stream.get()).ok());
    }
    CascadeStepInputs in;
    if (sparse) {
      in.row_slots = dev.row_slots.as<int32_t>();
      in.row_probs = dev.row_probs.as<float>();
      in.row_counts = dev.row_counts.as<int32_t>();
      in.row_capacity = row_capacity;
    } else {
      in.probs = attended ? dev.probs.as<float>() : nullptr;
      in.self_probs = attended ? dev.self_probs.as<float>() : nullptr;
    }
    in.keys = dev.new_keys.get();
    in.values = dev.new_values.get();
    absl::Status launched =
        UpdateCascades(shape, dev.State(), in, dev.Outputs(), stream.get());
    ASSERT_TRUE(launched.ok()) << launched;

    std::vector<InsertResult> results(streams);
    std::vector<DuelInfo> duels(streams);
    std::vector<int64_t> positions_before(streams);
    for (int b = 0; b < streams; ++b) {
      positions_before[b] = cpu[b].tokens_seen();
      CpuStep(cpu[b], attended,
              absl::MakeConstSpan(probs).subspan(size_t(b) * slots, slots),
              self_probs[b],
              absl::MakeConstSpan(new_keys).subspan(b * row_bytes, row_bytes),
              absl::MakeConstSpan(new_values).subspan(b * row_bytes, row_bytes),
              &results[b], &duels[b]);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
    }

    const auto got_positions =
        Download<int64_t>(dev.positions, state_slots, stream);
    const auto got_scores = Download<float>(dev.scores, state_slots, stream);
    const auto got_stored =
        Download<int32_t>(dev.stored, size_t(streams) * cascades, stream);
    const auto got_head =
        Download<int32_t>(dev.head, size_t(streams) * cascades, stream);
    const auto got_exponent = Download<int64_t>(dev.exponent, streams, stream);
    const auto got_seen = Download<int64_t>(dev.seen, streams, stream);
    const auto got_evicted =
        Download<int64_t>(dev.evicted_positions, streams, stream);
    const auto got_evicted_keys =
        Download<uint8_t>(dev.evicted_keys, streams * row_bytes, stream);
    const auto got_evicted_values =
        Download<uint8_t>(dev.evicted_values, streams * row_bytes, stream);
    const auto got_changed =
        Download<int32_t>(dev.changed, size_t(streams) * cascades, stream);
    const auto got_counts =
        Download<int32_t>(dev.changed_counts, streams, stream);
    const bool checkpoint =
        (step + 1) % kCheckpointEvery == 0 || step + 1 == kSteps;
    std::vector<uint8_t> got_keys, got_values;
    if (checkpoint) {
      got_keys =
          Download<uint8_t>(dev.keys, size_t(pool_rows) * row_bytes, stream);
      got_values =
          Download<uint8_t>(dev.values, size_t(pool_rows) * row_bytes, stream);
    }
    ASSERT_FALSE(::testing::Test::HasFailure());

    for (int b = 0; b < streams; ++b) {
      if (!alive[b]) continue;
      const CascadeStream& cs = cpu[b];
      const InsertResult& want = results[b];
      std::string diff;
      for (int s = 0; s < slots && diff.empty(); ++s) {
        const size_t at = size_t(b) * slots + s;
        if (got_positions[at] != cs.slot_position(s)) {
          diff = absl::StrCat("slot ", s, " position ", got_positions[at],
                              " vs ", cs.slot_position(s));
        } else if (FloatBits(got_scores[at]) != FloatBits(cs.slot_score(s))) {
          diff = absl::StrCat("slot ", s, " u ", got_scores[at], " vs ",
                              cs.slot_score(s));
        }
      }
      for (int i = 0; i < cascades && diff.empty(); ++i) {
        const size_t at = size_t(b) * cascades + i;
        if (got_stored[at] != cs.stored(i) || got_head[at] != cs.head(i)) {
          diff =
              absl::StrCat("cascade ", i, " stored/head ", got_stored[at], "/",
                           got_head[at], " vs ", cs.stored(i), "/", cs.head(i));
        }
      }
      if (diff.empty() && (got_exponent[b] != cs.score_exponent() ||
                           got_seen[b] != cs.tokens_seen())) {
        diff = absl::StrCat("n/tokens_seen ", got_exponent[b], "/", got_seen[b],
                            " vs ", cs.score_exponent(), "/", cs.tokens_seen());
      }
      const bool evicts = !want.evicted.positions.empty();
      const int64_t want_evicted = evicts ? want.evicted.positions[0] : -1;
      if (diff.empty() && (want.evicted.positions.size() > 1 ||
                           got_evicted[b] != want_evicted)) {
        diff = absl::StrCat("evicted ", got_evicted[b], " vs ", want_evicted,
                            " (", want.evicted.positions.size(), " tokens)");
      }
      if (diff.empty()) {
        const std::vector<uint8_t> zeros(row_bytes, 0);
        const uint8_t* want_key =
            evicts ? want.evicted.keys.data() : zeros.data();
        const uint8_t* want_value =
            evicts ? want.evicted.values.data() : zeros.data();
        if (std::memcmp(got_evicted_keys.data() + b * row_bytes, want_key,
                        row_bytes) != 0 ||
            std::memcmp(got_evicted_values.data() + b * row_bytes, want_value,
                        row_bytes) != 0) {
          diff = "evicted rows differ";
        }
      }
      if (diff.empty()) {
        std::vector<int32_t> want_changed(cascades, -1);
        for (size_t i = 0;
             i < want.changed_slots.size() && i < want_changed.size(); ++i) {
          want_changed[i] = want.changed_slots[i];
        }
        const std::vector<int32_t> got(
            got_changed.begin() + size_t(b) * cascades,
            got_changed.begin() + size_t(b + 1) * cascades);
        if (got != want_changed ||
            got_counts[b] != int(want.changed_slots.size())) {
          diff = absl::StrCat("changed slots (count ", got_counts[b], " vs ",
                              want.changed_slots.size(), ")");
        }
      }
      if (diff.empty() && checkpoint) {
        for (int s = 0; s < slots && diff.empty(); ++s) {
          const size_t row = size_t(slot_rows[size_t(b) * slots + s]);
          if (std::memcmp(got_keys.data() + row * row_bytes,
                          cs.key_row(s).data(), row_bytes) != 0 ||
              std::memcmp(got_values.data() + row * row_bytes,
                          cs.value_row(s).data(), row_bytes) != 0) {
            diff = absl::StrCat("slot ", s, " rows differ");
          }
        }
        ++counts->row_checks;
      }
      ++counts->stream_steps;
      counts->evictions += evicts;
      counts->sink_inserts += positions_before[b] < p.sinks;
      counts->duels += duels[b].duel;
      counts->long_chains += want.changed_slots.size() > 8;
      counts->near_tie_duels += duels[b].near_tie;
      counts->renormalisations += cs.score_exponent() == 0;
      counts->sparse_renormalisations += sparse && cs.score_exponent() == 0;
      if (diff.empty()) continue;
      alive[b] = false;
      if (duels[b].near_tie) {
        ++counts->near_tie_divergences;
        continue;
      }
      Fail(counts, absl::StrCat("stream ", b, " step ", step, " (position ",
                                positions_before[b], "): ", diff));
    }
    if (checkpoint) {  // rows no slot maps to stay as they were
      for (size_t i = state_slots; i < pool_order.size(); ++i) {
        const size_t row = size_t(pool_order[i]);
        if (std::memcmp(got_keys.data() + row * row_bytes,
                        initial_keys.data() + row * row_bytes,
                        row_bytes) != 0 ||
            std::memcmp(got_values.data() + row * row_bytes,
                        initial_values.data() + row * row_bytes,
                        row_bytes) != 0) {
          Fail(counts, absl::StrCat("unmapped pool row ", row, " written"));
        }
      }
    }
  }
}

TEST(CascadeUpdateTest, MatchesCpuPolicyStepByStep) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  std::vector<SweepConfig> configs;
  for (int sinks : {0, 2, 4}) {
    for (int cascades : {1, 2, 4}) {
      for (int window : {1, 3, 8, 16}) {
        for (bool eager : {true, false}) {
          for (double beta : {0.5, 0.9999999}) {
            for (int d : {64, 128}) {
              for (DType t : {DType::kBf16, DType::kFp32}) {
                SweepConfig c;
                c.params.sinks = sinks;
                c.params.cascades = cascades;
                c.params.window = window;
                c.params.eager_fill = eager;
                c.params.beta = beta;
                c.head_dim = d;
                c.dtype = t;
                configs.push_back(c);
              }
            }
          }
        }
      }
    }
  }
  // Rows that are not a multiple of 16 bytes (D 5) take the 2-byte path;
  // more than 8 cascades give chains that do not fit the kernel's
  // registers (eager fill pushes through every full cascade).
  struct Layout {
    int sinks, cascades, window;
  };
  for (Layout l : {Layout{2, 2, 3}, Layout{1, 12, 1}, Layout{3, 9, 2}}) {
    for (bool eager : {true, false}) {
      for (double beta : {0.5, 0.9999999}) {
        for (int d : {5, 64}) {
          for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
            SweepConfig c;
            c.params.sinks = l.sinks;
            c.params.cascades = l.cascades;
            c.params.window = l.window;
            c.params.eager_fill = eager;
            c.params.beta = beta;
            c.head_dim = d;
            c.dtype = t;
            configs.push_back(c);
          }
        }
      }
    }
  }
  SweepCounts counts;
  for (const SweepConfig& config : configs) {
    RunConfig(config, rng, &counts);
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf(
      "cascade update parity: %lld configs, %lld streams, %lld stream-steps "
      "compared, %lld sink inserts, %lld evictions, %lld duels (%lld "
      "near-ties; %lld streams diverged at one and were stopped), %lld "
      "renormalisations, %lld sparse steps (%lld renormalising stream-steps), "
      "%lld steps without attention, %lld row "
      "checkpoints, %lld insertions changing > 8 slots, %lld failures\n",
      (long long)counts.configs, (long long)counts.streams,
      (long long)counts.stream_steps, (long long)counts.sink_inserts,
      (long long)counts.evictions, (long long)counts.duels,
      (long long)counts.near_tie_duels, (long long)counts.near_tie_divergences,
      (long long)counts.renormalisations, (long long)counts.sparse_steps,
      (long long)counts.sparse_renormalisations,
      (long long)counts.steps_without_attention, (long long)counts.row_checks,
      (long long)counts.long_chains, (long long)counts.failures);
  EXPECT_EQ(counts.failures, 0);
  EXPECT_GT(counts.duels, 0);
  EXPECT_GT(counts.renormalisations, 0);
  EXPECT_GT(counts.sparse_steps, 0);
  EXPECT_GT(counts.sparse_renormalisations, 0);
  EXPECT_GT(counts.long_chains, 0);
}

// Every INVALID_ARGUMENT of the header, before anything touches a device
// (so this runs without one too).
TEST(CascadeUpdateTest, RejectsBadArguments) {
  // Never dereferenced: every call below fails validation first.
  int64_t i64 = 0;
  float f32 = 0;
  int32_t i32 = 0;
  uint8_t bytes[64] = {};
  CascadeBatchShape shape;
  shape.streams = 2;
  shape.params.sinks = 2;
  shape.params.cascades = 2;
  shape.params.window = 4;
  shape.head_dim = 8;
  CascadeDeviceState state{&i64, &f32,  &i32,  &i32, &i64,
                           &i64, bytes, bytes, &i32};
  CascadeStepInputs in{&f32, &f32, bytes, bytes};
  CascadeStepOutputs out{&i64, bytes, bytes, &i32, &i32};
  auto expect_invalid = [&](const CascadeBatchShape& sh,
                            const CascadeDeviceState& st,
                            const CascadeStepInputs& i,
                            const CascadeStepOutputs& o, const char* what) {
    const absl::Status status = UpdateCascades(sh, st, i, o, nullptr);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << what << ": " << status;
  };
  {
    CascadeBatchShape bad = shape;
    bad.streams = 0;
    expect_invalid(bad, state, in, out, "streams 0");
  }
  {
    CascadeBatchShape bad = shape;
    bad.params.window = 0;
    expect_invalid(bad, state, in, out, "window 0");
  }
  {
    CascadeBatchShape bad = shape;
    bad.params.cascades = kMaxUpdateCascades + 1;
    bad.params.window = 1;
    expect_invalid(bad, state, in, out, "too many cascades");
  }
  {
    CascadeBatchShape bad = shape;
    bad.head_dim = 0;
    expect_invalid(bad, state, in, out, "head_dim 0");
  }
  {
    CascadeBatchShape bad = shape;
    bad.dtype = static_cast<DType>(9);
    expect_invalid(bad, state, in, out, "dtype");
  }
  {
    CascadeDeviceState bad = state;
    bad.slot_rows = nullptr;
    expect_invalid(shape, bad, in, out, "slot_rows null");
  }
  {
    CascadeStepInputs bad = in;
    bad.self_probs = nullptr;
    expect_invalid(shape, state, bad, out, "probs without self_probs");
  }
  {
    CascadeStepInputs bad = in;
    bad.keys = nullptr;
    expect_invalid(shape, state, bad, out, "keys null");
  }
  {
    // Attended rows: with probs, without their probabilities or counts,
    // or with a capacity out of range.
    static const int32_t kSlots[1] = {0};
    static const float kProbs[1] = {0.5f};
    CascadeStepInputs rows = in;
    rows.probs = nullptr;
    rows.self_probs = nullptr;
    rows.row_slots = kSlots;
    rows.row_probs = kProbs;
    rows.row_counts = kSlots;
    rows.row_capacity = 1;
    CascadeStepInputs bad = rows;
    bad.probs = in.probs;
    bad.self_probs = in.self_probs;
    expect_invalid(shape, state, bad, out, "row_slots with probs");
    bad = rows;
    bad.row_probs = nullptr;
    expect_invalid(shape, state, bad, out, "row_slots without row_probs");
    bad = rows;
    bad.row_counts = nullptr;
    expect_invalid(shape, state, bad, out, "row_slots without row_counts");
    bad = rows;
    bad.row_capacity = 0;
    expect_invalid(shape, state, bad, out, "row_capacity 0");
    bad.row_capacity = kMaxSparseStepRows + 1;
    expect_invalid(shape, state, bad, out, "row_capacity over the limit");
  }
  {
    CascadeStepOutputs bad = out;
    bad.changed_counts = nullptr;
    expect_invalid(shape, state, in, bad, "changed_counts null");
  }
}

// 256 streams × 4160 slots (S 64, C 4, W 1024: the paper's PG19 setting
// per KV head), D 128 bf16, steady state (every cascade full, past eager
// fill). Eight states rotate so that scores and probabilities (8.5 MB a
// state) do not stay in the 50 MB L2. Prints the median of CUDA-event
// timings after a warm-up, against the bytes the step must move.
TEST(CascadeUpdateTest, TimesBatch256x4160) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  constexpr int kStreams = 256;
  constexpr int kStates = 8;
  constexpr int kWarmup = 8;
  constexpr int kTimed = 64;
  CascadeBatchShape shape;
  shape.streams = kStreams;
  shape.params.sinks = 64;
  shape.params.cascades = 4;
  shape.params.window = 1024;
  shape.head_dim = 128;
  shape.dtype = DType::kBf16;
  const CascadeParams& p = shape.params;
  const int slots = p.sinks + p.cascades * p.window;
  const size_t state_slots = size_t(kStreams) * slots;
  const size_t row_bytes = size_t(shape.head_dim) * 2;
  Stream stream = testing::MakeStream();

  std::vector<int32_t> slot_rows(state_slots);
  std::iota(slot_rows.begin(), slot_rows.end(), 0);
  DeviceBuffer d_slot_rows = Upload(slot_rows, stream.get());
  DeviceBuffer d_keys = Allocate(state_slots * row_bytes);
  DeviceBuffer d_values = Allocate(state_slots * row_bytes);
  ASSERT_TRUE(
      FillDevice(d_keys.get(), 0x3c, d_keys.bytes(), stream.get()).ok());
  ASSERT_TRUE(
      FillDevice(d_values.get(), 0x3c, d_values.bytes(), stream.get()).ok());
  const std::vector<uint8_t> new_rows =
      testing::RandomRows(size_t(kStreams) * shape.head_dim, shape.dtype, rng);
  DeviceBuffer d_new_keys = Upload(new_rows, stream.get());
  DeviceBuffer d_new_values = Upload(new_rows, stream.get());

  std::vector<DeviceBatch> states(kStates);
  for (DeviceBatch& dev : states) {
    std::vector<int64_t> positions(state_slots), exponents(kStreams),
        seen(kStreams);
    std::vector<float> scores(state_slots);
    std::vector<int32_t> stored(size_t(kStreams) * p.cascades, p.window);
    std::vector<int32_t> head(size_t(kStreams) * p.cascades);
    for (int b = 0; b < kStreams; ++b) {
      seen[b] = (int64_t{1} << 20) + b;  // varied accepting cascades
      exponents[b] = rng() % 1000000;
      for (int s = 0; s < slots; ++s) {
        positions[size_t(b) * slots + s] = s;  // any distinct positions
        scores[size_t(b) * slots + s] =
            s < p.sinks ? 0.0f : 1e-7f * float(1 + rng() % 1000);
      }
      for (int i = 0; i < p.cascades; ++i) {
        head[size_t(b) * p.cascades + i] = int32_t(rng() % p.window);
      }
    }
    dev.positions = Upload(positions, stream.get());
    dev.scores = Upload(scores, stream.get());
    dev.stored = Upload(stored, stream.get());
    dev.head = Upload(head, stream.get());
    dev.exponent = Upload(exponents, stream.get());
    dev.seen = Upload(seen, stream.get());
    dev.probs = Upload(RandomProbs(state_slots, rng), stream.get());
    dev.self_probs = Upload(RandomProbs(kStreams, rng), stream.get());
    dev.evicted_positions = Allocate(kStreams * sizeof(int64_t));
    dev.evicted_keys = Allocate(kStreams * row_bytes);
    dev.evicted_values = Allocate(kStreams * row_bytes);
    dev.changed = Allocate(size_t(kStreams) * p.cascades * sizeof(int32_t));
    dev.changed_counts = Allocate(kStreams * sizeof(int32_t));
  }
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto launch = [&](int i) {
    const DeviceBatch& dev = states[i % kStates];
    CascadeDeviceState state = dev.State();
    state.key_rows = d_keys.get();  // one pool: the rows moved are few
    state.value_rows = d_values.get();
    state.slot_rows = d_slot_rows.as<int32_t>();
    CascadeStepInputs in{dev.probs.as<float>(), dev.self_probs.as<float>(),
                         d_new_keys.get(), d_new_values.get()};
    return UpdateCascades(shape, state, in, dev.Outputs(), stream.get());
  };
  for (int i = 0; i < kWarmup; ++i) ASSERT_TRUE(launch(i).ok());
  absl::StatusOr<Event> start = Event::Create(true);
  absl::StatusOr<Event> stop = Event::Create(true);
  ASSERT_TRUE(start.ok() && stop.ok());
  std::vector<float> times_us;
  for (int i = 0; i < kTimed; ++i) {
    ASSERT_TRUE(start->Record(stream.get()).ok());
    const absl::Status launched = launch(kWarmup + i);
    ASSERT_TRUE(launched.ok()) << launched;
    ASSERT_TRUE(stop->Record(stream.get()).ok());
    ASSERT_TRUE(stop->Synchronize().ok());
    absl::StatusOr<float> ms = stop->ElapsedMsSince(*start);
    ASSERT_TRUE(ms.ok()) << ms.status();
    times_us.push_back(*ms * 1000.0f);
  }
  std::sort(times_us.begin(), times_us.end());
  // Bytes a step must move: per stream, probabilities read and u read and
  // written for every cascade slot, and at most C + 1 rows of each pool
  // read and written plus the new and evicted rows.
  const double bytes =
      double(kStreams) *
      (double(p.cascades) * p.window * 12.0 +
       (2.0 * (p.cascades + 1) + 2.0) * 2.0 * double(row_bytes));
  const double floor_us = bytes / 3.0e12 * 1e6;  // 3.0 TB/s: H100 copy
  std::printf(
      "workload | measured us | floor us | x floor | bytes\n"
      "cascade update b256 x 4160 (%s) | %.1f | %.1f | %.2f | %.0f\n",
      ProbeDevices().device_name.c_str(), times_us[times_us.size() / 2],
      floor_us, times_us[times_us.size() / 2] / floor_us, bytes);
}

}  // namespace
}  // namespace kvmem::cuda
