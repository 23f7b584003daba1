// Attention, LSE and merge on the CPU reference against a naive fp64
// softmax written here; and the rotary embedding CACHE_RANK attends with.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/dtype.h"
#include "kernels/rotary.h"

namespace kvmem {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

uint32_t FreshSeed() {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

// Element-wise |got − want| ≤ atol + rtol·|want|.
struct Tolerance {
  double rtol;
  double atol;
};

// fp32 kernel vs fp64 on the same (already rounded) inputs.
constexpr Tolerance kFp32Out = {1e-5, 1e-5};  // atol × max|v|
constexpr Tolerance kFp32Lse = {1e-5, 1e-5};
constexpr Tolerance kFp32Prob = {1e-5, 1e-7};
// Rounding the inputs themselves to a 16-bit type, against fp64 over the
// unrounded fp32 inputs (STYLE.md's tolerances; atol × max|v|).
constexpr Tolerance kBf16Out = {1e-2, 1e-2};
constexpr Tolerance kFp16Out = {1e-3, 1e-3};

void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 Tolerance tol, double atol_scale, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i])) {
      ASSERT_EQ(double(got[i]), want[i]) << what << "[" << i << "]";
      continue;
    }
    const double bound = tol.atol * atol_scale + tol.rtol * std::fabs(want[i]);
    ASSERT_LE(std::fabs(got[i] - want[i]), bound)
        << what << "[" << i << "] got " << got[i] << " want " << want[i];
  }
}

std::vector<float> RandomRows(std::mt19937& rng, size_t count, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> rows(count);
  for (float& x : rows) x = normal(rng);
  return rows;
}

std::vector<uint8_t> Encode(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * DTypeBytes(dtype));
  cpu::StoreFloats(values, dtype, bytes.data());
  return bytes;
}

std::vector<float> RoundTrip(const std::vector<float>& values, DType dtype) {
  std::vector<float> rounded(values.size());
  cpu::LoadFloats(Encode(values, dtype).data(), dtype, absl::MakeSpan(rounded));
  return rounded;
}

double MaxAbs(const std::vector<float>& values) {
  double m = 0;
  for (float x : values) m = std::max(m, double(std::fabs(x)));
  return m;
}

struct Naive {
  std::vector<double> out;    // [rows, D]
  std::vector<double> lse;    // [rows]
  std::vector<double> probs;  // [rows, N], 0 where masked
};

// fp64 softmax attention; query row r sees keys [0, visible(r)).
template <typename Visible>
Naive NaiveAttention(const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, int d, double scale,
                     Visible visible) {
  const size_t rows = q.size() / d;
  const size_t n = k.size() / d;
  Naive ref{std::vector<double>(rows * d, 0.0), std::vector<double>(rows),
            std::vector<double>(rows * n, 0.0)};
  for (size_t r = 0; r < rows; ++r) {
    const size_t seen = visible(r);
    std::vector<double> s(seen);
    double m = -kInf;
    for (size_t t = 0; t < seen; ++t) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += double(q[r * d + i]) * k[t * d + i];
      s[t] = scale * dot;
      m = std::max(m, s[t]);
    }
    double z = 0;
    for (size_t t = 0; t < seen; ++t) z += std::exp(s[t] - m);
    ref.lse[r] = seen == 0 ? -kInf : m + std::log(z);
    for (size_t t = 0; t < seen; ++t) {
      const double p = std::exp(s[t] - m) / z;
      ref.probs[r * n + t] = p;
      for (int i = 0; i < d; ++i) ref.out[r * d + i] += p * v[t * d + i];
    }
  }
  return ref;
}

struct Result {
  std::vector<float> out, lse, probs;
};

Result RunAttend(const std::vector<float>& q, const std::vector<float>& k,
                 const std::vector<float>& v, int d, float scale, DType dtype) {
  const size_t rows = q.size() / d;
  const size_t n = k.size() / d;
  Result r{std::vector<float>(rows * d, NAN), std::vector<float>(rows, NAN),
           std::vector<float>(rows * n, NAN)};
  const std::vector<uint8_t> qb = Encode(q, dtype), kb = Encode(k, dtype),
                             vb = Encode(v, dtype);
  const absl::Status s = cpu::Attend(
      {qb, dtype}, {kb, dtype}, {vb, dtype}, d, scale, absl::MakeSpan(r.out),
      absl::MakeSpan(r.lse), absl::MakeSpan(r.probs));
  EXPECT_TRUE(s.ok()) << s;
  return r;
}

