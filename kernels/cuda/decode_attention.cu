// Split-K decode attention: kernel 1 gives each (stream, split) block a
// contiguous share of the stream's rows and writes a partial (o, lse); kernel
// 2 merges the partials per stream and, when asked, turns the logits kept by
// kernel 1 into the group-reduced probabilities. Kernel 1 is
// decode_split_kernel.cuh (any shape, CACHE_RANK's rotation) or
// decode_split_fast_kernel.cuh (D 128 in bf16/fp16, tensor cores).
#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/decode_split_args.cuh"
#include "kernels/cuda/decode_split_fast_kernel.cuh"
#include "kernels/cuda/decode_split_kernel.cuh"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/rotary_lanes.cuh"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
namespace {

struct MergeArgs {
  int group;
  int head_dim;
  int splits;
  DType dtype;
  ScoreReduction reduction;
  const float* partial_out;
  const float* partial_lse;
  const float* logits;
  const int32_t* row_begin;
  const int32_t* row_count;
  float* out_fp32;
  void* out;
  float* lse;
  float* reduced_probs;
};

// Blocks (stream, y): each finds the stream's lse = M + ln Σ e^(lse_i − M)
// (block 0 writes it); block y takes the elements y·128 + tid, stepping by
// gridDim.y·128, of o = Σ e^(lse_i − lse)·o_i and of the reduced
// probabilities (the bulk of the work at a 2K budget). Spread, so that a
// small batch does not leave a stream's splits to one block.
__global__ void __launch_bounds__(kMergeThreads)
    DecodeMergeKernel(const MergeArgs args) {
  WaitForPriorGrids();  // the splits' partial outputs
  __shared__ float s_weight[kMaxDecodeGroup][kMaxSplits];
  __shared__ float s_partial[kMaxDecodeGroup * kMaxSplits];  // [split][g]
  __shared__ float s_lse[kMaxDecodeGroup];
  const int stream = blockIdx.x;
  const int group = args.group;
  const int splits = args.splits;
  const int tid = threadIdx.x;
  const size_t base = size_t(stream) * splits * group;
  // The partial LSEs in one round of loads, not a chain of them per row.
  for (int i = tid; i < splits * group; i += kMergeThreads) {
    s_partial[i] = args.partial_lse[base + size_t(i)];
  }
  __syncthreads();
  // Warp g takes head g (and g + 4, …), a lane per split.
  const int warp = tid / 32;
  const int lane = tid % 32;
  for (int g = warp; g < group; g += kMergeThreads / 32) {
    float top = -INFINITY;
    for (int i = lane; i < splits; i += 32) {
      top = fmaxf(top, s_partial[i * group + g]);
    }
    top = WarpMax(top);
    float total = 0.0f;
    if (top != -INFINITY) {
      for (int i = lane; i < splits; i += 32) {
        total += expf(s_partial[i * group + g] - top);
      }
    }
    total = WarpSum(total);
    for (int i = lane; i < splits; i += 32) {
      s_weight[g][i] = top == -INFINITY
                           ? 0.0f
                           : expf(s_partial[i * group + g] - top) / total;
    }
    if (lane == 0) {
      const float merged = top == -INFINITY ? -INFINITY : top + logf(total);
      s_lse[g] = merged;
      if (blockIdx.y == 0) args.lse[size_t(stream) * group + g] = merged;
    }
  }
  __syncthreads();
  const int head_dim = args.head_dim;
  for (int idx = blockIdx.y * kMergeThreads + tid; idx < group * head_dim;
       idx += gridDim.y * kMergeThreads) {
    const int g = idx / head_dim;
    // Every split wrote its partial (zeros when it had no rows), so the
    // loads are unconditional and independent: they go out together.
    float o = 0.0f;
#pragma unroll 8
    for (int i = 0; i < splits; ++i) {
      o = fmaf(s_weight[g][i],
               args.partial_out[(base + size_t(i) * group) * head_dim + idx],
               o);
    }
    const size_t at = size_t(stream) * group * head_dim + idx;
    if (args.out_fp32 != nullptr) args.out_fp32[at] = o;
    if (args.out != nullptr) {
      if (args.dtype == DType::kFp32) {
        static_cast<float*>(args.out)[at] = o;
      } else {
        static_cast<uint16_t*>(args.out)[at] =
            args.dtype == DType::kBf16 ? FloatToBf16(o) : FloatToFp16(o);
      }
    }
  }
  if (args.reduced_probs == nullptr) return;
  const int n = args.row_count[stream];
  const int begin = args.row_begin[stream];
  for (int t = blockIdx.y * kMergeThreads + tid; t < n;
       t += gridDim.y * kMergeThreads) {
    float p[kMaxDecodeGroup];
#pragma unroll
    for (int g = 0; g < kMaxDecodeGroup; ++g) {
      p[g] = g < group
                 ? expf(args.logits[size_t(begin + t) * group + g] - s_lse[g])
                 : 0.0f;
    }
    args.reduced_probs[begin + t] =
        ReduceGroupProbability(p, group, 1, args.reduction);
  }
}

int GroupSlots(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

template <DType kT>
void* FastSplitKernelFor(int slots) {
  switch (slots) {
    case 1:
      return reinterpret_cast<void*>(&DecodeSplitFastKernel<kT, 1>);
    case 2:
      return reinterpret_cast<void*>(&DecodeSplitFastKernel<kT, 2>);
    case 4:
      return reinterpret_cast<void*>(&DecodeSplitFastKernel<kT, 4>);
    default:
      return reinterpret_cast<void*>(&DecodeSplitFastKernel<kT, 8>);
  }
}

template <DType kT, bool kRotary>
void* SplitKernelFor(int slots) {
  switch (slots) {
    case 1:
      return reinterpret_cast<void*>(&DecodeSplitKernel<kT, 1, kRotary>);
    case 2:
      return reinterpret_cast<void*>(&DecodeSplitKernel<kT, 2, kRotary>);
    case 4:
      return reinterpret_cast<void*>(&DecodeSplitKernel<kT, 4, kRotary>);
    default:
      return reinterpret_cast<void*>(&DecodeSplitKernel<kT, 8, kRotary>);
  }
}

template <bool kRotary>
void* GeneralSplitKernelFor(DType dtype, int slots) {
  return dtype == DType::kBf16   ? SplitKernelFor<DType::kBf16, kRotary>(slots)
         : dtype == DType::kFp16 ? SplitKernelFor<DType::kFp16, kRotary>(slots)
                                 : SplitKernelFor<DType::kFp32, kRotary>(slots);
}

absl::Status ValidateShape(const DecodeAttentionShape& shape) {
  if (shape.streams < 1 || shape.streams > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams: ", shape.streams, ", want 1..65535"));
  }
  if (shape.group < 1 || shape.group > kMaxDecodeGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("group: ", shape.group, ", want 1..", kMaxDecodeGroup));
  }
  if (shape.head_dim < 1 || shape.head_dim > kMaxDecodeHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim: ", shape.head_dim, ", want 1..", kMaxDecodeHeadDim));
  }
  if (shape.dtype != DType::kBf16 && shape.dtype != DType::kFp16 &&
      shape.dtype != DType::kFp32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dtype: ", static_cast<int>(shape.dtype), ", want bf16/fp16/fp32"));
  }
  if (shape.max_rows_per_stream < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_rows_per_stream: ", shape.max_rows_per_stream, ", want >= 1"));
  }
  if (shape.rows_capacity < 0 || shape.rows_capacity > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rows_capacity: ", shape.rows_capacity, ", want 0..2^31-1"));
  }
  return absl::OkStatus();
}

}  // namespace

