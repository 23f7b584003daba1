// Rotary parameters, their frequencies, and the CPU rotation.
#include "kernels/rotary.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

bool PositiveFinite(double x) { return std::isfinite(x) && x > 0.0; }

absl::Status Bad(const char* field, double got, const char* want) {
  return absl::InvalidArgumentError(
      absl::StrCat("rotary.", field, ": ", got, ", want ", want));
}

// Llama 3.1's frequency scaling: a pair whose wavelength (positions per
// turn) is short next to the trained context keeps its speed, since the
// model saw it turn many times; one whose wavelength exceeds the trained
// context is slowed by `factor`, as in position interpolation; in between,
// the speed blends linearly (in context/wavelength) from slowed to unscaled.
double Llama3ScaledFrequency(const RotaryParams& p, double inv_freq) {
  const double wavelength = kTwoPi / inv_freq;
  const double short_limit = p.original_max_positions / p.high_freq_factor;
  const double long_limit = p.original_max_positions / p.low_freq_factor;
  if (wavelength < short_limit) return inv_freq;
  if (wavelength > long_limit) return inv_freq / p.factor;
  // 0 at wavelength == long_limit, 1 at wavelength == short_limit.
  const double blend =
      (p.original_max_positions / wavelength - p.low_freq_factor) /
      (p.high_freq_factor - p.low_freq_factor);
  return (1.0 - blend) * inv_freq / p.factor + blend * inv_freq;
}

}  // namespace

absl::Status RotaryParams::Validate(int head_dim) const {
  if (head_dim < 1) return Bad("head_dim", head_dim, ">= 1");
  if (!std::isfinite(base) || base <= 1.0) return Bad("base", base, "> 1");
  const int dims = RotatedDims(head_dim);
  if (rotary_dims < 0 || dims > head_dim || dims % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rotary.rotary_dims: ", rotary_dims, " (", dims,
                     " channels), want even and <= head dim ", head_dim));
  }
  if (pairing != RotaryPairing::kHalfSplit &&
      pairing != RotaryPairing::kInterleaved) {
    return Bad("pairing", static_cast<int>(pairing),
               "half-split or interleaved");
  }
  switch (scaling) {
    case RotaryScaling::kNone:
      return absl::OkStatus();
    case RotaryScaling::kLinear:
      if (!PositiveFinite(factor)) return Bad("factor", factor, "> 0");
      return absl::OkStatus();
    case RotaryScaling::kLlama3:
      if (!PositiveFinite(factor)) return Bad("factor", factor, "> 0");
      if (!PositiveFinite(low_freq_factor)) {
        return Bad("low_freq_factor", low_freq_factor, "> 0");
      }
      if (!std::isfinite(high_freq_factor) ||
          high_freq_factor <= low_freq_factor) {
        return Bad("high_freq_factor", high_freq_factor, "> low_freq_factor");
      }
      if (!PositiveFinite(original_max_positions)) {
        return Bad("original_max_positions", original_max_positions, "> 0");
      }
      return absl::OkStatus();
  }
  return Bad("scaling", static_cast<int>(scaling), "NONE, LINEAR or LLAMA3");
}

absl::StatusOr<std::vector<double>> RotaryInverseFrequencies(
    const RotaryParams& params, int head_dim) {
  absl::Status valid = params.Validate(head_dim);
  if (!valid.ok()) return valid;
  const int dims = params.RotatedDims(head_dim);
  std::vector<double> inv_freq(dims / 2);
  for (int i = 0; i < dims / 2; ++i) {
    double f = std::pow(params.base, -2.0 * i / dims);
    if (params.scaling == RotaryScaling::kLinear) f /= params.factor;
    if (params.scaling == RotaryScaling::kLlama3) {
      f = Llama3ScaledFrequency(params, f);
    }
    inv_freq[i] = f;
  }
  return inv_freq;
}

namespace cpu {

void RotateHeadWithFrequencies(absl::Span<const double> inv_freq,
                               RotaryPairing pairing, int64_t position,
                               absl::Span<float> head) {
  const int dims = 2 * static_cast<int>(inv_freq.size());
  for (int i = 0; i < dims / 2; ++i) {
    int a = 0;
    int b = 0;
    RotaryPairChannels(pairing, dims, i, &a, &b);
    RotatePair(static_cast<double>(position) * inv_freq[i], &head[a], &head[b]);
  }
}

absl::Status RotateHead(const RotaryParams& params, int64_t position,
                        absl::Span<float> head) {
  absl::StatusOr<std::vector<double>> inv_freq =
      RotaryInverseFrequencies(params, static_cast<int>(head.size()));
  if (!inv_freq.ok()) return inv_freq.status();
  RotateHeadWithFrequencies(*inv_freq, params.pairing, position, head);
  return absl::OkStatus();
}

}  // namespace cpu
}  // namespace kvmem
