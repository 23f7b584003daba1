// Helpers shared by the spill tests: seeded random pages, bit-exact page
// comparison, and raw access to a store's RocksDB behind its back.
#ifndef KVMEM_TESTS_STORAGE_SPILL_TEST_UTIL_H_
#define KVMEM_TESTS_STORAGE_SPILL_TEST_UTIL_H_

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "storage/spill_page.h"

namespace kvmem::storage::test_util {

// The seed of a test's random contents: $KVMEM_TEST_SEED if set, else
// fresh; printed so that a failure can be replayed.
inline uint64_t TestSeed() {
  const char* env = std::getenv("KVMEM_TEST_SEED");
  uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10)
                                 : (uint64_t{std::random_device{}()} << 32) |
                                       std::random_device{}();
  std::cout << "seed " << seed << " (set KVMEM_TEST_SEED to replay)\n";
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

// A page of `tokens` tokens (random 1..16 when 0) of `row_bytes` random
// bytes per row, random positions and a [2, row_bytes / 2] digest of random
// bit patterns (NaNs with payloads included).
inline SpillPage RandomPage(std::mt19937_64& rng, uint32_t row_bytes = 256,
                            uint32_t tokens = 0) {
  if (tokens == 0) tokens = uint32_t(rng() % 16) + 1;
  SpillPage page;
  page.row_bytes = row_bytes;
  for (uint32_t t = 0; t < tokens; ++t)
    page.positions.push_back(int64_t(rng()));
  page.keys.resize(size_t{tokens} * row_bytes);
  page.values.resize(size_t{tokens} * row_bytes);
  for (char& c : page.keys) c = char(rng());
  for (char& c : page.values) c = char(rng());
  page.digest.resize(row_bytes);  // [2, D] with D = row_bytes / 2 (bf16)
  for (float& f : page.digest) {
    uint32_t bits = uint32_t(rng());
    std::memcpy(&f, &bits, 4);
  }
  return page;
}

inline bool SameFloatBits(const std::vector<float>& a,
                          const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

// Bit-for-bit equality (floats compared as bits: NaN equals itself).
inline ::testing::AssertionResult SamePage(const SpillPage& a,
                                           const SpillPage& b) {
  if (a.row_bytes != b.row_bytes) {
    return ::testing::AssertionFailure()
           << "row_bytes " << a.row_bytes << " vs " << b.row_bytes;
  }
  if (a.positions != b.positions) {
    return ::testing::AssertionFailure() << "positions differ";
  }
  if (a.keys != b.keys) return ::testing::AssertionFailure() << "keys differ";
  if (a.values != b.values) {
    return ::testing::AssertionFailure() << "values differ";
  }
  if (!SameFloatBits(a.digest, b.digest)) {
    return ::testing::AssertionFailure() << "digest bits differ";
  }
  return ::testing::AssertionSuccess();
}

inline std::shared_ptr<const SpillPage> Share(SpillPage page) {
  return std::make_shared<const SpillPage>(std::move(page));
}

}  // namespace kvmem::storage::test_util

#endif  // KVMEM_TESTS_STORAGE_SPILL_TEST_UTIL_H_