bool DecodeAttentionRotarySupported(int head_dim, DType dtype, int rotated_dims,
                                    RotaryPairing pairing) {
  if (head_dim < 1 || head_dim > kMaxDecodeHeadDim) return false;
  return LaneRotarySupported(ChooseRowLayout(head_dim, dtype, true), dtype,
                             rotated_dims, pairing);
}

absl::StatusOr<DecodeAttentionPlan> PlanDecodeAttention(
    const DecodeAttentionShape& shape, int multiprocessors) {
  absl::Status valid = ValidateShape(shape);
  if (!valid.ok()) return valid;
  if (multiprocessors < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("multiprocessors: ", multiprocessors, ", want >= 1"));
  }
  // Enough rows per block to amortise its setup (at most 256), enough
  // blocks to fill the device about four times over, no split under 32
  // rows.
  const int by_rows = (shape.max_rows_per_stream + 255) / 256;
  const int by_device =
      (4 * multiprocessors + shape.streams - 1) / shape.streams;
  const int most = (shape.max_rows_per_stream + 31) / 32;
  int splits = by_rows > by_device ? by_rows : by_device;
  if (splits > most) splits = most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  DecodeAttentionPlan plan;
  plan.splits = splits;
  plan.workspace_bytes = LayoutWorkspace(shape, splits).bytes;
  return plan;
}

