// Kernel 1 of the split-K decode attention for the engine's shape: D 128 in
// bf16/fp16, logits on tensor cores.
#ifndef KVMEM_KERNELS_CUDA_DECODE_SPLIT_FAST_KERNEL_CUH_
#define KVMEM_KERNELS_CUDA_DECODE_SPLIT_FAST_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/decode_split_args.cuh"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
// Internal to decode_attention.cu, its only includer.
namespace {

// The fast path, for the engine's shape: D 128 in bf16/fp16. Warps work
// independently: each walks tiles of 16 rows of its block's share with its
// own online softmax, and the block combines its 4 warps once, at the end.
// No barrier inside the row loop. The K and V rows of a warp's tiles
// arrive in shared memory by cp.async, two tiles ahead of the math.
//
// Logits on tensor cores: one mma.sync m16n8k16 per 8 keys and 16
// channels, the group's G ≤ 8 query rows as the A rows (rows G..15 zero).
// Lane (n = lane / 4, t = lane % 4) loads 16-byte pieces t, t + 4, t + 8,
// t + 12 of key n straight into B fragments, and the same pieces of query
// row n into A fragments: the channels meet the mma in a permuted order,
// the same for queries and keys, so the dot products are unchanged. The
// V sums stay on CUDA cores (lanes 16 a row, 8 channels each, half-warps on
// different rows), with the probabilities passed through shared memory.
constexpr int kFastHeadDim = 128;
constexpr int kFastWarps = kThreads / 32;
constexpr int kFastRows = 16;  // rows a warp tile: two mma n-tiles

// d += A·B for one m16n8k16 tile whose A rows 8..15 are zero.
template <DType kT>
__device__ __forceinline__ void MmaUpperRows(float (&d)[4], uint32_t a0,
                                             uint32_t a2, uint32_t b0,
                                             uint32_t b1) {
  const uint32_t zero = 0;
  if constexpr (kT == DType::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(zero), "r"(a2), "r"(zero), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(zero), "r"(a2), "r"(zero), "r"(b0), "r"(b1));
  }
}

// Logits of one 8-key n-tile: d[0], d[1] = query row lane / 4, keys
// 2·(lane % 4) and + 1 of the tile.
template <DType kT>
__device__ __forceinline__ void TileLogits(const uint4 (&q)[4],
                                           const uint4 (&k)[4], float (&d)[4]) {
  d[0] = d[1] = d[2] = d[3] = 0.0f;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    MmaUpperRows<kT>(d, q[s].x, q[s].y, k[s].x, k[s].y);
    MmaUpperRows<kT>(d, q[s].z, q[s].w, k[s].z, k[s].w);
  }
}

// Each warp stages its tiles' K and V rows in shared memory, two tiles
// ahead of the math (cp.async): 16 KB in flight a warp without holding
// registers for them. Piece p of tile row r sits at slot 16r + (p ^ 4(r&1)),
// so the mma's K reads (rows r and r + 1 in one phase) hit distinct banks.
constexpr int kFastStages = 2;
constexpr int kTilePieces = kFastRows * 16;  // 16-byte pieces of a tile
constexpr size_t kFastSmemBytes =
    size_t(kFastWarps) * kFastStages * 2 * kTilePieces * 16;

__device__ __forceinline__ int TileSlot(int r, int piece) {
  return r * 16 + (piece ^ ((r & 1) << 2));
}

