// The four launches of a prefill chunk (chunk_attention.h). The two
// attention passes come in two families (ChunkKernels): on an H100/H200
// the wgmma kernels of chunk_attention_sm90a.cu, elsewhere the ones here.
// Both attention kernels here use mma.sync m16n8k16 (bf16/fp16 in, fp32
// accumulate) with eight warps of 16 query rows each (128 rows a block)
// over 64-key tiles:
// - tiles arrive in shared memory by cp.async one tile ahead of the math
//   (the slots' indices, which locate a tile's rows, three tiles ahead),
//   fragments come out of it by ldmatrix (V transposed on the fly); the
//   forward pass reloads its query fragments from shared memory every
//   tile, which keeps a thread within 128 registers (two blocks an SM),
//   the score pass (no output accumulator) keeps them in registers;
// - invalid keys (empty slots, past the end) are zero-filled so that
//   0·garbage cannot make a NaN;
// - a key k of stream b is slot k (k < slots: pool row slot_rows[b, k],
//   visible when its position ≥ 0) or the chunk's token j = k − slots
//   (visible to query token t ≥ j). vis[k] holds the first query token that
//   sees key k: −1, j, or kNever.
// The query rows of a stream are r = t·G + g (G a power of two ≤ 8, so a
// 16-row warp tile holds whole tokens and the group reduction is a few
// lane shuffles).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/chunk_tiles.cuh"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"

namespace kvmem::cuda {
namespace {

using namespace chunk_tiles;  // the tiles both passes share

// ---- launch 1: the factors, walking n as UpdateScores does ---------------

__global__ void ChunkFactorsKernel(double beta, int chunk,
                                   int64_t* score_exponents,
                                   const CascadeStreamPointers* streams,
                                   Workspace w) {
  const int b = blockIdx.x;
  int64_t* score_exponent =
      streams != nullptr ? streams[b].score_exponent : score_exponents + b;
  const int64_t n = *score_exponent;
  float* factor = w.factor + int64_t{b} * chunk;
  double* prescale = w.prescale + int64_t{b} * chunk;
  __shared__ int any_mid_step;
  if (threadIdx.x == 0) any_mid_step = 0;
  __syncthreads();
  // Without a mid-step renormalisation the exponent before query q is n+q;
  // check that first, in parallel (the usual case at β near 1).
  for (int q = threadIdx.x; q < chunk; q += blockDim.x) {
    if (n + q > 0 && NeedsMidStepRenormalisation(beta, n + q + 1)) {
      any_mid_step = 1;
    }
  }
  __syncthreads();
  if (any_mid_step == 0) {
    const int64_t end = n + chunk;
    const bool renormalise = NeedsRenormalisation(beta, end);
    const double after = renormalise ? ScoreScale(beta, end) : 1.0;
    for (int q = threadIdx.x; q < chunk; q += blockDim.x) {
      const float f = IncrementFactor(beta, n + q + 1);
      factor[q] = renormalise ? float(MulD(double(f), after)) : f;
    }
    if (threadIdx.x == 0) {
      w.scale[b] = renormalise ? after : 0.0;
      *score_exponent = renormalise ? 0 : end;
    }
    return;
  }
  if (threadIdx.x != 0) return;
  // UpdateScores' loop, literally; then, from the last query back, each
  // factor times the scales of the renormalisations after it.
  int64_t e = n;
  for (int q = 0; q < chunk; ++q) {
    prescale[q] = 0.0;
    if (e > 0 && NeedsMidStepRenormalisation(beta, e + 1)) {
      prescale[q] = ScoreScale(beta, e);
      e = 0;
    }
    factor[q] = IncrementFactor(beta, e + 1);
    ++e;
  }
  double after = 1.0;
  if (NeedsRenormalisation(beta, e)) {
    after = ScoreScale(beta, e);
    e = 0;
  }
  for (int q = chunk - 1; q >= 0; --q) {
    factor[q] = float(MulD(double(factor[q]), after));
    if (prescale[q] != 0.0) after = MulD(after, prescale[q]);
  }
  w.scale[b] = after == 1.0 ? 0.0 : after;
  *score_exponent = e;
}

// ---- launch 2: forward -----------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    ChunkForwardKernel(const ChunkArgs a) {
  T* q_tile = reinterpret_cast<T*>(shared_bytes + kIndexSharedBytes);
  T* k_tiles = q_tile + kQueryHalves;      // [2][64][kPitch]
  T* v_tiles = k_tiles + 2 * kTileHalves;  // [2][64][kPitch]
  int* vis = reinterpret_cast<int*>(v_tiles + 2 * kTileHalves);  // [2][64]

  const int b = blockIdx.y;
  const int r0 = blockIdx.x * kRows;
  const BlockRows my = RowsOf(a, r0);
  const int lane = threadIdx.x % 32;

