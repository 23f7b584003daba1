// InsertChunks (kernels/cuda/chunk_insert.h) against the CPU oracle
// CascadeStream::InsertTokens. Each stream's history is built on the CPU
// (UpdateScores with random probabilities, or none, then InsertTokens with
// random rows, in chunks of random length); then, for the compared chunk,
// the CPU's UpdateScores runs, its exported state is uploaded (rows through
// a shuffled slot_rows table, spare pool rows random), the device inserts
// the chunk with the CPU's initial scores and the CPU's InsertTokens does
// the same. Positions, u (bit for bit), stored/head, tokens_seen, every
// pool row, the evicted tokens and the changed slots must match exactly:
// both sides duel on the same u, so no near-tie exemption applies.
// Outputs and scratch are poisoned before each launch.
#include "kernels/cuda/chunk_insert.h"

#include <algorithm>
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

constexpr int kMaxReportedFailures = 20;
constexpr int kLongWalk = 8;  // cascades pushed through: chains past registers

struct ChunkConfig {
  CascadeParams params;
  int chunk_tokens = 1;
  int head_dim = 64;
  DType dtype = DType::kBf16;
  int max_streams = 6;
  bool stream_pointers = false;  // state through CascadeStreamPointers
  bool token_major = true;       // chunk rows [T, B, D], else [B, T, D]
  int row_padding = 0;           // elements after each row ([B, T, D] only)
  bool first_from_zero = false;  // stream 0 starts the chunk at t = 0
  int max_history = 0;           // tokens; 0: S + W·(2^C + 2)
  int forced_history = -1;       // stream 1's history when ≥ 0
  // History without attention, then random u for every resident (cheap
  // histories for large windows).
  bool random_scores = false;

  std::string Describe() const {
    return absl::StrCat(
        "S=", params.sinks, " C=", params.cascades, " W=", params.window,
        " eager=", params.eager_fill, " T=", chunk_tokens, " D=", head_dim, " ",
        testing::DTypeName(dtype), stream_pointers ? " pointers" : "",
        token_major ? " [T,B,D]" : " [B,T,D]",
        row_padding > 0 ? absl::StrCat(" pad ", row_padding) : "",
        random_scores ? " random u" : "");
  }
};

struct ChunkCounts {
  int64_t configs = 0;
  int64_t streams = 0;
  int64_t tokens = 0;
  int64_t sink_tokens = 0;
  int64_t appends = 0;     // rule a
  int64_t overwrites = 0;  // rule b
  int64_t rule_c = 0;
  int64_t duels = 0;  // rule d
  int64_t long_walks = 0;
  int64_t evictions = 0;
  int64_t changed_slots = 0;
  int64_t failures = 0;
};

void Fail(ChunkCounts* counts, const std::string& message) {
  if (++counts->failures <= kMaxReportedFailures) ADD_FAILURE() << message;
}

// The rules the next T tokens of `cs` meet (occupancy alone decides them).
void CountRules(const CascadeStream& cs, int tokens, ChunkCounts* counts) {
  const CascadeParams& p = cs.params();
  std::vector<int> stored(p.cascades);
  for (int i = 0; i < p.cascades; ++i) stored[i] = cs.stored(i);
  for (int j = 0; j < tokens; ++j) {
    const int64_t t = cs.tokens_seen() + j;
    if (t < p.sinks) {
      ++counts->sink_tokens;
      continue;
    }
    const int k =
        AcceptingCascades(t, p.sinks, p.cascades, p.window, p.eager_fill);
    int walked = 0;
    for (int i = 0; i < p.cascades; ++i) {
      if (i < k && stored[i] < p.window) {
        ++stored[i];
        ++counts->appends;
        break;
      }
      if (i < k) {
        ++counts->overwrites;
        ++walked;
        continue;
      }
      if (stored[i] == 0) {
        stored[i] = 1;
        ++counts->rule_c;
      } else {
        ++counts->duels;
      }
      break;
    }
    counts->long_walks += walked >= kLongWalk;
  }
}

std::vector<float> RandomProbs(size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> prob(1e-3f, 1.0f);
  std::vector<float> probs(count);
  for (float& p : probs) p = prob(rng);
  return probs;
}

// UpdateScores for `tokens` new tokens, with random probabilities or
// (attended false) without attention; writes their initial scores.
void CpuScores(CascadeStream& cs, int tokens, bool attended, std::mt19937& rng,
               absl::Span<float> initial) {
  std::vector<float> probs, self_probs;
  if (attended) {
    probs = RandomProbs(size_t(tokens) * cs.num_slots(), rng);
    self_probs = RandomProbs(size_t(tokens) * tokens, rng);
  }
  const absl::Status status =
      cs.UpdateScores(tokens, probs, self_probs, initial);
  ASSERT_TRUE(status.ok()) << status;
}

