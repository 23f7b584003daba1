// Helpers shared by the cascade policy tests: deterministic weights and
// rows, and one attend → update → insert step over a CascadeStream.
#ifndef KVMEM_TESTS_KERNELS_CASCADE_POLICY_TEST_UTIL_H_
#define KVMEM_TESTS_KERNELS_CASCADE_POLICY_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cascade_policy.h"

namespace kvmem::cascade_test {

// Unnormalised attention weight of query head g of token q on key `key`.
using WeightFn = std::function<double(int g, int64_t q, int64_t key)>;

inline uint64_t Mix(
    uint64_t x) {  // splitmix64 finaliser: a cheap stateless hash
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline uint64_t Hash(uint64_t seed, int64_t a, int64_t b, int64_t c) {
  return Mix(seed ^ Mix(uint64_t(a) ^ Mix(uint64_t(b) ^ Mix(uint64_t(c)))));
}

// Integer weights 1..7: sums are exact, so two runs that attend the same key
// set get bit-identical probabilities.
inline WeightFn HashWeights(uint64_t seed) {
  return [seed](int g, int64_t q, int64_t key) {
    return double(1 + Hash(seed, g, q, key) % 7);
  };
}

// The row of `position` (salt 0 = key, 1 = value): distinct per position.
inline std::vector<uint8_t> RowOf(int row_bytes, int64_t position, int salt) {
  std::vector<uint8_t> row(row_bytes);
  for (int b = 0; b < row_bytes; ++b) {
    row[b] = uint8_t(Hash(77, position, salt, b));
  }
  return row;
}

struct StepProbs {
  std::vector<float> probs;       // [T, num_slots]
  std::vector<float> self_probs;  // [T, T]
};

// Query q of the step's T tokens attends every occupied slot and the step's
// tokens 0..q (a chunk attends densely, causally). a_g = w / Σw over those
// keys; r = reduce over the G heads through ReduceGroup.
inline StepProbs Attend(const CascadeStream& stream, int num_tokens, int group,
                        ScoreReduction reduction, const WeightFn& weight) {
  const int n = stream.num_slots();
  const int64_t first = stream.tokens_seen();
  StepProbs out{std::vector<float>(size_t(num_tokens) * n, 0.0f),
                std::vector<float>(size_t(num_tokens) * num_tokens, 0.0f)};
  const int keys = n + num_tokens;
  for (int q = 0; q < num_tokens; ++q) {
    std::vector<float> per_head(size_t(group) * keys, 0.0f);  // [G, keys]
    for (int g = 0; g < group; ++g) {
      double z = 0;
      for (int s = 0; s < n; ++s) {
        if (stream.slot_position(s) >= 0) {
          z += weight(g, first + q, stream.slot_position(s));
        }
      }
      for (int i = 0; i <= q; ++i) z += weight(g, first + q, first + i);
      for (int s = 0; s < n; ++s) {
        if (stream.slot_position(s) < 0) continue;
        per_head[size_t(g) * keys + s] =
            float(weight(g, first + q, stream.slot_position(s)) / z);
      }
      for (int i = 0; i <= q; ++i) {
        per_head[size_t(g) * keys + n + i] =
            float(weight(g, first + q, first + i) / z);
      }
    }
    std::vector<float> r(keys);
    EXPECT_TRUE(
        ReduceGroup(reduction, group, per_head, absl::MakeSpan(r)).ok());
    std::copy(r.begin(), r.begin() + n, out.probs.begin() + size_t(q) * n);
    std::copy(r.begin() + n, r.begin() + n + q + 1,
              out.self_probs.begin() + size_t(q) * num_tokens);
  }
  return out;
}

// One step: attend, update scores, insert T tokens (rows from RowOf).
inline InsertResult Step(CascadeStream& stream, int num_tokens, int group,
                         ScoreReduction reduction, const WeightFn& weight) {
  StepProbs p = Attend(stream, num_tokens, group, reduction, weight);
  std::vector<float> initial(num_tokens);
  EXPECT_TRUE(stream
                  .UpdateScores(num_tokens, p.probs, p.self_probs,
                                absl::MakeSpan(initial))
                  .ok());
  std::vector<uint8_t> keys, values;
  const int64_t first = stream.tokens_seen();
  for (int j = 0; j < num_tokens; ++j) {
    std::vector<uint8_t> k = RowOf(stream.row_bytes(), first + j, 0);
    std::vector<uint8_t> v = RowOf(stream.row_bytes(), first + j, 1);
    keys.insert(keys.end(), k.begin(), k.end());
    values.insert(values.end(), v.begin(), v.end());
  }
  InsertResult result;
  absl::Status status =
      stream.InsertTokens(first, num_tokens, keys, values, initial, &result);
  EXPECT_TRUE(status.ok()) << status;
  return result;
}

inline CascadeStream MakeStream(const CascadeParams& params, int row_bytes) {
  absl::StatusOr<CascadeStream> stream =
      CascadeStream::Create(params, row_bytes);
  EXPECT_TRUE(stream.ok()) << stream.status();
  return std::move(*stream);
}

inline std::string Join(const std::vector<int64_t>& xs) {
  std::string out;
  for (int64_t x : xs) out += (out.empty() ? "" : " ") + std::to_string(x);
  return out;
}

inline std::vector<int64_t> SinkPositions(const CascadeStream& s) {
  std::vector<int64_t> out;
  for (int i = 0; i < s.params().sinks; ++i) {
    if (s.slot_position(i) >= 0) out.push_back(s.slot_position(i));
  }
  return out;
}

}  // namespace kvmem::cascade_test

#endif  // KVMEM_TESTS_KERNELS_CASCADE_POLICY_TEST_UTIL_H_