TEST(Attention, MatchesNaiveFp64ForEachDtype) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  for (DType dtype : {DType::kFp32, DType::kBf16, DType::kFp16}) {
    for (int d : {64, 128}) {
      for (int n : {1, 7, 65, 4099}) {
        for (int group : {1, 4}) {
          const std::string what = absl::StrCat("dtype ", int(dtype), " D ", d,
                                                " N ", n, " G ", group, " ");
          // Queries of std 2 give logits of std ~2: peaked, not one-hot.
          const std::vector<float> q = RandomRows(rng, group * d, 2.0f);
          const std::vector<float> k = RandomRows(rng, size_t(n) * d, 1.0f);
          const std::vector<float> v = RandomRows(rng, size_t(n) * d, 1.0f);
          const float scale = 1.0f / std::sqrt(float(d));
          const Result got = RunAttend(q, k, v, d, scale, dtype);
          auto all = [n](size_t) { return size_t(n); };
          // Exact math over what the kernel was given: fp32 tolerance.
          const std::vector<float> qr = RoundTrip(q, dtype),
                                   kr = RoundTrip(k, dtype),
                                   vr = RoundTrip(v, dtype);
          const Naive same = NaiveAttention(qr, kr, vr, d, scale, all);
          ExpectClose(got.out, same.out, kFp32Out, MaxAbs(vr), what + "out");
          ExpectClose(got.lse, same.lse, kFp32Lse, 1.0, what + "lse");
          ExpectClose(got.probs, same.probs, kFp32Prob, 1.0, what + "probs");
          if (dtype == DType::kFp32) continue;
          // Against the unrounded inputs: the dtype's own tolerance.
          const Naive exact = NaiveAttention(q, k, v, d, scale, all);
          ExpectClose(got.out, exact.out,
                      dtype == DType::kBf16 ? kBf16Out : kFp16Out, MaxAbs(v),
                      what + "out vs unrounded");
        }
      }
    }
  }
}

TEST(Attention, EmptySetGivesZeroAndMinusInfinity) {
  const std::vector<float> q = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> out(8, NAN), lse(2, NAN);
  ASSERT_TRUE(cpu::Attend(HeadRowsView::Fp32(q), HeadRowsView::Fp32({}),
                          HeadRowsView::Fp32({}), 4, 0.5f, absl::MakeSpan(out),
                          absl::MakeSpan(lse), {})
                  .ok());
  EXPECT_EQ(out, std::vector<float>(8, 0.0f));
  EXPECT_EQ(lse, std::vector<float>(2, -INFINITY));
}

TEST(Attention, RejectsBadShapesAndWritesNothing) {
  const std::vector<float> q(8, 1.0f), k(12, 1.0f), v(8, 1.0f);
  std::vector<float> out(8, 3.0f), lse(2, 3.0f);
  const auto kBad = absl::StatusCode::kInvalidArgument;
  auto attend = [&](const std::vector<float>& keys, int d, float scale) {
    return cpu::Attend(HeadRowsView::Fp32(q), HeadRowsView::Fp32(keys),
                       HeadRowsView::Fp32(v), d, scale, absl::MakeSpan(out),
                       absl::MakeSpan(lse), {})
        .code();
  };
  EXPECT_EQ(attend(k, 4, 0.5f), kBad);  // 3 key rows, 2 value rows
  EXPECT_EQ(attend(v, 3, 0.5f), kBad);  // 8 floats are not rows of 3
  EXPECT_EQ(attend(v, 4, 0.0f), kBad);  // scale
  EXPECT_EQ(attend(v, 4, NAN), kBad);
  EXPECT_EQ(out, std::vector<float>(8, 3.0f));
  EXPECT_EQ(lse, std::vector<float>(2, 3.0f));
  EXPECT_TRUE(cpu::Attend(HeadRowsView::Fp32(q), HeadRowsView::Fp32(v),
                          HeadRowsView::Fp32(v), 4, 0.5f, absl::MakeSpan(out),
                          absl::MakeSpan(lse.data(), 1), {})
                  .code() == kBad);  // lse for 1 row, queries have 2
}