  StartKeyTiles<T>(a, b, r0, my.tiles, q_tile, k_tiles, v_tiles, vis);

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  RunningSoftmax r;

  for (int tile = 0; tile < my.tiles; ++tile) {
    const int stage = tile & 1;
    const int next = stage ^ 1;
    LoadNextKeyTile<T>(a, b, tile, my.tiles, k_tiles + next * kTileHalves,
                       v_tiles + next * kTileHalves, vis + next * kKeys);
    WaitCopies<1>();
    __syncthreads();
    const T* v_tile = v_tiles + stage * kTileHalves;

    float s[8][4];
    QueryKeyTile<T>(q_tile, k_tiles + stage * kTileHalves, s);
    SoftmaxTile<true>(a, my, vis + stage * kKeys, s, o, r);
    // O += P·V: the S accumulators of key tiles 2kk, 2kk+1 are the A
    // fragment of keys kk·16 … +15.
    const int j = lane / 8;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t pa[4];
      ProbabilityFragment<T>(s, kk, pa);
#pragma unroll
      for (int nd2 = 0; nd2 < kD / 16; ++nd2) {
        // B: keys kk·16 + (j%2)·8 + 0..7, channels (2·nd2 + j/2)·8.
        const int key = kk * 16 + (j % 2) * 8 + lane % 8;
        const int d = (2 * nd2 + j / 2) * 8;
        uint32_t vb[4];
        LdMatrixTransposed(vb, SharedAddress(v_tile + key * kPitch + d));
        Elem<T>::Mma(o[2 * nd2], pa, vb[0], vb[1]);
        Elem<T>::Mma(o[2 * nd2 + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // the stage is refilled next iteration
  }
  StoreForwardRows(a, b, my, o, r);
}

// ---- launch 3: per query block, Σ f·r per key
// --------------------------------

template <typename T, int kGroup>
__global__ void __launch_bounds__(kThreads, 2)
    ChunkScoresKernel(const ChunkArgs a) {
  T* q_tile = reinterpret_cast<T*>(shared_bytes + kIndexSharedBytes);
  T* k_tiles = q_tile + kQueryHalves;                            // [2][64][·]
  int* vis = reinterpret_cast<int*>(k_tiles + 2 * kTileHalves);  // [2][64]
  // [2][warps][64]: two stages, so that one barrier a tile suffices.
  float* sums = reinterpret_cast<float*>(vis + 2 * kKeys);

  const int b = blockIdx.y;
  const int qb = blockIdx.x;
  const int r0 = qb * kRows;
  const BlockRows my = RowsOf(a, r0);
  const int warp = threadIdx.x / 32;
  const int64_t keys_total = a.slots + a.chunk;
  float* partial = BlockPartials(a, qb, b, keys_total);

  StartKeyTiles<T>(a, b, r0, my.tiles, q_tile, k_tiles, nullptr, vis);
  // Without an output accumulator this pass has the registers to keep its
  // query fragments (32 a thread) for every tile: a fifth of the shared
  // memory reads of a tile fewer. (StartKeyTiles waited for the queries.)
  uint32_t qf[kD / 16][4];
  QueryFragments(q_tile, qf);
  const ScoreRows w = ScoreRowsOf<kGroup>(a, b, my);

  for (int tile = 0; tile < my.tiles; ++tile) {
    const int stage = tile & 1;
    float* stage_sums = sums + stage * kWarps * kKeys;
    LoadNextKeyTile<T>(a, b, tile, my.tiles,
                       k_tiles + (stage ^ 1) * kTileHalves, nullptr,
                       vis + (stage ^ 1) * kKeys);
    WaitCopies<1>();
    __syncthreads();
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      AddKeyProducts(qf[kk], k_tiles + stage * kTileHalves, kk, s);
    }
    ReduceScoreTile<kGroup, true>(a, my, w, vis + stage * kKeys, s,
                                  stage_sums + warp * kKeys);
    __syncthreads();
    StoreTilePartials(stage_sums, partial, tile, keys_total);
    // No barrier here: this stage's tiles and sums are rewritten only after
    // the next iteration's barrier, which every thread reaches after it is
    // done with them.
  }
}

// ---- launch 4: u ← u·scale + Σ partials
// ----------------------------------------

__global__ void ChunkReduceKernel(const ChunkArgs a, int query_blocks) {
  const int b = blockIdx.y;
  const int64_t k = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t keys_total = a.slots + a.chunk;
  if (k >= keys_total) return;
  float* target;
  float u = 0.0f;
  int first_block = 0;
  if (k < a.slots) {
    if (k < a.sinks) return;
    const StreamSlots mine = SlotsOf(a, b);
    if (mine.positions[k] < 0) return;
    target = mine.scores + k;
    u = *target;
  } else {
    const int64_t j = k - a.slots;  // a new token: from 0, its block on
    target = a.out.initial_scores + int64_t{b} * a.chunk + j;
    first_block = int(j * a.group / kRows);
  }
  float total = 0.0f;
  for (int qb = first_block; qb < query_blocks; ++qb) {
    total += a.w.partials[(int64_t{qb} * a.streams + b) * keys_total + k];
  }
  const double scale = a.w.scale[b];
  if (scale != 0.0) u = RescaleScore(u, scale);
  *target = AddF(u, total);
}

constexpr size_t kForwardSharedBytes =
    size_t(kQueryHalves + 4 * kTileHalves) * 2 + 2 * kKeys * sizeof(int) +
    kIndexSharedBytes;
constexpr size_t kScoresSharedBytes =
    size_t(kQueryHalves + 2 * kTileHalves) * 2 + 2 * kKeys * sizeof(int) +
    2 * kWarps * kKeys * sizeof(float) + kIndexSharedBytes;

// The scores kernel for the batch's group size.
template <typename T>
auto ScoresKernelFor(int group) {
  return group == 1   ? ChunkScoresKernel<T, 1>
         : group == 2 ? ChunkScoresKernel<T, 2>
         : group == 4 ? ChunkScoresKernel<T, 4>
                      : ChunkScoresKernel<T, 8>;
}

// The mma.sync family.
PassKernels MmaSyncKernelsFor(bool bf16, int group) {
  PassKernels k;
  k.forward =
      bf16 ? reinterpret_cast<const void*>(&ChunkForwardKernel<__nv_bfloat16>)
           : reinterpret_cast<const void*>(&ChunkForwardKernel<__half>);
  k.scores =
      bf16
          ? reinterpret_cast<const void*>(ScoresKernelFor<__nv_bfloat16>(group))
          : reinterpret_cast<const void*>(ScoresKernelFor<__half>(group));
  k.forward_bytes = kForwardSharedBytes;
  k.scores_bytes = kScoresSharedBytes;
  return k;
}

// The forward pass, then the score pass.
absl::Status LaunchPasses(const PassKernels& k, const ChunkArgs& a,
                          int query_blocks, const ChunkPhaseEvents& events,
                          cudaStream_t stream) {
  for (auto [kernel, bytes] : {std::pair(k.forward, k.forward_bytes),
                               std::pair(k.scores, k.scores_bytes)}) {
    if (absl::Status allowed = AllowDynamicSharedMemory(kernel, bytes);
        !allowed.ok()) {
      return allowed;
    }
  }
  ChunkArgs args = a;
  void* arguments[] = {&args};
  const dim3 grid(query_blocks, a.streams);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernel(
      k.forward, grid, kThreads, arguments, k.forward_bytes, stream));
  if (events.after_forward != nullptr) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(events.after_forward, stream));
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernel(
      k.scores, grid, kThreads, arguments, k.scores_bytes, stream));
  return absl::OkStatus();
}

