// Rotary position embedding (RoPE) for CACHE_RANK sessions, where kvmem
// rotates queries and keys itself at cache-rank positions (DESIGN.md §
// Positions mode). Angles are computed in fp64 and applied in fp32, so both
// backends agree however large the position. Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_ROTARY_H_
#define KVMEM_KERNELS_ROTARY_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"
#include "kernels/policy_math.h"  // MulF, AddF: never-fused fp32 ops

namespace kvmem {

// Which channels form rotary pair i (i < rotated_dims / 2).
enum class RotaryPairing : int {
  kHalfSplit = 0,    // (i, i + rotated_dims/2): GPT-NeoX / Hugging Face Llama
  kInterleaved = 1,  // (2i, 2i + 1): GPT-J / Meta's original Llama code
};

// How positions are stretched to reach past the trained context.
enum class RotaryScaling : int {
  kNone = 0,
  kLinear = 1,  // every angle divided by `factor` (position interpolation)
  kLlama3 = 2,  // Llama 3.1: only the low frequencies are divided (see .cc)
};

// A model's rotary embedding. Channels [rotated_dims, D) are not rotated.
struct RotaryParams {
  // θ, > 1: before scaling, pair i turns by θ^(−2i/rotated_dims) rad/pos.
  double base = 10000.0;
  int rotary_dims = 0;  // channels rotated: even, ≤ D; 0 means all D
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
  RotaryScaling scaling = RotaryScaling::kNone;
  double factor = 1.0;            // LINEAR, LLAMA3: stretch; finite, > 0
  double low_freq_factor = 1.0;   // LLAMA3: finite, > 0
  double high_freq_factor = 4.0;  // LLAMA3: finite, > low_freq_factor
  double original_max_positions = 8192.0;  // LLAMA3: trained context; > 0

  // OK, or INVALID_ARGUMENT naming the first bad field and its value.
  absl::Status Validate(int head_dim) const;
  // The number of rotated channels for head dim `head_dim`.
  int RotatedDims(int head_dim) const {
    return rotary_dims == 0 ? head_dim : rotary_dims;
  }
};

// Channels (*a, *b) of rotary pair `pair` (< rotated_dims / 2).
KVMEM_HD void RotaryPairChannels(RotaryPairing pairing, int rotated_dims,
                                 int pair, int* a, int* b) {
  if (pairing == RotaryPairing::kInterleaved) {
    *a = 2 * pair;
    *b = 2 * pair + 1;
  } else {
    *a = pair;
    *b = pair + rotated_dims / 2;
  }
}

// Turns the pair (*a, *b) by `angle_rad`: a' = a·cos − b·sin,
// b' = a·sin + b·cos. cos and sin are taken in fp64, rounded to fp32, and
// the products are fp32, as DESIGN.md § Contract fixes.
KVMEM_HD void RotatePair(double angle_rad, float* a, float* b) {
  const float c = static_cast<float>(cos(angle_rad));
  const float s = static_cast<float>(sin(angle_rad));
  const float x = *a;
  const float y = *b;
  *a = AddF(MulF(x, c), -MulF(y, s));
  *b = AddF(MulF(x, s), MulF(y, c));
}

// Angular speed of each pair, scaling applied: [rotated_dims / 2] fp64,
// radians per position. Pair i at position m turns by m · result[i].
// INVALID_ARGUMENT as Validate.
absl::StatusOr<std::vector<double>> RotaryInverseFrequencies(
    const RotaryParams& params, int head_dim);

namespace cpu {

// Rotates one head vector `head` ([D] fp32, in place) to `position`, with
// speeds from RotaryInverseFrequencies (`inv_freq`: [rotated_dims / 2]).
// Channels past 2·inv_freq.size() are left as they are. The caller
// guarantees 2·inv_freq.size() ≤ head.size().
void RotateHeadWithFrequencies(absl::Span<const double> inv_freq,
                               RotaryPairing pairing, int64_t position,
                               absl::Span<float> head);

// Rotates `head` ([D] fp32, D = head.size(), in place) to `position`.
// INVALID_ARGUMENT (head unchanged) when `params` is invalid for D.
absl::Status RotateHead(const RotaryParams& params, int64_t position,
                        absl::Span<float> head);

}  // namespace cpu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_ROTARY_H_