TEST(Attention, CausalChunkMatchesNaiveCausal) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  for (DType dtype : {DType::kFp32, DType::kBf16}) {
    for (int d : {64, 128}) {
      for (int cache : {0, 7, 65}) {
        for (int chunk : {1, 5}) {
          for (int group : {1, 4}) {
            const std::string what =
                absl::StrCat("dtype ", int(dtype), " D ", d, " cache ", cache,
                             " T ", chunk, " G ", group, " ");
            const int n = cache + chunk;
            const std::vector<float> q =
                RoundTrip(RandomRows(rng, chunk * group * d, 2.0f), dtype);
            const std::vector<float> k =
                RoundTrip(RandomRows(rng, n * d, 1.0f), dtype);
            const std::vector<float> v =
                RoundTrip(RandomRows(rng, n * d, 1.0f), dtype);
            const float scale = 1.0f / std::sqrt(float(d));
            Result got{std::vector<float>(q.size(), NAN),
                       std::vector<float>(chunk * group, NAN),
                       std::vector<float>(chunk * group * n, NAN)};
            const std::vector<uint8_t> qb = Encode(q, dtype),
                                       kb = Encode(k, dtype),
                                       vb = Encode(v, dtype);
            ASSERT_TRUE(cpu::AttendCausalChunk(
                            {qb, dtype}, {kb, dtype}, {vb, dtype}, d, group,
                            cache, scale, absl::MakeSpan(got.out),
                            absl::MakeSpan(got.lse), absl::MakeSpan(got.probs))
                            .ok());
            // Row r = t·G + g sees the cache and chunk rows 0..t.
            const Naive ref = NaiveAttention(q, k, v, d, scale, [&](size_t r) {
              return size_t(cache) + r / group + 1;
            });
            ExpectClose(got.out, ref.out, kFp32Out, MaxAbs(v), what + "out");
            ExpectClose(got.lse, ref.lse, kFp32Lse, 1.0, what + "lse");
            ExpectClose(got.probs, ref.probs, kFp32Prob, 1.0, what + "probs");
          }
        }
      }
    }
  }
}

// ---- merge ------------------------------------------------------------------
struct Partial {
  std::vector<float> out, lse;
};

Partial Merge(const Partial& a, const Partial& b) {
  Partial m{std::vector<float>(a.out.size(), NAN),
            std::vector<float>(a.lse.size(), NAN)};
  EXPECT_TRUE(cpu::MergeAttention(a.out, a.lse, b.out, b.lse,
                                  absl::MakeSpan(m.out), absl::MakeSpan(m.lse))
                  .ok());
  return m;
}

// Attention of the G query rows `q` over keys/values rows `rows`.
Partial AttendRows(const std::vector<float>& q, const std::vector<float>& k,
                   const std::vector<float>& v, int d,
                   const std::vector<int>& rows) {
  std::vector<float> ks, vs;
  for (int t : rows) {
    ks.insert(ks.end(), &k[t * d], &k[(t + 1) * d]);
    vs.insert(vs.end(), &v[t * d], &v[(t + 1) * d]);
  }
  const Result r =
      RunAttend(q, ks, vs, d, 1.0f / std::sqrt(float(d)), DType::kFp32);
  return {r.out, r.lse};
}

std::vector<double> ToDouble(const std::vector<float>& x) {
  return std::vector<double>(x.begin(), x.end());
}

TEST(Merge, DisjointPartsEqualTheUnionAndAssociate) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  for (int d : {64, 128}) {
    const int n = 65, group = 4;
    const std::vector<float> q = RandomRows(rng, group * d, 2.0f);
    const std::vector<float> k = RandomRows(rng, n * d, 1.0f);
    const std::vector<float> v = RandomRows(rng, n * d, 1.0f);
    // Three disjoint random parts (each non-empty), and the union.
    std::vector<int> all(n);
    for (int t = 0; t < n; ++t) all[t] = t;
    std::shuffle(all.begin(), all.end(), rng);
    const int cut1 = 1 + rng() % (n - 2);
    const int cut2 = cut1 + 1 + rng() % (n - cut1 - 1);
    const std::vector<int> p1(all.begin(), all.begin() + cut1),
        p2(all.begin() + cut1, all.begin() + cut2),
        p3(all.begin() + cut2, all.end());
    const Partial a = AttendRows(q, k, v, d, p1);
    const Partial b = AttendRows(q, k, v, d, p2);
    const Partial c = AttendRows(q, k, v, d, p3);
    const Partial whole = AttendRows(q, k, v, d, all);
    std::vector<int> p12 = p1;
    p12.insert(p12.end(), p2.begin(), p2.end());
    const Partial ab = Merge(a, b);
    const Partial ab_direct = AttendRows(q, k, v, d, p12);
    const double vmax = MaxAbs(v);
    ExpectClose(ab.out, ToDouble(ab_direct.out), kFp32Out, vmax, "ab out");
    ExpectClose(ab.lse, ToDouble(ab_direct.lse), kFp32Lse, 1.0, "ab lse");
    const Partial left = Merge(ab, c);
    const Partial right = Merge(a, Merge(b, c));
    ExpectClose(left.out, ToDouble(whole.out), kFp32Out, vmax, "(ab)c out");
    ExpectClose(left.lse, ToDouble(whole.lse), kFp32Lse, 1.0, "(ab)c lse");
    ExpectClose(right.out, ToDouble(left.out), kFp32Out, vmax, "a(bc) out");
    ExpectClose(right.lse, ToDouble(left.lse), kFp32Lse, 1.0, "a(bc) lse");
    // Commutative bit for bit: the formula is symmetric in its two sides.
    const Partial ba = Merge(b, a);
    EXPECT_EQ(ba.out, ab.out);
    EXPECT_EQ(ba.lse, ab.lse);
  }
}