// Whether the warpgroup kernels run: asked for, or kAuto on the current
// device when it is compute capability 9.0 (their sm_90a code runs on
// nothing else).
absl::StatusOr<bool> UseWarpGroup(ChunkKernels kernels) {
  if (kernels != ChunkKernels::kAuto) {
    return kernels != ChunkKernels::kMmaSync;
  }
  int device = 0;
  int major = 0;
  int minor = 0;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, device));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
      &minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
}

// `attend`: the attention fields too (a step with queries).
absl::Status CheckShape(const ChunkShape& shape, bool attend) {
  if (absl::Status valid = shape.params.Validate(); !valid.ok()) return valid;
  if (shape.streams < 1 || shape.streams > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "streams: ", shape.streams, ", want 1..65535 (a grid dimension)"));
  }
  if (shape.group < 1 || shape.group > kMaxChunkGroup ||
      (shape.group & (shape.group - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group: ", shape.group,
        ", want 1, 2, 4 or 8 (a power of two <= ", kMaxChunkGroup, ")"));
  }
  if (shape.chunk < 1 ||
      int64_t{shape.chunk} * shape.group * shape.streams > INT_MAX / kD) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk: ", shape.chunk, ", want >= 1 with T·G·B·D below 2^31"));
  }
  if (shape.slots() + shape.chunk > int64_t{INT_MAX} - kKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("slots + chunk: ", shape.slots() + shape.chunk,
                     ", want below 2^31 − 64"));
  }
  if (!attend) return absl::OkStatus();
  if (shape.dtype != DType::kBf16 && shape.dtype != DType::kFp16) {
    return absl::InvalidArgumentError(
        "dtype: want bf16 or fp16 (the tensor-core path)");
  }
  if (!(std::isfinite(shape.softmax_scale) && shape.softmax_scale > 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "softmax_scale: ", shape.softmax_scale, ", want finite and > 0"));
  }
  if (shape.reduction != ScoreReduction::kMax &&
      shape.reduction != ScoreReduction::kMean) {
    return absl::InvalidArgumentError("reduction: want MAX or MEAN");
  }
  if (shape.kernels != ChunkKernels::kAuto &&
      shape.kernels != ChunkKernels::kMmaSync &&
      shape.kernels != ChunkKernels::kWarpGroup) {
    return absl::InvalidArgumentError(
        "kernels: want kAuto, kMmaSync or kWarpGroup");
  }
  return absl::OkStatus();
}

}  // namespace

