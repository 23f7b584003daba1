// Kernel 1 of the split-K decode attention for any shape: every D ≤ 256,
// dtype and lane layout (row_access.cuh), and CACHE_RANK's rotation.
#ifndef KVMEM_KERNELS_CUDA_DECODE_SPLIT_KERNEL_CUH_
#define KVMEM_KERNELS_CUDA_DECODE_SPLIT_KERNEL_CUH_

#include "kernels/cuda/decode_split_args.cuh"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/rotary_lanes.cuh"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
// Internal to decode_attention.cu, its only includer.
namespace {

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

}  // namespace
}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DECODE_SPLIT_KERNEL_CUH_
