// Conversions checked against the compiler's own _Float16 and exhaustive
// round trips.
#include "kernels/dtype.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/dtype.h"

namespace kvmem {
namespace {

TEST(DType, Fp16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = Fp16ToFloat(uint16_t(h));
    _Float16 ref;
    uint16_t hb = uint16_t(h);
    memcpy(&ref, &hb, 2);
    if (std::isnan(float(ref))) {
      EXPECT_TRUE(std::isnan(f)) << h;
      continue;
    }
    ASSERT_EQ(FloatBits(f), FloatBits(float(ref))) << "half bits " << h;
    ASSERT_EQ(FloatToFp16(f), uint16_t(h)) << "half bits " << h;
  }
}

TEST(DType, FloatToFp16MatchesCompilerOnRandomFloats) {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int i = 0; i < 2000000; ++i) {
    // Random bit patterns cover every exponent, including ties and overflow.
    float f = BitsFloat(uint32_t(rng()));
    if (std::isnan(f)) continue;
    _Float16 ref = _Float16(f);
    uint16_t ref_bits;
    memcpy(&ref_bits, &ref, 2);
    ASSERT_EQ(FloatToFp16(f), ref_bits) << "seed " << seed << " float " << f;
  }
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3f80);
  // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625: rounds up.
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3f82);
  EXPECT_EQ(Bf16ToFloat(0xc040), -3.0f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
}

TEST(DType, LoadStoreRoundTripEachType) {
  for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    unsigned char buf[16];
    StoreElement(buf, t, 1, -2.5f);
    EXPECT_EQ(LoadElement(buf, t, 1), -2.5f) << int(t);
  }
}

// A request's tensors are read where the wire put them, at any offset:
// LoadFloats reads them so (the sanitizer run flags a misaligned load),
// and alike at every offset.
TEST(DType, LoadFloatsReadsAtAnyAlignment) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
    constexpr size_t kN = 37;
    std::vector<float> want(kN);
    std::vector<char> aligned(kN * 4);
    for (size_t i = 0; i < kN; ++i) {
      StoreElement(aligned.data(), t, int64_t(i), normal(rng));
      want[i] = LoadElement(aligned.data(), t, int64_t(i));
    }
    for (size_t offset = 1; offset < 4; ++offset) {
      std::vector<char> shifted(kN * 4 + offset);
      memcpy(shifted.data() + offset, aligned.data(), kN * DTypeBytes(t));
      std::vector<float> got(kN, -1.0f);
      cpu::LoadFloats(shifted.data() + offset, t, absl::MakeSpan(got));
      for (size_t i = 0; i < kN; ++i) {
        ASSERT_EQ(got[i], want[i])
            << "type " << int(t) << " offset " << offset << " element " << i;
      }
    }
  }
}

}  // namespace
}  // namespace kvmem