size_t ChunkWorkspaceBytes(const ChunkShape& shape) {
  if (shape.streams < 1 || shape.chunk < 1 || shape.group < 1) return 0;
  const size_t bt = size_t(shape.streams) * size_t(shape.chunk);
  return AlignUp(bt * sizeof(float)) + AlignUp(bt * sizeof(double)) +
         AlignUp(size_t(shape.streams) * sizeof(double)) +
         AlignUp(PartialsCount(shape) * sizeof(float));
}

absl::Status AttendChunk(const ChunkShape& shape, const ChunkInputs& inputs,
                         const ChunkScoreState& state,
                         const ChunkOutputs& outputs, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream,
                         const ChunkPhaseEvents& events) {
  // Without queries (APPEND): no attention, only n and the scale of u move.
  const bool attend = inputs.queries != nullptr;
  if (absl::Status valid = CheckShape(shape, attend); !valid.ok()) {
    return valid;
  }
  // With per-stream pointers the flat state arrays are not read.
  const bool flat = state.streams == nullptr;
  struct Needed {
    const void* pointer;
    const char* name;
    bool needed;
  };
  const Needed needed[] = {{inputs.keys, "keys", attend},
                           {inputs.values, "values", attend},
                           {inputs.key_rows, "key_rows", attend},
                           {inputs.value_rows, "value_rows", attend},
                           {inputs.slot_rows, "slot_rows", flat},
                           {inputs.positions, "positions", flat},
                           {state.scores, "scores", flat},
                           {state.score_exponent, "score_exponent", flat},
                           {outputs.out, "out", attend},
                           {outputs.lse, "lse", attend},
                           {outputs.initial_scores, "initial_scores", true},
                           {workspace, "workspace", true}};
  for (const Needed& n : needed) {
    if (n.needed && n.pointer == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(n.name, ": null, want a device pointer"));
    }
  }
  for (const void* p : {inputs.queries, inputs.keys, inputs.values,
                        inputs.key_rows, inputs.value_rows}) {
    if (!attend) break;
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return absl::InvalidArgumentError(
          "queries, keys, values, key_rows, value_rows: want 16-byte aligned");
    }
  }
  if (workspace_bytes < ChunkWorkspaceBytes(shape) ||
      reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("workspace: ", workspace_bytes, " bytes, want >= ",
                     ChunkWorkspaceBytes(shape), " and 256-byte aligned"));
  }
  ChunkArgs a;
  a.streams = shape.streams;
  a.group = shape.group;
  a.chunk = shape.chunk;
  a.sinks = shape.params.sinks;
  a.slots = shape.slots();
  a.scale_log2 = shape.softmax_scale * kLog2e;
  a.reduction = shape.reduction;
  a.in = inputs;
  a.state = state;
  a.out = outputs;
  a.w = CarveWorkspace(shape, workspace);

  ChunkFactorsKernel<<<shape.streams, 256, 0, stream>>>(
      shape.params.beta, shape.chunk, state.score_exponent, state.streams, a.w);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkFactorsKernel");
  if (events.after_factors != nullptr) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(events.after_factors, stream));
  }
  if (!attend) {
    // u ← u·scale; the new tokens start at 0 (no partial sums to add).
    const dim3 reduce_grid(unsigned((a.slots + a.chunk + 255) / 256),
                           a.streams);
    ChunkReduceKernel<<<reduce_grid, 256, 0, stream>>>(a, 0);
    KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkReduceKernel");
    return absl::OkStatus();
  }
  absl::StatusOr<bool> warp_group = UseWarpGroup(shape.kernels);
  if (!warp_group.ok()) return warp_group.status();
  const bool bf16 = shape.dtype == DType::kBf16;
  const int query_blocks = QueryBlocks(shape);
  if (absl::Status passes =
          LaunchPasses(*warp_group ? WarpGroupKernelsFor(bf16, a.group)
                                   : MmaSyncKernelsFor(bf16, a.group),
                       a, query_blocks, events, stream);
      !passes.ok()) {
    return passes;
  }
  const dim3 reduce_grid(unsigned((a.slots + a.chunk + 255) / 256), a.streams);
  ChunkReduceKernel<<<reduce_grid, 256, 0, stream>>>(a, query_blocks);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkReduceKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