// G 8 at 3 blocks an SM would spill its accumulators; it takes 2.
template <DType kT, int kG>
__global__ void __launch_bounds__(kThreads, kG == 8 ? 2 : 3)
    DecodeSplitFastKernel(const SplitArgs args) {
  WaitForPriorGrids();  // the rows come from the selection
  LetDependentsLaunch();
  constexpr int kPairs = kFastRows / 2;  // V rows a half-warp
  constexpr size_t kRowBytes = kFastHeadDim * 2;
  __shared__ float s_p[kFastWarps][kG][kFastRows];
  __shared__ float s_alpha[kFastWarps][kG];
  __shared__ float s_m[kFastWarps][kG];
  __shared__ float s_l[kFastWarps][kG];
  __shared__ float s_acc[kFastWarps][kG][kFastHeadDim];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int half = lane >> 4;  // V layout: rows half·8 + i
  const int sub = lane & 15;   //   channels 8·sub …
  const int qn = lane >> 2;    // mma layout: query row / key of the n-tile
  const int qt = lane & 3;     //   pieces qt + 4s
  const int group = args.group;
  const int stream = blockIdx.y;
  const int split = blockIdx.x;
  const int splits = gridDim.x;
  const int n = args.row_count[stream];
  const int begin = args.row_begin[stream];
  const int chunk = (n + splits - 1) / splits;
  const int lo = min(n, split * chunk);
  const int hi = min(n, lo + chunk);

  uint4 q[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    q[s] = qn < group ? LoadPiece(static_cast<const char*>(args.queries) +
                                      (size_t(stream) * group + qn) * kRowBytes,
                                  qt + 4 * s)
                      : make_uint4(0, 0, 0, 0);
  }
  float acc[kG][kLaneSlots];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) acc[g][j] = 0.0f;
  }
  float m = -INFINITY;  // running max and sum of query row qn
  float l = 0.0f;
  const char* keys = static_cast<const char*>(args.key_rows);
  const char* values = static_cast<const char*>(args.value_rows);
  constexpr int kStep = kFastWarps * kFastRows;

  // Row indices one a lane (both halves load the same), three tiles ahead.
  auto load_index = [&](int at) {
    return at + sub < hi ? args.rows[begin + at + sub] : 0;
  };
  extern __shared__ uint4 s_tiles[];
  uint4* tiles = s_tiles + size_t(warp) * kFastStages * 2 * kTilePieces;
  // The copies of the tile at `at` into `stage` (zeros past the share), one
  // commit group, empty past the end.
  auto issue = [&](int at, int index, int stage) {
    if (at < hi) {
      uint4* k_dst = tiles + stage * 2 * kTilePieces;
      uint4* v_dst = k_dst + kTilePieces;
#pragma unroll
      for (int c = 0; c < kFastRows / 2; ++c) {
        const int r = half + 2 * c;
        const size_t row = size_t(__shfl_sync(kFullMask, index, r));
        const bool in = at + r < hi;
        const size_t from = in ? row * kRowBytes + size_t(sub) * 16 : 0;
        CopyAsync16(k_dst + TileSlot(r, sub), keys + from, in);
        CopyAsync16(v_dst + TileSlot(r, sub), values + from, in);
      }
    }
    CommitCopies();
  };
  int tile = lo + warp * kFastRows;
  issue(tile, load_index(tile), 0);
  issue(tile + kStep, load_index(tile + kStep), 1);
  int index_ahead = load_index(tile + 2 * kStep);
  int stage = 0;
  for (; tile < hi; tile += kStep, stage ^= 1) {
    const int rows_in = min(kFastRows, hi - tile);
    WaitCopies<kFastStages - 1>();  // this tile's copies have landed
    __syncwarp();
    const uint4* k_src = tiles + stage * 2 * kTilePieces;
    const uint4* v_src = k_src + kTilePieces;
    uint4 kp[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int s = 0; s < 4; ++s)
        kp[j][s] = k_src[TileSlot(8 * j + qn, qt + 4 * s)];
    }

    // Logits of row qn for keys 2qt, 2qt + 1, 8 + 2qt, 9 + 2qt.
    float d[2][4];
    TileLogits<kT>(q, kp[0], d[0]);
    TileLogits<kT>(q, kp[1], d[1]);
    float s[4];
    float tile_max = -INFINITY;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = 8 * (e / 2) + 2 * qt + e % 2;
      const float logit = d[e / 2][e % 2] * args.scale;
      s[e] = r < rows_in ? logit : -INFINITY;
      tile_max = fmaxf(tile_max, s[e]);
      if (args.logits != nullptr && r < rows_in && qn < group) {
        args.logits[size_t(begin + tile + r) * group + qn] = logit;
      }
    }

    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
    const float m_new = fmaxf(m, tile_max);
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    float p[4];
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p[e] = s[e] == -INFINITY ? 0.0f : expf(s[e] - m_new);
      sum += p[e];
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    l = l * alpha + sum;
    m = m_new;
    if (qn < kG) {
      float* row = s_p[warp][qn];
      *reinterpret_cast<float2*>(row + 2 * qt) = make_float2(p[0], p[1]);
      *reinterpret_cast<float2*>(row + 8 + 2 * qt) = make_float2(p[2], p[3]);
      if (qt == 0) s_alpha[warp][qn] = alpha;
    }
    __syncwarp();

    // acc = alpha·acc + Σ p·v over this half's rows.
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const float a = s_alpha[warp][g];
#pragma unroll
      for (int j = 0; j < kLaneSlots; ++j) acc[g][j] *= a;
    }
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      float x[kLaneSlots];
      UnpackVector<kT>(v_src[TileSlot(half * kPairs + i, sub)], x);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float w = s_p[warp][g][half * kPairs + i];
#pragma unroll
        for (int j = 0; j < kLaneSlots; ++j) {
          acc[g][j] = fmaf(w, x[j], acc[g][j]);
        }
      }
    }
    __syncwarp();  // s_p, s_alpha and this stage are rewritten next
    issue(tile + 2 * kStep, index_ahead, stage);
    index_ahead = load_index(tile + 3 * kStep);
  }
  WaitCopies<0>();

  // The two halves saw different rows under the same running max.
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) {
      acc[g][j] += __shfl_xor_sync(kFullMask, acc[g][j], 16);
    }
  }
  if (half == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int j = 0; j < kLaneSlots; ++j) {
        s_acc[warp][g][sub * kLaneSlots + j] = acc[g][j];
      }
    }
  }
  if (qt == 0 && qn < kG) {
    s_m[warp][qn] = m;
    s_l[warp][qn] = l;
  }
  __syncthreads();
  const size_t partial = (size_t(stream) * splits + split) * group;
  for (int idx = threadIdx.x; idx < group * kFastHeadDim; idx += kThreads) {
    const int g = idx / kFastHeadDim;
    const int c = idx % kFastHeadDim;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kFastWarps; ++w) top = fmaxf(top, s_m[w][g]);
    float total = 0.0f;
    float o = 0.0f;
    if (top != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kFastWarps; ++w) {
        const float weight =
            s_m[w][g] == -INFINITY ? 0.0f : expf(s_m[w][g] - top);
        total = fmaf(weight, s_l[w][g], total);
        o = fmaf(weight, s_acc[w][g][c], o);
      }
    }
    args.partial_out[partial * kFastHeadDim + idx] =
        total > 0.0f ? o / total : 0.0f;
    if (c == 0) {
      args.partial_lse[partial + g] =
          total > 0.0f ? top + logf(total) : -INFINITY;
    }
  }
}

}  // namespace
}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DECODE_SPLIT_FAST_KERNEL_CUH_
