// The cascade policy's arithmetic (specs/cascade.md §2–3, DESIGN.md § Scores
// in fp32 and § Backend parity), shared by the CPU and CUDA backends so that
// both take the same decisions from the same inputs. Header-only,
// __host__ __device__, no containers. Thread-safe (pure functions).
//
// Scores are kept as u = s·β^(−n) (fp32) per slot, n = query tokens since the
// stream's last renormalisation: query q of a step adds
// f(n+1+q)·r(q, slot) with f(k) = (1−β)·β^(−k). The decay is exact (it is
// carried by n) and only the increments round, whereas fp32 β·s at
// β = 0.9999999 moves s by 1–2 ulp and so quantises the decay.
//
// Operation order is fixed and never contracted into FMAs: every product that
// feeds a sum goes through MulF/MulD. On the device these are __fmul_rn /
// __dmul_rn, which nvcc never fuses. On the host the product goes through an
// empty asm statement, which GCC and Clang cannot see through, so no
// -ffp-contract setting (GCC's C++ default is "fast") and no -mfma can fuse
// it; builds therefore need no special flag.
#ifndef KVMEM_KERNELS_POLICY_MATH_H_
#define KVMEM_KERNELS_POLICY_MATH_H_

#include <cstdint>

#include "kernels/dtype.h"  // KVMEM_HD

namespace kvmem {

// β^(−n) above this ⇒ every u is multiplied by β^n and n restarts at 0
// (DESIGN.md). Keeps u within 2^20 of s, far from fp32 overflow.
constexpr double kRenormScale = 1048576.0;  // 2^20
// β^(−k) above this within one step ⇒ renormalise before query k. Only
// reached when (n + T)·ln(1/β) > 64·ln 2 with n ≤ 20·ln 2 / ln(1/β): e.g.
// β = 1/2 with T > 44, β = 0.99 with T > ~3000, never at β = 0.9999999 with
// T < 3·10^8. Keeps u ≤ ~2^65·s, far inside fp32.
constexpr double kMidStepRenormScale = 1.8446744073709552e19;  // 2^64
// Relative gap below which two EMA scores are a near-tie: either duel
// outcome is correct there (DESIGN.md § Backend parity).
constexpr float kScoreNearTieRelative = 1e-5f;

// Group reduction of per-query-head probabilities (kvmem.v1 policy field).
enum class ScoreReduction : int { kMax = 1, kMean = 2 };

// Rounded, never-fused fp32 / fp64 operations (see the file comment).
KVMEM_HD float MulF(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float p = a * b;
#if defined(__GNUC__)
  __asm__("" : "+m"(p));  // opaque to the optimiser: p cannot join an FMA
#endif
  return p;
#endif
}
KVMEM_HD float AddF(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KVMEM_HD float DivF(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // never turned into a product that could fuse
#else
  return a / b;
#endif
}
KVMEM_HD double MulD(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double p = a * b;
#if defined(__GNUC__)
  __asm__("" : "+m"(p));
#endif
  return p;
#endif
}

// x^k for k ≥ 0 by binary powering with rounded double products: the same
// bits on both backends (unlike pow(), whose last ulp differs by libm).
KVMEM_HD double PowInt(double x, int64_t k) {
  double result = 1.0;
  double base = x;
  while (k > 0) {
    if (k & 1) result = MulD(result, base);
    k >>= 1;
    if (k > 0) base = MulD(base, base);
  }
  return result;
}

// f(k) = (1−β)·β^(−k) in double, rounded once to fp32: the increment factor
// of the k-th query token since the last renormalisation (k ≥ 1).
KVMEM_HD float IncrementFactor(double beta, int64_t k) {
  return float(MulD(1.0 - beta, PowInt(1.0 / beta, k)));
}

// u ← u + f·r. A slot not attended by a query has r = 0 and may skip this.
KVMEM_HD float AccumulateScore(float u, float factor, float prob) {
  return AddF(u, MulF(factor, prob));
}

// True when the stream at exponent n must renormalise (β^(−n) > 2^20).
KVMEM_HD bool NeedsRenormalisation(double beta, int64_t n) {
  return PowInt(1.0 / beta, n) > kRenormScale;
}

// True when query k (1-based exponent) of a step would use a factor above
// kMidStepRenormScale: renormalise at n = k − 1 first.
KVMEM_HD bool NeedsMidStepRenormalisation(double beta, int64_t k) {
  return PowInt(1.0 / beta, k) > kMidStepRenormScale;
}

// The scale β^n that maps u at exponent n to s; also the renormalisation
// multiplier.
KVMEM_HD double ScoreScale(double beta, int64_t n) { return PowInt(beta, n); }

// u·scale rounded once to fp32 (renormalisation, and s for reports).
KVMEM_HD float RescaleScore(float u, double scale) {
  return float(MulD(double(u), scale));
}

// Duel of a non-accepting cascade (cascade.md §2 d): the carried token
// replaces the newest resident iff its score is ≥ (ties go to the carry).
// Both scores are u at the same exponent n, so this compares s.
KVMEM_HD bool CarryWinsDuel(float carry_u, float newest_u) {
  return carry_u >= newest_u;
}

// |a−b| < 1e-5·max(|a|,|b|): a decision on these scores may go either way.
KVMEM_HD bool IsScoreNearTie(float a, float b) {
  float fa = a < 0 ? -a : a;
  float fb = b < 0 ? -b : b;
  float m = fa > fb ? fa : fb;
  float d = a > b ? a - b : b - a;
  return d < MulF(kScoreNearTieRelative, m);
}

// Number of cascades accepting the incoming token at absolute position t
// (t ≥ sinks): they are always cascades 0..count−1 (cascade.md §2 step 2).
// Eager fill while t − S ≤ C·W: all C. Otherwise cascade i accepts iff
// (t − S) mod 2^i = 0, i.e. count = min(C, trailing zeros of (t − S) + 1);
// t − S = 0 is divisible by everything.
KVMEM_HD int AcceptingCascades(int64_t t, int sinks, int cascades, int window,
                               bool eager_fill) {
  int64_t offset = t - sinks;
  if (eager_fill && offset <= int64_t{cascades} * window) return cascades;
  if (offset == 0) return cascades;
  int count = 1;
  while (count < cascades && (offset & 1) == 0) {
    offset >>= 1;
    ++count;
  }
  return count;
}

// r = reduction over `group` query heads of probs[g·stride] (g ascending;
// MEAN sums in that order, then divides by the group size).
KVMEM_HD float ReduceGroupProbability(const float* probs, int group,
                                      int64_t stride,
                                      ScoreReduction reduction) {
  float r = probs[0];
  for (int g = 1; g < group; ++g) {
    float p = probs[g * stride];
    if (reduction == ScoreReduction::kMax) {
      r = p > r ? p : r;
    } else {
      r = AddF(r, p);
    }
  }
  return reduction == ScoreReduction::kMax ? r : DivF(r, float(group));
}

}  // namespace kvmem

#endif  // KVMEM_KERNELS_POLICY_MATH_H_