TEST(Merge, EmptySetIsTheIdentity) {
  const Partial x{{0.25f, -1.5f, 3.0f, 7.0f}, {2.75f}};
  // The empty side's output is never read: NaN here must not leak.
  const Partial empty{{NAN, NAN, NAN, NAN}, {-INFINITY}};
  const Partial left = Merge(empty, x);
  const Partial right = Merge(x, empty);
  EXPECT_EQ(left.out, x.out);
  EXPECT_EQ(left.lse, x.lse);
  EXPECT_EQ(right.out, x.out);
  EXPECT_EQ(right.lse, x.lse);
  const Partial none = Merge(empty, empty);
  EXPECT_EQ(none.out, std::vector<float>(4, 0.0f));
  EXPECT_EQ(none.lse, std::vector<float>{-INFINITY});
  std::vector<float> out(3), lse(1);
  EXPECT_EQ(cpu::MergeAttention(x.out, x.lse, x.out, x.lse, absl::MakeSpan(out),
                                absl::MakeSpan(lse))
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- rotary (CACHE_RANK rotates q and k inside the attention) --------------
std::vector<float> Rotated(const RotaryParams& params, int64_t position,
                           std::vector<float> head) {
  const absl::Status s =
      cpu::RotateHead(params, position, absl::MakeSpan(head));
  EXPECT_TRUE(s.ok()) << s;
  return head;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
  return s;
}

TEST(Rotary, TurnsThePairForwardByPositionTimesFrequency) {
  RotaryParams params;  // D = 2: one pair at 1 rad per position
  const std::vector<float> x = Rotated(params, 1, {1.0f, 0.0f});
  EXPECT_FLOAT_EQ(x[0], float(std::cos(1.0)));
  EXPECT_FLOAT_EQ(x[1], float(std::sin(1.0)));
}

TEST(Rotary, DotDependsOnlyOnRelativePosition) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> position(0, 1000000);
  const int d = 128;
  for (RotaryPairing pairing :
       {RotaryPairing::kHalfSplit, RotaryPairing::kInterleaved}) {
    RotaryParams params;
    params.base = 500000.0;
    params.rotary_dims = 96;  // channels 96..127 are not rotated
    params.pairing = pairing;
    absl::StatusOr<std::vector<double>> freq =
        RotaryInverseFrequencies(params, d);
    ASSERT_TRUE(freq.ok());
    for (int trial = 0; trial < 50; ++trial) {
      const std::vector<float> q = RandomRows(rng, d, 1.0f);
      const std::vector<float> k = RandomRows(rng, d, 1.0f);
      const int64_t m = position(rng), n = position(rng), shift = position(rng);
      const double dot = Dot(Rotated(params, m, q), Rotated(params, n, k));
      const double shifted =
          Dot(Rotated(params, m + shift, q), Rotated(params, n + shift, k));
      // Closed form: q · R((n − m)ω) k per pair, plain products elsewhere.
      double expected = 0;
      for (int i = 0; i < 48; ++i) {
        int a = 0, b = 0;
        RotaryPairChannels(pairing, 96, i, &a, &b);
        const double phi = double(n - m) * (*freq)[i];
        expected +=
            (double(q[a]) * k[a] + double(q[b]) * k[b]) * std::cos(phi) +
            (double(q[b]) * k[a] - double(q[a]) * k[b]) * std::sin(phi);
      }
      for (int i = 96; i < d; ++i) expected += double(q[i]) * k[i];
      const double tol = 1e-5 * std::sqrt(Dot(q, q) * Dot(k, k));
      EXPECT_NEAR(dot, shifted, tol) << "m " << m << " n " << n;
      EXPECT_NEAR(dot, expected, tol) << "m " << m << " n " << n;
    }
  }
}

TEST(Rotary, HalfSplitAndInterleavedDifferByAChannelPermutation) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  const int d = 64, dims = 32;
  RotaryParams half;
  half.rotary_dims = dims;
  RotaryParams interleaved = half;
  interleaved.pairing = RotaryPairing::kInterleaved;
  // Half-split channel i ↔ interleaved 2i, channel i + dims/2 ↔ 2i + 1.
  auto permute = [&](const std::vector<float>& x) {
    std::vector<float> y = x;
    for (int i = 0; i < dims / 2; ++i) {
      y[2 * i] = x[i];
      y[2 * i + 1] = x[i + dims / 2];
    }
    return y;
  };
  for (int64_t position :
       {int64_t{0}, int64_t{1}, int64_t{77}, int64_t{123456}}) {
    const std::vector<float> x = RandomRows(rng, d, 1.0f);
    EXPECT_EQ(Rotated(interleaved, position, permute(x)),
              permute(Rotated(half, position, x)))
        << "position " << position;
  }
}