// A stream of `history` tokens, inserted in chunks of 1..W.
void BuildHistory(const ChunkConfig& config, int64_t history, int row_bytes,
                  std::mt19937& rng, CascadeStream* cs) {
  const CascadeParams& p = config.params;
  while (cs->tokens_seen() < history) {
    const int tokens = int(
        std::min<int64_t>(std::uniform_int_distribution<int>(1, p.window)(rng),
                          history - cs->tokens_seen()));
    std::vector<float> initial(tokens);
    const bool attended = !config.random_scores && rng() % 4 != 0;
    CpuScores(*cs, tokens, attended, rng, absl::MakeSpan(initial));
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    const size_t dtype_elements =
        size_t(tokens) * row_bytes / size_t(DTypeBytes(config.dtype));
    const std::vector<uint8_t> keys =
        testing::RandomRows(dtype_elements, config.dtype, rng);
    const std::vector<uint8_t> values =
        testing::RandomRows(dtype_elements, config.dtype, rng);
    InsertResult ignored;
    const absl::Status status = cs->InsertTokens(
        cs->tokens_seen(), tokens, keys, values, initial, &ignored);
    ASSERT_TRUE(status.ok()) << status;
  }
  if (config.random_scores) {  // random u for the residents (sinks keep 0)
    CascadeStream::Snapshot snap = cs->Export();
    std::uniform_real_distribution<float> u(0.0f, 1e-3f);
    for (size_t s = p.sinks; s < snap.scores.size(); ++s) {
      if (snap.positions[s] >= 0) snap.scores[s] = u(rng);
    }
    absl::StatusOr<CascadeStream> made =
        CascadeStream::Import(p, row_bytes, std::move(snap));
    ASSERT_TRUE(made.ok()) << made.status();
    *cs = std::move(*made);
  }
}

DeviceBuffer Filled(size_t bytes, int byte, const Stream& stream) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(bytes + 16);
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  if (!buffer.ok()) return DeviceBuffer();
  EXPECT_TRUE(FillDevice(buffer->get(), byte, bytes + 16, stream.get()).ok());
  return std::move(*buffer);
}

// First differing element of two equal-length arrays, or "".
template <typename T>
std::string FirstDifference(const char* what, const T* got, const T* want,
                            size_t count) {
  for (size_t i = 0; i < count; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return absl::StrCat(what, "[", i, "] ", got[i], " vs ", want[i]);
    }
  }
  return "";
}

