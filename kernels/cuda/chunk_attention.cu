// The four launches of a prefill chunk (chunk_attention.h). Both attention
// kernels use mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) with eight
// warps of 16 query rows each (128 rows a block) over 64-key tiles:
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
  const int tig = lane % 4;  // fragment column pair

  StartKeyTiles<T>(a, b, r0, my.tiles, q_tile, k_tiles, v_tiles, vis);

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY;  // running max, log2 units
  float l_a = 0.0f, l_b = 0.0f;            // this lane's share of Σp

  for (int tile = 0; tile < my.tiles; ++tile) {
    const int stage = tile & 1;
    const int next = stage ^ 1;
    LoadNextKeyTile<T>(a, b, tile, my.tiles, k_tiles + next * kTileHalves,
                       v_tiles + next * kTileHalves, vis + next * kKeys);
    WaitCopies<1>();
    __syncthreads();
    const T* v_tile = v_tiles + stage * kTileHalves;
    const int* tile_vis = vis + stage * kKeys;

    float s[8][4];
    QueryKeyTile<T>(q_tile, k_tiles + stage * kTileHalves, s);

    float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int first = tile_vis[n * 8 + tig * 2 + e];
        s[n][e] = my.token_a >= first ? s[n][e] * a.scale_log2 : -INFINITY;
        s[n][e + 2] =
            my.token_b >= first ? s[n][e + 2] * a.scale_log2 : -INFINITY;
        tile_max_a = fmaxf(tile_max_a, s[n][e]);
        tile_max_b = fmaxf(tile_max_b, s[n][e + 2]);
      }
    }
#pragma unroll
    for (int mask = 1; mask <= 2; mask <<= 1) {
      tile_max_a =
          fmaxf(tile_max_a, __shfl_xor_sync(0xffffffffu, tile_max_a, mask));
      tile_max_b =
          fmaxf(tile_max_b, __shfl_xor_sync(0xffffffffu, tile_max_b, mask));
    }
    const float new_m_a = fmaxf(m_a, tile_max_a);
    const float new_m_b = fmaxf(m_b, tile_max_b);
    // A row that has seen no key yet keeps p = 0 (never exp(−∞ + ∞)).
    const float base_a = new_m_a == -INFINITY ? 0.0f : new_m_a;
    const float base_b = new_m_b == -INFINITY ? 0.0f : new_m_b;
    const float alpha_a = Exp2(m_a - base_a);
    const float alpha_b = Exp2(m_b - base_b);
    m_a = new_m_a;
    m_b = new_m_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[n][0] *= alpha_a;
      o[n][1] *= alpha_a;
      o[n][2] *= alpha_b;
      o[n][3] *= alpha_b;
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = Exp2(s[n][0] - base_a);
      s[n][1] = Exp2(s[n][1] - base_a);
      s[n][2] = Exp2(s[n][2] - base_b);
      s[n][3] = Exp2(s[n][3] - base_b);
      l_a += s[n][0] + s[n][1];
      l_b += s[n][2] + s[n][3];
    }
    // O += P·V: the S accumulators of key tiles 2kk, 2kk+1 are the A
    // fragment of keys kk·16 … +15.
    const int j = lane / 8;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t pa[4] = {
          Elem<T>::Pack(s[2 * kk][0], s[2 * kk][1]),
          Elem<T>::Pack(s[2 * kk][2], s[2 * kk][3]),
          Elem<T>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          Elem<T>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
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

#pragma unroll
  for (int mask = 1; mask <= 2; mask <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, mask);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, mask);
  }
  const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
  const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
  if (my.row_a < my.rows) {
    const int64_t g = QueryRow(a, b, my.row_a);
    float* out = a.out.out + g * kD;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      *reinterpret_cast<float2*>(out + n * 8 + tig * 2) =
          make_float2(o[n][0] * inv_a, o[n][1] * inv_a);
    }
    if (tig == 0) {
      a.out.lse[g] = l_a > 0.0f ? (m_a + log2f(l_a)) * kLn2 : -INFINITY;
    }
  }
  if (my.row_b < my.rows) {
    const int64_t g = QueryRow(a, b, my.row_b);
    float* out = a.out.out + g * kD;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      *reinterpret_cast<float2*>(out + n * 8 + tig * 2) =
          make_float2(o[n][2] * inv_b, o[n][3] * inv_b);
    }
    if (tig == 0) {
      a.out.lse[g] = l_b > 0.0f ? (m_b + log2f(l_b)) * kLn2 : -INFINITY;
    }
  }
}