absl::StatusOr<DecodeAttentionPlan> PlanDecodeAttentionSplits(
    const DecodeAttentionShape& shape, int splits) {
  absl::Status valid = ValidateShape(shape);
  if (!valid.ok()) return valid;
  if (splits < 1 || splits > kMaxSplits) {
    return absl::InvalidArgumentError(
        absl::StrCat("splits: ", splits, ", want 1..", kMaxSplits));
  }
  DecodeAttentionPlan plan;
  plan.splits = splits;
  plan.workspace_bytes = LayoutWorkspace(shape, splits).bytes;
  return plan;
}

absl::Status DecodeAttention(const DecodeAttentionShape& shape,
                             const DecodeAttentionInputs& inputs,
                             const DecodeAttentionOutputs& outputs,
                             const DecodeAttentionPlan& plan, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  absl::Status valid = ValidateShape(shape);
  if (!valid.ok()) return valid;
  if (inputs.queries == nullptr || inputs.key_rows == nullptr ||
      inputs.value_rows == nullptr || inputs.rows == nullptr ||
      inputs.row_begin == nullptr || inputs.row_count == nullptr) {
    return absl::InvalidArgumentError(
        "inputs: queries, key_rows, value_rows, rows, row_begin and "
        "row_count must all be set");
  }
  if (!std::isfinite(inputs.softmax_scale) || inputs.softmax_scale <= 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "softmax_scale: ", inputs.softmax_scale, ", want finite and > 0"));
  }
  if (inputs.reduction != ScoreReduction::kMax &&
      inputs.reduction != ScoreReduction::kMean) {
    return absl::InvalidArgumentError(
        absl::StrCat("reduction: ", static_cast<int>(inputs.reduction),
                     ", want MAX or MEAN"));
  }
  if (outputs.lse == nullptr ||
      (outputs.out_fp32 == nullptr && outputs.out == nullptr)) {
    return absl::InvalidArgumentError(
        "outputs: lse and at least one of out_fp32 / out must be set");
  }
  if (shape.want_probs != (outputs.reduced_probs != nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("outputs.reduced_probs: ",
                     outputs.reduced_probs == nullptr ? "null" : "set",
                     ", want it set iff shape.want_probs"));
  }
  if (plan.splits < 1 || plan.splits > kMaxSplits) {
    return absl::InvalidArgumentError(
        absl::StrCat("plan.splits: ", plan.splits, ", want 1..", kMaxSplits));
  }
  const WorkspaceLayout ws = LayoutWorkspace(shape, plan.splits);
  if (workspace == nullptr || workspace_bytes < ws.bytes ||
      (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("workspace: ", workspace_bytes, " bytes",
                     workspace == nullptr ? " (null)" : "",
                     ", want >= ", ws.bytes, " bytes, 256-byte aligned"));
  }
  char* ws_base = static_cast<char*>(workspace);
  const bool aligned = Aligned16(inputs.queries) &&
                       Aligned16(inputs.key_rows) &&
                       Aligned16(inputs.value_rows);
  SplitArgs args;
  args.layout = ChooseRowLayout(shape.head_dim, shape.dtype, aligned);
  const bool rotary = inputs.row_positions != nullptr;
  if (rotary) {
    if (inputs.query_positions == nullptr || inputs.inv_freq == nullptr) {
      return absl::InvalidArgumentError(
          "inputs: query_positions and inv_freq must be set with "
          "row_positions");
    }
    if (!LaneRotarySupported(args.layout, shape.dtype, inputs.rotated_dims,
                             inputs.pairing)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "inputs.rotated_dims: ", inputs.rotated_dims, " with pairing ",
          static_cast<int>(inputs.pairing), " at head_dim ", shape.head_dim,
          aligned ? "" : " (unaligned)",
          ", want even, 2..head_dim, with each pair's channels in one lane "
          "or at one slot of two (DecodeAttentionRotarySupported)"));
    }
    args.rotary = {inputs.inv_freq, inputs.rotated_dims, inputs.pairing};
  }
  args.row_positions = inputs.row_positions;
  args.query_positions = inputs.query_positions;
  args.group = shape.group;
  args.scale = inputs.softmax_scale;
  args.queries = inputs.queries;
  args.key_rows = inputs.key_rows;
  args.value_rows = inputs.value_rows;
  args.rows = inputs.rows;
  args.row_begin = inputs.row_begin;
  args.row_count = inputs.row_count;
  args.partial_out = reinterpret_cast<float*>(ws_base + ws.partial_out_offset);
  args.partial_lse = reinterpret_cast<float*>(ws_base + ws.partial_lse_offset);
  args.logits = shape.want_probs
                    ? reinterpret_cast<float*>(ws_base + ws.logits_offset)
                    : nullptr;

  const int slots = GroupSlots(shape.group);
  const int row_groups = kThreads / args.layout.lanes_per_row;
  size_t smem = sizeof(float) * (size_t(slots) * kTileRows +
                                 size_t(row_groups) * slots * shape.head_dim +
                                 3 * size_t(slots)) +
                sizeof(int) * 2 * kTileRows;
  const bool fast = args.layout.vector && shape.head_dim == kFastHeadDim &&
                    shape.dtype != DType::kFp32 && !rotary;
  void* kernel = fast     ? (shape.dtype == DType::kBf16
                                 ? FastSplitKernelFor<DType::kBf16>(slots)
                                 : FastSplitKernelFor<DType::kFp16>(slots))
                 : rotary ? GeneralSplitKernelFor<true>(shape.dtype, slots)
                          : GeneralSplitKernelFor<false>(shape.dtype, slots);
  if (fast) smem = kFastSmemBytes;  // the staged tiles
  if (absl::Status allowed = AllowDynamicSharedMemory(kernel, smem);
      !allowed.ok()) {
    return allowed;
  }
  void* kernel_args[] = {&args};
  if (absl::Status launched =
          LaunchAfterPrior(kernel, dim3(plan.splits, shape.streams),
                           dim3(kThreads), smem, stream, kernel_args);
      !launched.ok()) {
    return launched;
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("DecodeSplitKernel");

  MergeArgs merge;
  merge.group = shape.group;
  merge.head_dim = shape.head_dim;
  merge.splits = plan.splits;
  merge.dtype = shape.dtype;
  merge.reduction = inputs.reduction;
  merge.partial_out = args.partial_out;
  merge.partial_lse = args.partial_lse;
  merge.logits = args.logits;
  merge.row_begin = inputs.row_begin;
  merge.row_count = inputs.row_count;
  merge.out_fp32 = outputs.out_fp32;
  merge.out = outputs.out;
  merge.lse = outputs.lse;
  merge.reduced_probs = outputs.reduced_probs;
  // Blocks per stream: an output element a thread, and a budget's rows one
  // per thread when it has probabilities to reduce.
  const int out_blocks =
      (shape.group * shape.head_dim + kMergeThreads - 1) / kMergeThreads;
  const int prob_blocks =
      outputs.reduced_probs == nullptr
          ? 1
          : std::min(64, (shape.max_rows_per_stream + kMergeThreads - 1) /
                             kMergeThreads);
  void* merge_args[] = {&merge};
  if (absl::Status launched = LaunchAfterPrior(
          reinterpret_cast<const void*>(&DecodeMergeKernel),
          dim3(shape.streams, std::max(out_blocks, prob_blocks)),
          dim3(kMergeThreads), 0, stream, merge_args);
      !launched.ok()) {
    return launched;
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("DecodeMergeKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