void RunConfig(const ChunkConfig& config, std::mt19937& rng,
               ChunkCounts* counts) {
  SCOPED_TRACE(config.Describe());
  const CascadeParams& p = config.params;
  const int slots = p.sinks + p.cascades * p.window;
  const int cascades = p.cascades;
  const int tokens = config.chunk_tokens;
  const int d = config.head_dim;
  const int row_bytes = d * DTypeBytes(config.dtype);
  const int streams =
      std::uniform_int_distribution<int>(2, config.max_streams)(rng);
  const int64_t max_history =
      config.max_history > 0
          ? config.max_history
          : p.sinks + int64_t{p.window} * ((int64_t{1} << p.cascades) + 2);
  ++counts->configs;
  counts->streams += streams;
  counts->tokens += int64_t{streams} * tokens;

  // Histories, then the chunk's scores on the CPU.
  std::vector<CascadeStream> cpu;
  std::vector<float> initial(size_t(streams) * tokens);
  std::vector<CascadeStream::Snapshot> before;
  for (int b = 0; b < streams; ++b) {
    absl::StatusOr<CascadeStream> made = CascadeStream::Create(p, row_bytes);
    ASSERT_TRUE(made.ok()) << made.status();
    int64_t history =
        std::uniform_int_distribution<int64_t>(0, max_history)(rng);
    if (b == 0 && config.first_from_zero) history = 0;
    if (b == 1 && config.forced_history >= 0) history = config.forced_history;
    BuildHistory(config, history, row_bytes, rng, &*made);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    CpuScores(*made, tokens, rng() % 4 != 0, rng,
              absl::MakeSpan(initial).subspan(size_t(b) * tokens, tokens));
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    CountRules(*made, tokens, counts);
    before.push_back(made->Export());
    cpu.push_back(std::move(*made));
  }

  // Where stream b's state lies in the batch arrays: its own row, or a
  // shuffled one reached through its CascadeStreamPointers.
  std::vector<int> at(streams);
  std::iota(at.begin(), at.end(), 0);
  if (config.stream_pointers) std::shuffle(at.begin(), at.end(), rng);
  const int pool_rows = streams * slots + streams + 3;
  std::vector<int32_t> pool_order(pool_rows);
  std::iota(pool_order.begin(), pool_order.end(), 0);
  std::shuffle(pool_order.begin(), pool_order.end(), rng);
  const std::vector<int32_t> slot_rows(pool_order.begin(),
                                       pool_order.begin() + streams * slots);
  const size_t state_slots = size_t(streams) * slots;
  const std::vector<uint8_t> initial_keys =
      testing::RandomRows(size_t(pool_rows) * d, config.dtype, rng);
  const std::vector<uint8_t> initial_values =
      testing::RandomRows(size_t(pool_rows) * d, config.dtype, rng);
  std::vector<uint8_t> key_pool = initial_keys;
  std::vector<uint8_t> value_pool = initial_values;
  std::vector<int64_t> positions(state_slots), exponents(streams),
      seen(streams);
  std::vector<float> scores(state_slots);
  std::vector<int32_t> stored(size_t(streams) * cascades);
  std::vector<int32_t> head(size_t(streams) * cascades);
  for (int b = 0; b < streams; ++b) {
    const CascadeStream::Snapshot& snap = before[b];
    const size_t row = size_t(at[b]);
    std::copy(snap.positions.begin(), snap.positions.end(),
              positions.begin() + row * slots);
    std::copy(snap.scores.begin(), snap.scores.end(),
              scores.begin() + row * slots);
    std::copy(snap.stored.begin(), snap.stored.end(),
              stored.begin() + row * cascades);
    std::copy(snap.head.begin(), snap.head.end(),
              head.begin() + row * cascades);
    exponents[row] = snap.score_exponent;
    seen[row] = snap.tokens_seen;
    for (int s = 0; s < slots; ++s) {
      const size_t pool_row = size_t(slot_rows[row * slots + s]);
      std::memcpy(key_pool.data() + pool_row * row_bytes,
                  snap.keys.data() + size_t(s) * row_bytes, row_bytes);
      std::memcpy(value_pool.data() + pool_row * row_bytes,
                  snap.values.data() + size_t(s) * row_bytes, row_bytes);
    }
  }

  // The chunk's rows: canonical [B, T] order on the host, laid out on the
  // device with the config's strides (gaps hold random bytes).
  const size_t chunk_elements = size_t(streams) * tokens * d;
  const std::vector<uint8_t> new_keys =
      testing::RandomRows(chunk_elements, config.dtype, rng);
  const std::vector<uint8_t> new_values =
      testing::RandomRows(chunk_elements, config.dtype, rng);
  ChunkInsertInputs in;
  if (config.token_major) {
    in.stream_stride = d;
    in.token_stride = int64_t{streams} * d;
  } else {
    in.token_stride = d + config.row_padding;
    in.stream_stride = int64_t{tokens} * in.token_stride;
  }
  const size_t wire_elements = size_t(in.stream_stride) * (streams - 1) +
                               size_t(in.token_stride) * (tokens - 1) +
                               size_t(d);
  std::vector<uint8_t> wire_keys =
      testing::RandomRows(wire_elements, config.dtype, rng);
  std::vector<uint8_t> wire_values =
      testing::RandomRows(wire_elements, config.dtype, rng);
  for (int b = 0; b < streams; ++b) {
    for (int j = 0; j < tokens; ++j) {
      const size_t to = size_t(b * in.stream_stride + j * in.token_stride) *
                        DTypeBytes(config.dtype);
      const size_t from = (size_t(b) * tokens + j) * row_bytes;
      std::memcpy(wire_keys.data() + to, new_keys.data() + from, row_bytes);
      std::memcpy(wire_values.data() + to, new_values.data() + from, row_bytes);
    }
  }

  Stream stream = testing::MakeStream();
  DeviceBuffer dev_positions = Upload(positions, stream.get());
  DeviceBuffer dev_scores = Upload(scores, stream.get());
  DeviceBuffer dev_stored = Upload(stored, stream.get());
  DeviceBuffer dev_head = Upload(head, stream.get());
  DeviceBuffer dev_exponents = Upload(exponents, stream.get());
  DeviceBuffer dev_seen = Upload(seen, stream.get());
  DeviceBuffer dev_keys = Upload(key_pool, stream.get());
  DeviceBuffer dev_values = Upload(value_pool, stream.get());
  DeviceBuffer dev_slot_rows = Upload(slot_rows, stream.get());
  DeviceBuffer dev_wire_keys = Upload(wire_keys, stream.get());
  DeviceBuffer dev_wire_values = Upload(wire_values, stream.get());
  DeviceBuffer dev_initial = Upload(initial, stream.get());
  ASSERT_FALSE(::testing::Test::HasFailure());

  CascadeDeviceState state;
  state.key_rows = dev_keys.get();
  state.value_rows = dev_values.get();
  DeviceBuffer dev_pointers;
  if (config.stream_pointers) {
    std::vector<CascadeStreamPointers> pointers(streams);
    for (int b = 0; b < streams; ++b) {
      const size_t row = size_t(at[b]);
      pointers[b].positions = dev_positions.as<int64_t>() + row * slots;
      pointers[b].scores = dev_scores.as<float>() + row * slots;
      pointers[b].stored = dev_stored.as<int32_t>() + row * cascades;
      pointers[b].head = dev_head.as<int32_t>() + row * cascades;
      pointers[b].score_exponent = dev_exponents.as<int64_t>() + row;
      pointers[b].tokens_seen = dev_seen.as<int64_t>() + row;
      pointers[b].slot_rows = dev_slot_rows.as<int32_t>() + row * slots;
    }
    dev_pointers = Upload(pointers, stream.get());
    state.streams = dev_pointers.as<CascadeStreamPointers>();
  } else {  // score_exponent left null: the insertion never touches it
    state.positions = dev_positions.as<int64_t>();
    state.scores = dev_scores.as<float>();
    state.stored = dev_stored.as<int32_t>();
    state.head = dev_head.as<int32_t>();
    state.tokens_seen = dev_seen.as<int64_t>();
    state.slot_rows = dev_slot_rows.as<int32_t>();
  }
  in.keys = dev_wire_keys.get();
  in.values = dev_wire_values.get();
  in.initial_scores = dev_initial.as<float>();

  ChunkInsertShape shape;
  shape.batch.streams = streams;
  shape.batch.params = p;
  shape.batch.head_dim = d;
  shape.batch.dtype = config.dtype;
  shape.chunk_tokens = tokens;
  // 0xff: −1 in the index outputs would read as "none"; 0xa5 catches that.
  const int poison = rng() % 2 == 0 ? 0xa5 : 0xff;
  const size_t evicted_row_bytes = size_t(streams) * tokens * row_bytes;
  const size_t max_changed = size_t(streams) * tokens * cascades;
  DeviceBuffer out_positions =
      Filled(size_t(streams) * tokens * 8, poison, stream);
  DeviceBuffer out_counts = Filled(size_t(streams) * 4, poison, stream);
  DeviceBuffer out_keys = Filled(evicted_row_bytes, poison, stream);
  DeviceBuffer out_values = Filled(evicted_row_bytes, poison, stream);
  DeviceBuffer out_changed = Filled(max_changed * 4, poison, stream);
  DeviceBuffer out_changed_counts = Filled(size_t(streams) * 4, poison, stream);
  const size_t scratch_bytes = ChunkInsertScratchBytes(shape);
  ASSERT_GT(scratch_bytes, 0u);
  DeviceBuffer scratch = Filled(scratch_bytes, 0xa5, stream);
  ASSERT_FALSE(::testing::Test::HasFailure());
  ChunkInsertOutputs out;
  out.evicted_positions = out_positions.as<int64_t>();
  out.evicted_counts = out_counts.as<int32_t>();
  out.evicted_keys = out_keys.get();
  out.evicted_values = out_values.get();
  out.changed_slots = out_changed.as<int32_t>();
  out.changed_counts = out_changed_counts.as<int32_t>();

  const absl::Status launched = InsertChunks(
      shape, state, in, out, scratch.get(), scratch_bytes, stream.get());
  ASSERT_TRUE(launched.ok()) << launched;

  std::vector<InsertResult> results(streams);
  for (int b = 0; b < streams; ++b) {
    const size_t from = size_t(b) * tokens * row_bytes;
    const size_t bytes = size_t(tokens) * row_bytes;
    const absl::Status status = cpu[b].InsertTokens(
        before[b].tokens_seen, tokens,
        absl::MakeConstSpan(new_keys).subspan(from, bytes),
        absl::MakeConstSpan(new_values).subspan(from, bytes),
        absl::MakeConstSpan(initial).subspan(size_t(b) * tokens, tokens),
        &results[b]);
    ASSERT_TRUE(status.ok()) << status;
  }

  const auto got_positions =
      Download<int64_t>(dev_positions, state_slots, stream);
  const auto got_scores = Download<float>(dev_scores, state_slots, stream);
  const auto got_stored =
      Download<int32_t>(dev_stored, size_t(streams) * cascades, stream);
  const auto got_head =
      Download<int32_t>(dev_head, size_t(streams) * cascades, stream);
  const auto got_exponents = Download<int64_t>(dev_exponents, streams, stream);
  const auto got_seen = Download<int64_t>(dev_seen, streams, stream);
  const auto got_keys =
      Download<uint8_t>(dev_keys, size_t(pool_rows) * row_bytes, stream);
  const auto got_values =
      Download<uint8_t>(dev_values, size_t(pool_rows) * row_bytes, stream);
  const auto got_evicted =
      Download<int64_t>(out_positions, size_t(streams) * tokens, stream);
  const auto got_evicted_counts =
      Download<int32_t>(out_counts, streams, stream);
  const auto got_evicted_keys =
      Download<uint8_t>(out_keys, evicted_row_bytes, stream);
  const auto got_evicted_values =
      Download<uint8_t>(out_values, evicted_row_bytes, stream);
  const auto got_changed = Download<int32_t>(out_changed, max_changed, stream);
  const auto got_changed_counts =
      Download<int32_t>(out_changed_counts, streams, stream);
  ASSERT_FALSE(::testing::Test::HasFailure());

  const std::vector<uint8_t> zero_rows(size_t(tokens) * row_bytes, 0);
  for (int b = 0; b < streams; ++b) {
    const CascadeStream& cs = cpu[b];
    const InsertResult& want = results[b];
    const size_t row = size_t(at[b]);
    const size_t evicted = want.evicted.positions.size();
    counts->evictions += int64_t(evicted);
    counts->changed_slots += int64_t(want.changed_slots.size());
    const CascadeStream::Snapshot after = cs.Export();
    std::string diff = FirstDifference("position", &got_positions[row * slots],
                                       after.positions.data(), slots);
    if (diff.empty()) {
      diff = FirstDifference("u bits", &got_scores[row * slots],
                             after.scores.data(), slots);
    }
    if (diff.empty()) {
      diff = FirstDifference("stored", &got_stored[row * cascades],
                             after.stored.data(), cascades);
    }
    if (diff.empty()) {
      diff = FirstDifference("head", &got_head[row * cascades],
                             after.head.data(), cascades);
    }
    if (diff.empty() && got_seen[row] != cs.tokens_seen()) {
      diff =
          absl::StrCat("tokens_seen ", got_seen[row], " vs ", cs.tokens_seen());
    }
    if (diff.empty() && got_exponents[row] != before[b].score_exponent) {
      diff = absl::StrCat("score_exponent ", got_exponents[row], " vs ",
                          before[b].score_exponent, " (must not change)");
    }
    if (diff.empty() && got_evicted_counts[b] != int(evicted)) {
      diff = absl::StrCat("evicted count ", got_evicted_counts[b], " vs ",
                          evicted);
    }
    if (diff.empty()) {
      std::vector<int64_t> want_positions(tokens, -1);
      std::copy(want.evicted.positions.begin(), want.evicted.positions.end(),
                want_positions.begin());
      diff =
          FirstDifference("evicted position", &got_evicted[size_t(b) * tokens],
                          want_positions.data(), tokens);
    }
    if (diff.empty()) {
      const size_t from = size_t(b) * tokens * row_bytes;
      const size_t want_bytes = evicted * row_bytes;
      const size_t pad_bytes = size_t(tokens) * row_bytes - want_bytes;
      if (std::memcmp(&got_evicted_keys[from], want.evicted.keys.data(),
                      want_bytes) != 0 ||
          std::memcmp(&got_evicted_values[from], want.evicted.values.data(),
                      want_bytes) != 0) {
        diff = "evicted rows differ";
      } else if (std::memcmp(&got_evicted_keys[from + want_bytes],
                             zero_rows.data(), pad_bytes) != 0 ||
                 std::memcmp(&got_evicted_values[from + want_bytes],
                             zero_rows.data(), pad_bytes) != 0) {
        diff = "evicted padding rows are not zero";
      }
    }
    if (diff.empty() &&
        got_changed_counts[b] != int(want.changed_slots.size())) {
      diff = absl::StrCat("changed count ", got_changed_counts[b], " vs ",
                          want.changed_slots.size());
    }
    if (diff.empty()) {
      std::vector<int32_t> want_changed(size_t(tokens) * cascades, -1);
      std::copy(want.changed_slots.begin(), want.changed_slots.end(),
                want_changed.begin());
      diff = FirstDifference("changed slot",
                             &got_changed[size_t(b) * tokens * cascades],
                             want_changed.data(), want_changed.size());
    }
    for (int s = 0; s < slots && diff.empty(); ++s) {
      const size_t pool_row = size_t(slot_rows[row * slots + s]);
      if (std::memcmp(got_keys.data() + pool_row * row_bytes,
                      cs.key_row(s).data(), row_bytes) != 0 ||
          std::memcmp(got_values.data() + pool_row * row_bytes,
                      cs.value_row(s).data(), row_bytes) != 0) {
        diff = absl::StrCat("slot ", s, " rows differ");
      }
    }
    if (!diff.empty()) {
      Fail(counts, absl::StrCat("stream ", b, " (chunk at position ",
                                before[b].tokens_seen, "): ", diff));
    }
  }
  for (size_t i = state_slots; i < pool_order.size(); ++i) {
    const size_t pool_row = size_t(pool_order[i]);
    if (std::memcmp(got_keys.data() + pool_row * row_bytes,
                    initial_keys.data() + pool_row * row_bytes,
                    row_bytes) != 0 ||
        std::memcmp(got_values.data() + pool_row * row_bytes,
                    initial_values.data() + pool_row * row_bytes,
                    row_bytes) != 0) {
      Fail(counts, absl::StrCat("unmapped pool row ", pool_row, " written"));
    }
  }
}

