// Split-K decode attention: kernel 1 gives each (stream, split) block a
// contiguous share of the stream's rows and writes a partial (o, lse); kernel
// 2 merges the partials per stream and, when asked, turns the logits kept by
// kernel 1 into the group-reduced probabilities.
#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/rotary_lanes.cuh"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
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

// Block (split, stream). kG ≥ the runtime group: slots g ≥ group compute on
// zero queries and are never written.
// At most 170 registers (3 blocks a multiprocessor): measured faster on an
// H100 than 210 registers and 2 blocks, despite a few spilled bytes at G 4.
// kRotary (CACHE_RANK): queries and keys are rotated in registers, each key
// as it is loaded, before the dot products (rotary_lanes.cuh).
template <DType kT, int kG, bool kRotary>
__global__ void __launch_bounds__(kThreads, 3)
    DecodeSplitKernel(const SplitArgs args) {
  WaitForPriorGrids();  // the rows come from the selection
  LetDependentsLaunch();
  extern __shared__ float smem[];
  const RowLayout& layout = args.layout;
  const int head_dim = layout.head_dim;
  const int group = args.group;
  const int lpr = layout.lanes_per_row;
  const int row_groups = kThreads / lpr;
  const int tid = threadIdx.x;
  const int rg = tid / lpr;
  const int lane = tid % lpr;
  const int stream = blockIdx.y;
  const int split = blockIdx.x;
  const int splits = gridDim.x;
  const size_t row_bytes = size_t(head_dim) * DTypeBytes(kT);

  float* s_p = smem;                                    // [kG, kTileRows]
  float* s_combine = s_p + kG * kTileRows;              // [row_groups, kG, D]
  float* s_m = s_combine + row_groups * kG * head_dim;  // [kG]
  float* s_l = s_m + kG;                                // [kG]
  float* s_alpha = s_l + kG;                            // [kG]
  int* s_rows = reinterpret_cast<int*>(s_alpha + kG);   // [kTileRows]
  int* s_positions = s_rows + kTileRows;  // [kTileRows], kRotary only

  const int n = args.row_count[stream];
  const int begin = args.row_begin[stream];
  const int chunk = (n + splits - 1) / splits;
  const int lo = min(n, split * chunk);
  const int hi = min(n, lo + chunk);

  float q[kG][kLaneSlots];
  float acc[kG][kLaneSlots];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (g < group) {
      const char* qrow = static_cast<const char*>(args.queries) +
                         (size_t(stream) * group + g) * row_bytes;
      LoadLaneChannels<kT>(layout, qrow, lane, q[g]);
      if constexpr (kRotary) {
        RotateLaneChannels<kT>(layout, args.rotary, lane,
                               args.query_positions[stream], q[g]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kLaneSlots; ++j) q[g][j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) acc[g][j] = 0.0f;
  }
  if (tid < kG) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
  }
  const char* keys = static_cast<const char*>(args.key_rows);
  const char* values = static_cast<const char*>(args.value_rows);
  // Rows per row group per pass; the pass count is the same for every row
  // group, so whole warps reach every shuffle.
  const int stride = row_groups * kUnroll;

  for (int tile = lo; tile < hi; tile += kTileRows) {
    const int rows_in = min(kTileRows, hi - tile);
    __syncthreads();  // the previous tile is done with s_rows and s_p
    if (tid < rows_in) {
      s_rows[tid] = args.rows[begin + tile + tid];
      if constexpr (kRotary) {
        s_positions[tid] = args.row_positions[begin + tile + tid];
      }
    }
    __syncthreads();

    // Phase 1: scaled logits of the tile's rows into s_p. The vector path
    // keeps all of a row group's rows of the tile in flight at once.
    if (layout.vector) {
      for (int r0 = rg; r0 < kTileRows; r0 += row_groups * kVectorUnroll) {
        uint4 piece[kVectorUnroll];
#pragma unroll
        for (int u = 0; u < kVectorUnroll; ++u) {
          const int r = r0 + u * row_groups;
          piece[u] = r < rows_in
                         ? LoadPiece(keys + size_t(s_rows[r]) * row_bytes, lane)
                         : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kVectorUnroll; ++u) {
          const int r = r0 + u * row_groups;
          float x[kLaneSlots];
          UnpackVector<kT>(piece[u], x);
          if constexpr (kRotary) {
            RotateLaneChannels<kT>(layout, args.rotary, lane,
                                   r < rows_in ? s_positions[r] : 0, x);
          }
#pragma unroll
          for (int g = 0; g < kG; ++g) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < kLaneSlots; ++j) dot = fmaf(q[g][j], x[j], dot);
            for (int off = lpr / 2; off > 0; off >>= 1) {
              dot += __shfl_xor_sync(kFullMask, dot, off);
            }
            if (lane == 0 && r < rows_in && g < group) {
              const float logit = dot * args.scale;
              s_p[g * kTileRows + r] = logit;
              if (args.logits != nullptr) {
                args.logits[size_t(begin + tile + r) * group + g] = logit;
              }
            }
          }
        }
      }
    } else
      for (int r0 = rg; r0 < kTileRows; r0 += stride) {
        float x[kUnroll][kLaneSlots];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if (r < rows_in) {
            LoadLaneChannels<kT>(layout, keys + size_t(s_rows[r]) * row_bytes,
                                 lane, x[u]);
          } else {
#pragma unroll
            for (int j = 0; j < kLaneSlots; ++j) x[u][j] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if constexpr (kRotary) {
            RotateLaneChannels<kT>(layout, args.rotary, lane,
                                   r < rows_in ? s_positions[r] : 0, x[u]);
          }
#pragma unroll
          for (int g = 0; g < kG; ++g) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < kLaneSlots; ++j)
              dot = fmaf(q[g][j], x[u][j], dot);
            for (int off = lpr / 2; off > 0; off >>= 1) {
              dot += __shfl_xor_sync(kFullMask, dot, off);
            }
            if (lane == 0 && r < rows_in && g < group) {
              const float logit = dot * args.scale;
              s_p[g * kTileRows + r] = logit;
              if (args.logits != nullptr) {
                args.logits[size_t(begin + tile + r) * group + g] = logit;
              }
            }
          }
        }
      }
    __syncthreads();

    // Online softmax over tiles: warp w owns heads w, w + 4, ...
    const int warp = tid / 32;
    const int wl = tid % 32;
    for (int g = warp; g < group; g += kWarps) {
      float* p = s_p + g * kTileRows;
      float tile_max = -INFINITY;
      for (int r = wl; r < rows_in; r += 32) tile_max = fmaxf(tile_max, p[r]);
      tile_max = WarpMax(tile_max);
      const float m_old = s_m[g];
      const float m_new = fmaxf(m_old, tile_max);
      float sum = 0.0f;
      for (int r = wl; r < rows_in; r += 32) {
        const float w = expf(p[r] - m_new);
        p[r] = w;
        sum += w;
      }
      sum = WarpSum(sum);
      __syncwarp();
      if (wl == 0) {
        const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
        s_alpha[g] = alpha;
        s_l[g] = s_l[g] * alpha + sum;
        s_m[g] = m_new;
      }
    }
    __syncthreads();

    // Phase 2: acc = alpha·acc + Σ p·v over the tile.
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const float alpha = g < group ? s_alpha[g] : 1.0f;
#pragma unroll
      for (int j = 0; j < kLaneSlots; ++j) acc[g][j] *= alpha;
    }
    if (layout.vector) {
      for (int r0 = rg; r0 < kTileRows; r0 += row_groups * kVectorUnroll) {
        uint4 piece[kVectorUnroll];
#pragma unroll
        for (int u = 0; u < kVectorUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if (r < rows_in) {
            piece[u] = LoadPiece(values + size_t(s_rows[r]) * row_bytes, lane);
          }
        }
#pragma unroll
        for (int u = 0; u < kVectorUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if (r < rows_in) {
            float x[kLaneSlots];
            UnpackVector<kT>(piece[u], x);
#pragma unroll
            for (int g = 0; g < kG; ++g) {
              const float w = g < group ? s_p[g * kTileRows + r] : 0.0f;
#pragma unroll
              for (int j = 0; j < kLaneSlots; ++j) {
                acc[g][j] = fmaf(w, x[j], acc[g][j]);
              }
            }
          }
        }
      }
    } else
      for (int r0 = rg; r0 < kTileRows; r0 += stride) {
        float x[kUnroll][kLaneSlots];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if (r < rows_in) {
            LoadLaneChannels<kT>(layout, values + size_t(s_rows[r]) * row_bytes,
                                 lane, x[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int r = r0 + u * row_groups;
          if (r < rows_in) {
#pragma unroll
            for (int g = 0; g < kG; ++g) {
              const float w = g < group ? s_p[g * kTileRows + r] : 0.0f;
#pragma unroll
              for (int j = 0; j < kLaneSlots; ++j) {
                acc[g][j] = fmaf(w, x[u][j], acc[g][j]);
              }
            }
          }
        }
      }
  }

  // Combine the row groups' accumulators, then normalise.
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int j = 0; j < kLaneSlots; ++j) {
      const int c = SlotChannel<kT>(layout, lane, j);
      if (c < head_dim) s_combine[(rg * kG + g) * head_dim + c] = acc[g][j];
    }
  }
  __syncthreads();
  const size_t partial = (size_t(stream) * splits + split) * group;
  for (int idx = tid; idx < group * head_dim; idx += kThreads) {
    const int g = idx / head_dim;
    const int c = idx % head_dim;
    float sum = 0.0f;
    for (int r = 0; r < row_groups; ++r) {
      sum += s_combine[(r * kG + g) * head_dim + c];
    }
    const float l = s_l[g];
    args.partial_out[partial * head_dim + idx] = l > 0.0f ? sum / l : 0.0f;
  }
  if (tid < group) {
    const float l = s_l[tid];
    args.partial_lse[partial + tid] = l > 0.0f ? s_m[tid] + logf(l) : -INFINITY;
  }
}

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