// One reduce-scatter stage across the lanes that differ in `lane_mask`:
// of the first kCount values, the lane with that bit clear keeps the lower
// half and its partner the upper, each combined (max or sum) with the
// partner's copy; the kept half moves to v[0, kCount/2).
template <int kCount, bool kMax>
__device__ __forceinline__ void HalveAcrossLanes(float (&v)[16],
                                                 int lane_mask) {
  const bool upper = (threadIdx.x & lane_mask) != 0;
#pragma unroll
  for (int i = 0; i < kCount / 2; ++i) {
    const float send = upper ? v[i] : v[i + kCount / 2];
    const float keep = upper ? v[i + kCount / 2] : v[i];
    const float got = __shfl_xor_sync(0xffffffffu, send, lane_mask);
    v[i] = kMax ? fmaxf(keep, got) : keep + got;
  }
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
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int gid = lane / 4;
  const int tig = lane % 4;
  const int64_t keys_total = a.slots + a.chunk;
  float* partial = a.w.partials + (int64_t{qb} * a.streams + b) * keys_total;

  StartKeyTiles<T>(a, b, r0, my.tiles, q_tile, k_tiles, nullptr, vis);
  // Without an output accumulator this pass has the registers to keep its
  // query fragments (32 a thread) for every tile: a fifth of the shared
  // memory reads of a tile fewer. (StartKeyTiles waited for the queries.)
  uint32_t qf[kD / 16][4];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) QueryFragment(q_tile, kk, qf[kk]);
  // Per fragment row: its LSE (log2 units) and its token's factor (0 for a
  // row past the end). With G ≥ 2 both rows are heads of one token, and the
  // group spans the lanes whose gid differs in its low log2(G/2) bits.
  const float lse_a =
      my.token_a >= 0 ? a.out.lse[QueryRow(a, b, my.row_a)] * kLog2e : 0.0f;
  const float lse_b =
      my.token_b >= 0 ? a.out.lse[QueryRow(a, b, my.row_b)] * kLog2e : 0.0f;
  const float f_a =
      my.token_a >= 0 ? a.w.factor[int64_t{b} * a.chunk + my.token_a] : 0.0f;
  const float f_b =
      my.token_b >= 0 ? a.w.factor[int64_t{b} * a.chunk + my.token_b] : 0.0f;
  // MAX over a group of 4 or 8 spans lanes: it is reduced before the
  // exponential. MEAN (and G 1) sums p · f / G straight away.
  const bool mean = a.reduction == ScoreReduction::kMean;
  constexpr bool kLaneMax = kGroup >= 4;
  const float inv_group = mean ? 1.0f / float(kGroup) : 1.0f;
  const float w_a = f_a * inv_group;
  const float w_b = f_b * inv_group;

  for (int tile = 0; tile < my.tiles; ++tile) {
    const int stage = tile & 1;
    float* stage_sums = sums + stage * kWarps * kKeys;
    LoadNextKeyTile<T>(a, b, tile, my.tiles,
                       k_tiles + (stage ^ 1) * kTileHalves, nullptr,
                       vis + (stage ^ 1) * kKeys);
    WaitCopies<1>();
    __syncthreads();
    const int* tile_vis = vis + stage * kKeys;
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      AddKeyProducts(qf[kk], k_tiles + stage * kTileHalves, kk, s);
    }
    // v[2n + e]: this thread's value for key column n·8 + tig·2 + e, from
    // its two fragment rows: x = log2 p (their max, G ≥ 2 under MAX) or
    // p · w summed.
    float v[16];
    const bool lane_max = !mean && kGroup > 1;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int first = tile_vis[n * 8 + tig * 2 + e];
        const float xa =
            my.token_a >= first ? s[n][e] * a.scale_log2 - lse_a : -INFINITY;
        const float xb = my.token_b >= first
                             ? s[n][e + 2] * a.scale_log2 - lse_b
                             : -INFINITY;
        v[2 * n + e] =
            lane_max ? fmaxf(xa, xb) : w_a * Exp2(xa) + w_b * Exp2(xb);
      }
    }
    // The rest of the group reduction and the sum over the warp's tokens
    // are reduce-scatters over gid bits 0, 1, 2 in turn: each halves the
    // values a lane holds with one shuffle per value kept (14 shuffles in
    // all, and under MAX one exponential per value left after the group's
    // max), where a full reduction of every column took 3 a column. The
    // lane is left with columns n = 4·b0 + 2·b1 + b2 (b: its gid bits),
    // e = 0, 1.
    if (lane_max) {
      if constexpr (kLaneMax) HalveAcrossLanes<16, true>(v, 4);
      if constexpr (kGroup == 8) HalveAcrossLanes<8, true>(v, 8);
      constexpr int kLeft = kGroup == 8 ? 4 : kGroup == 4 ? 8 : 16;
#pragma unroll
      for (int i = 0; i < kLeft; ++i) v[i] = f_a * Exp2(v[i]);
      if constexpr (!kLaneMax) HalveAcrossLanes<16, false>(v, 4);
      if constexpr (kGroup != 8) HalveAcrossLanes<8, false>(v, 8);
    } else {
      HalveAcrossLanes<16, false>(v, 4);
      HalveAcrossLanes<8, false>(v, 8);
    }
    HalveAcrossLanes<4, false>(v, 16);
    const int n = 4 * (gid & 1) + 2 * ((gid >> 1) & 1) + (gid >> 2);
    *reinterpret_cast<float2*>(stage_sums + warp * kKeys + n * 8 + tig * 2) =
        make_float2(v[0], v[1]);
    __syncthreads();
    if (threadIdx.x < kKeys) {
      const int64_t k = int64_t{tile} * kKeys + threadIdx.x;
      if (k < keys_total) {
        float total = 0.0f;
        for (int w = 0; w < kWarps; ++w) {
          total += stage_sums[w * kKeys + threadIdx.x];
        }
        partial[k] = total;
      }
    }
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