ChunkConfig MakeConfig(int sinks, int cascades, int window, bool eager,
                       int tokens) {
  ChunkConfig c;
  c.params.sinks = sinks;
  c.params.cascades = cascades;
  c.params.window = window;
  c.params.eager_fill = eager;
  c.params.beta = 0.5;  // strong decay: scores spread, duels go both ways
  c.chunk_tokens = tokens;
  c.first_from_zero = tokens == window;
  return c;
}

void PrintCounts(const char* name, const ChunkCounts& c) {
  std::printf(
      "%s: %lld configs, %lld streams, %lld chunk tokens (%lld sinks, %lld "
      "rule a, %lld rule b, %lld rule c, %lld duels, %lld walks through >= "
      "%d cascades), %lld evictions, %lld changed slots, %lld failures\n",
      name, (long long)c.configs, (long long)c.streams, (long long)c.tokens,
      (long long)c.sink_tokens, (long long)c.appends, (long long)c.overwrites,
      (long long)c.rule_c, (long long)c.duels, (long long)c.long_walks,
      kLongWalk, (long long)c.evictions, (long long)c.changed_slots,
      (long long)c.failures);
}

TEST(ChunkInsertTest, MatchesCpuInsertTokens) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  std::vector<ChunkConfig> configs;
  int index = 0;
  for (int sinks : {0, 2, 4}) {
    for (int cascades : {1, 2, 4}) {
      for (int window : {4, 16, 64}) {
        for (bool eager : {true, false}) {
          for (int tokens : {1, 3, window}) {
            ChunkConfig c = MakeConfig(sinks, cascades, window, eager, tokens);
            c.dtype = index % 2 == 0 ? DType::kBf16 : DType::kFp32;
            c.stream_pointers = index % 3 == 0;
            c.token_major = (index / 2) % 2 == 0;
            c.params.beta = index % 5 == 0 ? 0.9999999 : 0.5;
            configs.push_back(c);
            ++index;
          }
        }
      }
    }
  }
  // 2-byte row moves (D·e not a multiple of 16), padded [B, T, D] rows.
  for (bool eager : {true, false}) {
    ChunkConfig c = MakeConfig(2, 2, 16, eager, 16);
    c.head_dim = 5;
    c.dtype = DType::kFp16;
    c.token_major = false;
    c.row_padding = 3;
    configs.push_back(c);
    c.chunk_tokens = 7;
    c.stream_pointers = true;
    configs.push_back(c);
  }
  // D 128 bf16 (the benchmark's rows) with padding that keeps 16-byte rows.
  {
    ChunkConfig c = MakeConfig(4, 4, 32, false, 32);
    c.head_dim = 128;
    c.token_major = false;
    c.row_padding = 8;
    configs.push_back(c);
  }
  // Rule c: without eager fill and with an odd W, token S + W (offset W,
  // accepted by cascade 0 alone) is carried into the still empty cascade 1.
  // Stream 1's chunk holds that token.
  for (int window : {3, 5, 7}) {
    for (int cascades : {2, 3}) {
      for (int tokens : {1, 3, window}) {
        ChunkConfig c = MakeConfig(2, cascades, window, false, tokens);
        c.max_history = 2 + 4 * window;
        c.forced_history = 2 + window - tokens + 1;
        c.dtype = cascades == 2 ? DType::kBf16 : DType::kFp32;
        c.stream_pointers = window == 5;
        configs.push_back(c);
      }
    }
  }
  // Walks through more than 8 cascades (eager fill pushes through every
  // full one): chains that do not fit the move kernel's registers. Stream
  // 1's chunk starts once cascades 0..8 (0..7) are full.
  for (int tokens : {1, 2}) {
    ChunkConfig c = MakeConfig(1, 12, 2, true, tokens);
    c.max_history = 1 + 12 * 2 + 2;
    c.forced_history = 1 + 18;
    c.head_dim = 16;
    configs.push_back(c);
  }
  for (bool eager : {true, false}) {
    ChunkConfig c = MakeConfig(3, 9, 4, eager, 4);
    c.max_history = eager ? 3 + 9 * 4 + 4 : 0;
    c.forced_history = eager ? 3 + 33 : -1;
    c.dtype = DType::kFp32;
    c.stream_pointers = true;
    configs.push_back(c);
  }
  ChunkCounts counts;
  for (const ChunkConfig& config : configs) {
    RunConfig(config, rng, &counts);
    if (::testing::Test::HasFatalFailure()) return;
  }
  PrintCounts("chunk insert parity", counts);
  EXPECT_EQ(counts.failures, 0);
  EXPECT_GT(counts.sink_tokens, 0);
  EXPECT_GT(counts.appends, 0);
  EXPECT_GT(counts.overwrites, 0);
  EXPECT_GT(counts.rule_c, 0);
  EXPECT_GT(counts.duels, 0);
  EXPECT_GT(counts.long_walks, 0);
  EXPECT_GT(counts.evictions, 0);
}

