// Device helper: rotary embedding (RoPE) of a head row held across the
// lanes of a row group (row_access.cuh), for CACHE_RANK sessions, whose
// keys are stored before rotary and rotated at their cache rank on every
// step (DESIGN.md § Positions mode). Included by .cu files only.
//
// The arithmetic is kernels/rotary.h's RotatePair: pair i turns by
// position · inv_freq[i] radians, the angle and its cos and sin in fp64,
// rounded to fp32, then fp32 products and sums without contraction (MulF,
// AddF). A rotated channel thus has the CPU's bits whenever the device's
// fp64 cos/sin round to the same fp32 as the host's (both are within 2 ulp
// of fp64, so they differ only within that of an fp32 rounding boundary).
#ifndef KVMEM_KERNELS_CUDA_ROTARY_LANES_CUH_
#define KVMEM_KERNELS_CUDA_ROTARY_LANES_CUH_

#include "kernels/cuda/row_access.cuh"
#include "kernels/policy_math.h"
#include "kernels/rotary.h"

namespace kvmem::cuda {

struct LaneRotary {
  const double* inv_freq = nullptr;  // [rotated_dims / 2] rad/pos, device
  int rotated_dims = 0;              // R: even, 2..D
  RotaryPairing pairing = RotaryPairing::kHalfSplit;
};

// Whether the two channels of every pair sit in one lane, or at one slot
// of two lanes of a row group, which is what RotateLaneChannels handles:
// - interleaved pairs (2i, 2i + 1): always (vector: one lane; strided:
//   lanes l, l ^ 1 at one slot);
// - half-split pairs (i, i + R/2): vector when R/2 is a multiple of the
//   channels a lane holds (lanes l, l + R/(2V) at one slot); strided when
//   R/2 is a multiple of 32 (one lane, slots j, j + R/64).
inline bool LaneRotarySupported(const RowLayout& layout, DType dtype,
                                int rotated_dims, RotaryPairing pairing) {
  if (rotated_dims < 2 || rotated_dims % 2 != 0 ||
      rotated_dims > layout.head_dim) {
    return false;
  }
  if (pairing == RotaryPairing::kInterleaved) return true;
  if (pairing != RotaryPairing::kHalfSplit) return false;
  const int half = rotated_dims / 2;
  const int per_vector = dtype == DType::kFp32 ? 4 : 8;
  return layout.vector ? half % per_vector == 0 : half % 32 == 0;
}

// Rotates this lane's channels x (slot j holds channel SlotChannel(j)) of
// a row to `position`; channels ≥ R stay. Every lane of the warp must call
// it together (it shuffles), with its own row group's position; the
// layout must be LaneRotarySupported.
template <DType kT>
__device__ __forceinline__ void RotateLaneChannels(const RowLayout& layout,
                                                   const LaneRotary& rotary,
                                                   int lane, int64_t position,
                                                   float (&x)[kLaneSlots]) {
  constexpr int kPerVector = kT == DType::kFp32 ? 4 : 8;
  constexpr unsigned kAll = 0xffffffffu;
  const int dims = rotary.rotated_dims;
  const int half = dims / 2;
  const bool interleaved = rotary.pairing == RotaryPairing::kInterleaved;
  float partner[kLaneSlots];
  if (interleaved && layout.vector) {
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) partner[j] = x[j ^ 1];
  } else if (interleaved) {
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) {
      partner[j] = __shfl_xor_sync(kAll, x[j], 1);
    }
  } else if (layout.vector) {
    // Lane l's partner is lane l ± R/(2V), at the same slots.
    const int apart = half / kPerVector;
    const int first = lane * kPerVector;
    const int from = first < half   ? lane + apart
                     : first < dims ? lane - apart
                                    : lane;
    const int warp_lane = int(threadIdx.x % 32);
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) {
      partner[j] = __shfl_sync(kAll, x[j], warp_lane - lane + from);
    }
  } else {
    // Strided: channel l + 32j's partner is slot j ± R/64 of this lane.
    const int apart = half / 32;
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) {
      const int c = lane + 32 * j;
      const int from = c < half ? j + apart : j - apart;
      float p = 0.0f;
#pragma unroll
      for (int k = 0; k < kLaneSlots; ++k) p = k == from ? x[k] : p;
      partner[j] = p;
    }
  }
#pragma unroll
  for (int j = 0; j < kLaneSlots; ++j) {
    const int c = SlotChannel<kT>(layout, lane, j);
    if (c >= dims) continue;  // not rotated (or an unused slot)
    const bool first = interleaved ? c % 2 == 0 : c < half;
    const int pair = interleaved ? c / 2 : first ? c : c - half;
    double sine, cosine;
    sincos(static_cast<double>(position) * rotary.inv_freq[pair], &sine,
           &cosine);
    const float cf = static_cast<float>(cosine);
    const float sf = static_cast<float>(sine);
    x[j] = first ? AddF(MulF(x[j], cf), -MulF(partner[j], sf))
                 : AddF(MulF(partner[j], sf), MulF(x[j], cf));
  }
}

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_ROTARY_LANES_CUH_