TEST(Rotary, LinearScalingDividesPositions) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  RotaryParams plain;
  RotaryParams linear;
  linear.scaling = RotaryScaling::kLinear;
  linear.factor = 4.0;
  const std::vector<float> x = RandomRows(rng, 64, 1.0f);
  for (int64_t m : {1, 37, 5000}) {
    const std::vector<float> a = Rotated(linear, 4 * m, x);
    const std::vector<float> b = Rotated(plain, m, x);
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_NEAR(a[i], b[i], 1e-6) << "m " << m << " ch " << i;
    }
  }
}

TEST(Rotary, Llama3KeepsHighFrequenciesAndSlowsLowOnes) {
  RotaryParams plain;
  plain.base = 500000.0;
  RotaryParams llama = plain;
  llama.scaling = RotaryScaling::kLlama3;
  llama.factor = 8.0;
  llama.low_freq_factor = 1.0;
  llama.high_freq_factor = 4.0;
  llama.original_max_positions = 8192.0;
  absl::StatusOr<std::vector<double>> base =
      RotaryInverseFrequencies(plain, 128);
  absl::StatusOr<std::vector<double>> scaled =
      RotaryInverseFrequencies(llama, 128);
  ASSERT_TRUE(base.ok() && scaled.ok());
  int high = 0, low = 0, blended = 0;
  for (size_t i = 0; i < base->size(); ++i) {
    const double w = (*base)[i], s = (*scaled)[i];
    EXPECT_EQ(w, std::pow(500000.0, -2.0 * i / 128));
    const double wavelength = 2 * std::acos(-1.0) / w;
    if (wavelength < 8192.0 / 4.0) {  // turns many times in the context
      EXPECT_EQ(s, w) << "pair " << i;
      ++high;
    } else if (wavelength > 8192.0 / 1.0) {  // longer than the context
      EXPECT_NEAR(s, w / 8.0, 1e-15 * w) << "pair " << i;
      ++low;
    } else {  // linear blend in context/wavelength between the two
      const double t = (8192.0 / wavelength - 1.0) / (4.0 - 1.0);
      EXPECT_NEAR(s, (1 - t) * w / 8.0 + t * w, 1e-15 * w) << "pair " << i;
      EXPECT_GT(s, w / 8.0);
      EXPECT_LT(s, w);
      ++blended;
    }
  }
  // Llama 3.1's own shape has all three bands.
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(blended, 0);
}

TEST(Rotary, RejectsBadParamsAndLeavesTheHeadAlone) {
  const auto kBad = absl::StatusCode::kInvalidArgument;
  RotaryParams odd;
  odd.rotary_dims = 3;
  RotaryParams wide;
  wide.rotary_dims = 6;
  RotaryParams flat;
  flat.base = 1.0;
  RotaryParams llama;
  llama.scaling = RotaryScaling::kLlama3;
  llama.low_freq_factor = 4.0;
  llama.high_freq_factor = 4.0;  // must exceed low_freq_factor
  RotaryParams linear;
  linear.scaling = RotaryScaling::kLinear;
  linear.factor = 0.0;
  for (const RotaryParams& p : {odd, wide, flat, llama, linear}) {
    std::vector<float> head = {1, 2, 3, 4};
    EXPECT_EQ(cpu::RotateHead(p, 5, absl::MakeSpan(head)).code(), kBad);
    EXPECT_EQ(head, (std::vector<float>{1, 2, 3, 4}));
  }
  std::vector<float> odd_head = {1, 2, 3};  // D = 3, all channels: odd
  EXPECT_EQ(cpu::RotateHead(RotaryParams{}, 5, absl::MakeSpan(odd_head)).code(),
            kBad);
}

}  // namespace
}  // namespace kvmem