template <typename T>
absl::Status LaunchAttention(const ChunkArgs& a, int query_blocks,
                             const ChunkPhaseEvents& events,
                             cudaStream_t stream) {
  if (absl::Status allowed = AllowDynamicSharedMemory(
          reinterpret_cast<const void*>(&ChunkForwardKernel<T>),
          kForwardSharedBytes);
      !allowed.ok()) {
    return allowed;
  }
  const auto scores_kernel = ScoresKernelFor<T>(a.group);
  if (absl::Status allowed = AllowDynamicSharedMemory(
          reinterpret_cast<const void*>(scores_kernel), kScoresSharedBytes);
      !allowed.ok()) {
    return allowed;
  }
  const dim3 grid(query_blocks, a.streams);
  ChunkForwardKernel<T><<<grid, kThreads, kForwardSharedBytes, stream>>>(a);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkForwardKernel");
  if (events.after_forward != nullptr) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(events.after_forward, stream));
  }
  scores_kernel<<<grid, kThreads, kScoresSharedBytes, stream>>>(a);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkScoresKernel");
  const dim3 reduce_grid(unsigned((a.slots + a.chunk + 255) / 256), a.streams);
  ChunkReduceKernel<<<reduce_grid, 256, 0, stream>>>(a, query_blocks);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkReduceKernel");
  return absl::OkStatus();
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
  return shape.dtype == DType::kBf16
             ? LaunchAttention<__nv_bfloat16>(a, QueryBlocks(shape), events,
                                              stream)
             : LaunchAttention<__half>(a, QueryBlocks(shape), events, stream);
}

}  // namespace kvmem::cuda