// Chunks longer than the plan kernel's 1024-item scan rounds (T up to W =
// 1500, three cascades), with histories inserted without attention and
// random u given to the residents afterwards.
TEST(ChunkInsertTest, MatchesCpuInsertTokensLongChunks) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  ChunkCounts counts;
  for (bool eager : {true, false}) {
    for (int tokens : {1025, 1500}) {
      ChunkConfig c = MakeConfig(4, 3, 1500, eager, tokens);
      c.params.beta = 0.9999999;
      c.random_scores = true;
      c.max_streams = 3;
      c.head_dim = 32;
      c.first_from_zero = tokens == 1500 && eager;
      c.stream_pointers = !eager;
      RunConfig(c, rng, &counts);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
  PrintCounts("long chunk insert parity", counts);
  EXPECT_EQ(counts.failures, 0);
  EXPECT_GT(counts.duels, 0);
  EXPECT_GT(counts.evictions, 0);
}

// Every INVALID_ARGUMENT of the header, before anything touches a device
// (so this runs without one too).
TEST(ChunkInsertTest, RejectsBadArguments) {
  // Never dereferenced: every call below fails validation first.
  int64_t i64 = 0;
  float f32 = 0;
  int32_t i32 = 0;
  alignas(16) uint8_t bytes[64] = {};
  ChunkInsertShape shape;
  shape.batch.streams = 2;
  shape.batch.params.sinks = 2;
  shape.batch.params.cascades = 2;
  shape.batch.params.window = 4;
  shape.batch.head_dim = 8;
  shape.chunk_tokens = 3;
  CascadeDeviceState state;
  state.positions = &i64;
  state.scores = &f32;
  state.stored = &i32;
  state.head = &i32;
  state.tokens_seen = &i64;
  state.key_rows = bytes;
  state.value_rows = bytes;
  state.slot_rows = &i32;
  ChunkInsertInputs in{bytes, bytes, 8, 16, &f32};
  ChunkInsertOutputs out{&i64, &i32, bytes, bytes, &i32, &i32};
  const size_t scratch_bytes = ChunkInsertScratchBytes(shape);
  EXPECT_GT(scratch_bytes, 0u);
  auto expect_invalid =
      [&](const ChunkInsertShape& sh, const CascadeDeviceState& st,
          const ChunkInsertInputs& i, const ChunkInsertOutputs& o,
          void* scratch, size_t scratch_size, const char* what) {
        const absl::Status status =
            InsertChunks(sh, st, i, o, scratch, scratch_size, nullptr);
        EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
            << what << ": " << status;
      };
  auto expect_invalid_shape = [&](const ChunkInsertShape& sh,
                                  const char* what) {
    expect_invalid(sh, state, in, out, bytes, size_t{1} << 30, what);
  };
  {
    ChunkInsertShape bad = shape;
    bad.chunk_tokens = 0;
    expect_invalid_shape(bad, "chunk_tokens 0");
  }
  {
    ChunkInsertShape bad = shape;
    bad.chunk_tokens = shape.batch.params.window + 1;
    expect_invalid_shape(bad, "chunk_tokens > window");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.streams = 0;
    expect_invalid_shape(bad, "streams 0");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.params.window = 0;
    expect_invalid_shape(bad, "window 0");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.params.cascades = kMaxUpdateCascades + 1;
    bad.batch.params.window = 4;
    expect_invalid_shape(bad, "too many cascades");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.head_dim = 0;
    expect_invalid_shape(bad, "head_dim 0");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.head_dim = (1 << 20) / 2 + 1;
    expect_invalid_shape(bad, "rows over 1 MiB");
  }
  {
    ChunkInsertShape bad = shape;
    bad.batch.dtype = static_cast<DType>(9);
    expect_invalid_shape(bad, "dtype");
  }
  {
    CascadeDeviceState bad = state;
    bad.slot_rows = nullptr;
    expect_invalid(shape, bad, in, out, bytes, scratch_bytes, "slot_rows");
  }
  {
    CascadeDeviceState bad = state;
    bad.key_rows = nullptr;
    expect_invalid(shape, bad, in, out, bytes, scratch_bytes, "key_rows");
  }
  {
    CascadeDeviceState bad = state;
    bad.tokens_seen = nullptr;
    expect_invalid(shape, bad, in, out, bytes, scratch_bytes, "tokens_seen");
  }
  {
    ChunkInsertInputs bad = in;
    bad.keys = nullptr;
    expect_invalid(shape, state, bad, out, bytes, scratch_bytes, "keys");
  }
  {
    ChunkInsertInputs bad = in;
    bad.initial_scores = nullptr;
    expect_invalid(shape, state, bad, out, bytes, scratch_bytes,
                   "initial_scores");
  }
  {
    ChunkInsertInputs bad = in;
    bad.token_stride = -1;
    expect_invalid(shape, state, bad, out, bytes, scratch_bytes,
                   "negative token_stride");
  }
  {
    ChunkInsertOutputs bad = out;
    bad.evicted_values = nullptr;
    expect_invalid(shape, state, in, bad, bytes, scratch_bytes,
                   "evicted_values");
  }
  {
    ChunkInsertOutputs bad = out;
    bad.changed_counts = nullptr;
    expect_invalid(shape, state, in, bad, bytes, scratch_bytes,
                   "changed_counts");
  }
  expect_invalid(shape, state, in, out, nullptr, scratch_bytes, "scratch null");
  expect_invalid(shape, state, in, out, bytes, scratch_bytes - 1,
                 "scratch too small");
  expect_invalid(shape, state, in, out, bytes + 4, scratch_bytes,
                 "scratch misaligned");
}

// The prefill benchmark's insertion: 8 streams (KV heads), S 4, C·W =
// 65536 with C 1 and 4, T 1024, D 128 bf16, every cascade full and past
// eager fill. The state advances launch by launch (heads rotate), so
// successive launches touch different slots. Prints the median of
// CUDA-event timings after a warm-up, against the bytes the rows must
// move: each changed slot and evicted row written once, and its source
// row (chunk or old slot) read once.
TEST(ChunkInsertTest, TimesPrefillChunkB8) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  constexpr int kStreams = 8;
  constexpr int kTokens = 1024;
  constexpr int kWarmup = 5;
  constexpr int kTimed = 30;
  Stream stream = testing::MakeStream();
  std::printf("workload | measured us | floor us | x floor | bytes\n");
  for (int cascades : {1, 4}) {
    ChunkInsertShape shape;
    shape.batch.streams = kStreams;
    shape.batch.params.sinks = 4;
    shape.batch.params.cascades = cascades;
    shape.batch.params.window = 65536 / cascades;
    shape.batch.head_dim = 128;
    shape.batch.dtype = DType::kBf16;
    shape.chunk_tokens = kTokens;
    const CascadeParams& p = shape.batch.params;
    const int slots = p.sinks + p.cascades * p.window;
    const size_t state_slots = size_t(kStreams) * slots;
    const size_t row_bytes = size_t(shape.batch.head_dim) * 2;

    std::vector<int64_t> positions(state_slots), seen(kStreams);
    std::vector<float> scores(state_slots);
    std::vector<int32_t> stored(size_t(kStreams) * cascades, p.window);
    std::vector<int32_t> head(size_t(kStreams) * cascades);
    for (int b = 0; b < kStreams; ++b) {
      seen[b] = (int64_t{1} << 22) + 3 * b;  // varied accepting cascades
      for (int s = 0; s < slots; ++s) {
        positions[size_t(b) * slots + s] = s;  // any distinct positions
        scores[size_t(b) * slots + s] =
            s < p.sinks ? 0.0f : 1e-7f * float(1 + rng() % 1000);
      }
      for (int i = 0; i < cascades; ++i) {
        head[size_t(b) * cascades + i] = int32_t(rng() % p.window);
      }
    }
    std::vector<int32_t> slot_rows(state_slots);
    std::iota(slot_rows.begin(), slot_rows.end(), 0);
    DeviceBuffer d_positions = Upload(positions, stream.get());
    DeviceBuffer d_scores = Upload(scores, stream.get());
    DeviceBuffer d_stored = Upload(stored, stream.get());
    DeviceBuffer d_head = Upload(head, stream.get());
    DeviceBuffer d_seen = Upload(seen, stream.get());
    DeviceBuffer d_slot_rows = Upload(slot_rows, stream.get());
    DeviceBuffer d_keys = Filled(state_slots * row_bytes, 0x3c, stream);
    DeviceBuffer d_values = Filled(state_slots * row_bytes, 0x3c, stream);
    const std::vector<uint8_t> chunk_rows =
        testing::RandomRows(size_t(kStreams) * kTokens * shape.batch.head_dim,
                            shape.batch.dtype, rng);
    DeviceBuffer d_chunk_keys = Upload(chunk_rows, stream.get());
    DeviceBuffer d_chunk_values = Upload(chunk_rows, stream.get());
    std::vector<float> initial(size_t(kStreams) * kTokens);
    for (float& u : initial) u = 1e-7f * float(1 + rng() % 1000);
    DeviceBuffer d_initial = Upload(initial, stream.get());
    const size_t evicted_bytes = size_t(kStreams) * kTokens * row_bytes;
    DeviceBuffer d_evicted_positions =
        Filled(size_t(kStreams) * kTokens * 8, 0xff, stream);
    DeviceBuffer d_evicted_counts = Filled(kStreams * 4, 0xff, stream);
    DeviceBuffer d_evicted_keys = Filled(evicted_bytes, 0xff, stream);
    DeviceBuffer d_evicted_values = Filled(evicted_bytes, 0xff, stream);
    DeviceBuffer d_changed =
        Filled(size_t(kStreams) * kTokens * cascades * 4, 0xff, stream);
    DeviceBuffer d_changed_counts = Filled(kStreams * 4, 0xff, stream);
    const size_t scratch_bytes = ChunkInsertScratchBytes(shape);
    DeviceBuffer d_scratch = Filled(scratch_bytes, 0, stream);
    ASSERT_FALSE(::testing::Test::HasFailure());

    CascadeDeviceState state;
    state.positions = d_positions.as<int64_t>();
    state.scores = d_scores.as<float>();
    state.stored = d_stored.as<int32_t>();
    state.head = d_head.as<int32_t>();
    state.tokens_seen = d_seen.as<int64_t>();
    state.key_rows = d_keys.get();
    state.value_rows = d_values.get();
    state.slot_rows = d_slot_rows.as<int32_t>();
    // The wire layout [T, B, D].
    ChunkInsertInputs in{
        d_chunk_keys.get(), d_chunk_values.get(), shape.batch.head_dim,
        int64_t{kStreams} * shape.batch.head_dim, d_initial.as<float>()};
    ChunkInsertOutputs out{d_evicted_positions.as<int64_t>(),
                           d_evicted_counts.as<int32_t>(),
                           d_evicted_keys.get(),
                           d_evicted_values.get(),
                           d_changed.as<int32_t>(),
                           d_changed_counts.as<int32_t>()};
    auto launch = [&] {
      return InsertChunks(shape, state, in, out, d_scratch.get(), scratch_bytes,
                          stream.get());
    };
    for (int i = 0; i < kWarmup; ++i) ASSERT_TRUE(launch().ok());
    absl::StatusOr<Event> start = Event::Create(true);
    absl::StatusOr<Event> stop = Event::Create(true);
    ASSERT_TRUE(start.ok() && stop.ok());
    std::vector<float> times_us;
    for (int i = 0; i < kTimed; ++i) {
      ASSERT_TRUE(start->Record(stream.get()).ok());
      const absl::Status launched = launch();
      ASSERT_TRUE(launched.ok()) << launched;
      ASSERT_TRUE(stop->Record(stream.get()).ok());
      ASSERT_TRUE(stop->Synchronize().ok());
      absl::StatusOr<float> ms = stop->ElapsedMsSince(*start);
      ASSERT_TRUE(ms.ok()) << ms.status();
      times_us.push_back(*ms * 1000.0f);
    }
    std::sort(times_us.begin(), times_us.end());
    const auto changed = Download<int32_t>(d_changed_counts, kStreams, stream);
    const auto evicted = Download<int32_t>(d_evicted_counts, kStreams, stream);
    double bytes = 0;
    for (int b = 0; b < kStreams; ++b) {
      EXPECT_EQ(evicted[b], kTokens);  // steady state: every token evicts one
      bytes += 4.0 * double(changed[b] + evicted[b]) * double(row_bytes);
    }
    const double floor_us = bytes / 3.0e12 * 1e6;  // 3.0 TB/s: H100 copy
    const float median = times_us[times_us.size() / 2];
    std::printf(
        "chunk insert b%d T%d S%d C%d W%d D128 bf16 (%s) | %.1f | %.1f | "
        "%.2f | %.0f\n",
        kStreams, kTokens, p.sinks, cascades, p.window,
        ProbeDevices().device_name.c_str(), median, floor_us, median / floor_us,
        bytes);
  }
}

}  // namespace
}  // namespace kvmem::cuda
