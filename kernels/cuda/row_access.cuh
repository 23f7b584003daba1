// Device helpers shared by the kernels of kernels/cuda/: how one lane of a
// "row group" of lanes reads its channels of a head row. Included by .cu
// files only.
//
// A head row is D elements of one dtype. Two layouts of lanes over a row:
// - vector: the row is split into 16-byte pieces, lanes_per_row = D·e/16
//   (a power of two ≤ 32), lane l holds channels [l·V, (l+1)·V), V = 16/e
//   (8 for bf16/fp16, 4 for fp32). Coalesced 16-byte loads.
// - strided (any D ≤ 256): lanes_per_row = 32, lane l holds channels
//   l + 32·j for j < 8.
// Either way a lane holds at most kLaneSlots channels, slot j in registers.
#ifndef KVMEM_KERNELS_CUDA_ROW_ACCESS_CUH_
#define KVMEM_KERNELS_CUDA_ROW_ACCESS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/dtype.h"

namespace kvmem::cuda {

inline constexpr int kLaneSlots = 8;

// A warp's copy of one row of `row_bytes` (`lane` of 32): 16-byte words
// when `vector` (row_bytes a multiple of 16, both ends 16-byte aligned),
// else 2-byte words. The source is read-only for the kernel's life.
__device__ __forceinline__ void CopyRow(const char* src, char* dst,
                                        size_t row_bytes, bool vector,
                                        int lane) {
  if (vector) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (size_t i = lane; i < row_bytes / 16; i += 32) d[i] = __ldg(s + i);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (size_t i = lane; i < row_bytes / 2; i += 32) d[i] = s[i];
  }
}

struct RowLayout {
  bool vector = false;
  int lanes_per_row = 32;  // power of two ≤ 32
  int head_dim = 0;
};

// The layout for D and dtype; vector when the 16-byte split fits and every
// base pointer in `aligned` is 16-byte aligned (checked by the launcher).
inline RowLayout ChooseRowLayout(int head_dim, DType dtype, bool aligned) {
  RowLayout layout;
  layout.head_dim = head_dim;
  const int row_bytes = head_dim * DTypeBytes(dtype);
  if (aligned && row_bytes % 16 == 0) {
    const int lanes = row_bytes / 16;
    if (lanes <= 32 && (lanes & (lanes - 1)) == 0) {
      layout.vector = true;
      layout.lanes_per_row = lanes;
    }
  }
  return layout;
}

inline bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Channel held by slot j of lane `lane` (may be ≥ D: unused slot).
template <DType kT>
__device__ __forceinline__ int SlotChannel(const RowLayout& layout, int lane,
                                           int j) {
  constexpr int kPerVector = kT == DType::kFp32 ? 4 : 8;
  if (layout.vector) {
    return j < kPerVector ? lane * kPerVector + j : layout.head_dim;
  }
  return lane + 32 * j;
}

template <DType kT>
__device__ __forceinline__ float ElementToFloat(const void* row, int i) {
  if constexpr (kT == DType::kFp32) {
    return static_cast<const float*>(row)[i];
  } else if constexpr (kT == DType::kBf16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(row)[i]);
  } else {
    return __half2float(static_cast<const __half*>(row)[i]);
  }
}

// Unpacks a 16-byte piece into x[0..V).
template <DType kT>
__device__ __forceinline__ void UnpackVector(const uint4& v,
                                             float (&x)[kLaneSlots]) {
  if constexpr (kT == DType::kFp32) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
#pragma unroll
    for (int j = 4; j < kLaneSlots; ++j) x[j] = 0.0f;
  } else {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint16_t lo = static_cast<uint16_t>(words[w] & 0xffffu);
      const uint16_t hi = static_cast<uint16_t>(words[w] >> 16);
      if constexpr (kT == DType::kBf16) {
        x[2 * w] = __uint_as_float(uint32_t{lo} << 16);
        x[2 * w + 1] = __uint_as_float(uint32_t{hi} << 16);
      } else {
        x[2 * w] = __half2float(__ushort_as_half(lo));
        x[2 * w + 1] = __half2float(__ushort_as_half(hi));
      }
    }
  }
}

// The raw 16-byte piece of lane `lane` (vector layout only).
__device__ __forceinline__ uint4 LoadPiece(const void* row, int lane) {
  return __ldg(static_cast<const uint4*>(row) + lane);
}

// Lane `lane`'s channels of `row` as fp32; 0 in unused slots.
template <DType kT>
__device__ __forceinline__ void LoadLaneChannels(const RowLayout& layout,
                                                 const void* row, int lane,
                                                 float (&x)[kLaneSlots]) {
  if (layout.vector) {
    UnpackVector<kT>(LoadPiece(row, lane), x);
    return;
  }
#pragma unroll
  for (int j = 0; j < kLaneSlots; ++j) {
    const int c = lane + 32 * j;
    x[j] = c < layout.head_dim ? ElementToFloat<kT>(row, c) : 0.0f;
  }
}

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_ROW_ACCESS_CUH_
