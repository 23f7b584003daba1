// What the split-K decode attention kernels (decode_split_kernel.cuh,
// decode_split_fast_kernel.cuh) and their launcher (decode_attention.cu)
// share: block sizes, the workspace layout, the kernels' arguments and warp
// reductions.
#ifndef KVMEM_KERNELS_CUDA_DECODE_SPLIT_ARGS_CUH_
#define KVMEM_KERNELS_CUDA_DECODE_SPLIT_ARGS_CUH_

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/rotary_lanes.cuh"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
// Internal to decode_attention.cu, its only includer.
namespace {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 128;    // rows staged in shared memory at a time
constexpr int kUnroll = 4;        // rows in flight per row group (strided)
constexpr int kVectorUnroll = 8;  // rows in flight per row group (vector)
constexpr int kMaxSplits = 64;
constexpr int kMergeThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct WorkspaceLayout {
  size_t partial_out_offset = 0;  // [streams, splits, G, D] fp32
  size_t partial_lse_offset = 0;  // [streams, splits, G] fp32
  size_t logits_offset = 0;       // [rows_capacity, G] fp32 (probs only)
  size_t bytes = 0;
};

WorkspaceLayout LayoutWorkspace(const DecodeAttentionShape& shape, int splits) {
  WorkspaceLayout layout;
  const size_t partials = size_t(shape.streams) * splits * shape.group;
  layout.partial_lse_offset = AlignUp(partials * shape.head_dim * 4);
  layout.logits_offset = layout.partial_lse_offset + AlignUp(partials * 4);
  layout.bytes = layout.logits_offset;
  if (shape.want_probs) {
    layout.bytes += AlignUp(size_t(shape.rows_capacity) * shape.group * 4);
  }
  return layout;
}

struct SplitArgs {
  RowLayout layout;
  int group;
  float scale;
  const void* queries;
  const void* key_rows;
  const void* value_rows;
  const int32_t* rows;
  const int32_t* row_begin;
  const int32_t* row_count;
  float* partial_out;  // [streams, splits, G, D]
  float* partial_lse;  // [streams, splits, G]
  float* logits;       // [rows_capacity, G] or null
  // CACHE_RANK kernels (kRotary) only:
  LaneRotary rotary;
  const int32_t* row_positions;    // [rows_capacity]
  const int32_t* query_positions;  // [streams]
};

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  }
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, off);
  }
  return v;
}

}  // namespace
}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DECODE_SPLIT_ARGS_CUH_
