// Three kernels. ScoreQuest128Kernel (last) takes the Quest bound at D 128
// with 16-bit queries and digests and G 1/2/4/8. ScoreQuestKernel takes
// the Quest bound on other rows that split into 16-byte pieces: eight
// lanes a page and head. ScorePagesKernel takes the rest (pair-norm
// digests, odd rows): one thread per candidate page, the page's digest
// staged as fp32 in shared memory (rows padded to an odd word count, so the
// threads of a warp read distinct banks), the group's queries as fp32
// beside it, and each thread running the shared per-head bound over its
// own row.
#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/page_scores.h"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
namespace {

constexpr int kMaxGridTiles = 1024;
constexpr int kBatch = 8;  // loads in flight per thread while staging

struct ScoreArgs {
  int group;
  int head_dim;
  int pages_per_tile;  // = blockDim.x
  bool vector;         // digest rows are whole, aligned 16-byte pieces
  DigestKind kind;
  GroupReduction reduction;
  const void* queries;
  const void* digests;
  const int32_t* candidate_pages;
  const int32_t* candidate_begin;
  const int32_t* candidate_count;
  float* scores;
};

int RowWords(int head_dim) { return 2 * head_dim + 1; }  // odd: no conflicts

template <DType kQ, DType kDigest>
__global__ void ScorePagesKernel(const ScoreArgs args) {
  extern __shared__ float smem[];
  const int head_dim = args.head_dim;
  const int group = args.group;
  const int row_words = 2 * head_dim + 1;
  const int tid = threadIdx.x;
  const int threads = blockDim.x;
  const int stream = blockIdx.y;
  float* s_query = smem;                       // [G, D]
  float* s_rows = s_query + group * head_dim;  // [pages_per_tile, 2D+1]
  int* s_page =
      reinterpret_cast<int*>(s_rows + args.pages_per_tile * row_words);

  const char* query_base = static_cast<const char*>(args.queries) +
                           size_t(stream) * group * head_dim * DTypeBytes(kQ);
  for (int i = tid; i < group * head_dim; i += threads) {
    s_query[i] = ElementToFloat<kQ>(query_base, i);
  }
  const int n = args.candidate_count[stream];
  const int begin = args.candidate_begin[stream];
  const size_t digest_bytes = size_t(2) * head_dim * DTypeBytes(kDigest);
  for (int tile = blockIdx.x * args.pages_per_tile; tile < n;
       tile += gridDim.x * args.pages_per_tile) {
    const int pages = min(args.pages_per_tile, n - tile);
    __syncthreads();  // s_query written; the previous tile's rows are read
    if (tid < pages) s_page[tid] = args.candidate_pages[begin + tile + tid];
    __syncthreads();
    // Stage the tile's digests: each thread keeps kBatch independent loads
    // in flight (16-byte pieces where rows allow, else single elements).
    const char* digests = static_cast<const char*>(args.digests);
    if (args.vector) {
      constexpr int kPer = kDigest == DType::kFp32 ? 4 : 8;
      const int pieces_per_page = 2 * head_dim / kPer;
      const int total = pages * pieces_per_page;
      for (int first = tid; first < total; first += threads * kBatch) {
        uint4 piece[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int idx = first + b * threads;
          if (idx < total) {
            const int p = idx / pieces_per_page;
            const int k = idx - p * pieces_per_page;
            piece[b] = __ldg(reinterpret_cast<const uint4*>(
                                 digests + size_t(s_page[p]) * digest_bytes) +
                             k);
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int idx = first + b * threads;
          if (idx < total) {
            const int p = idx / pieces_per_page;
            const int k = idx - p * pieces_per_page;
            float x[kLaneSlots];
            UnpackVector<kDigest>(piece[b], x);
            float* row = s_rows + p * row_words + k * kPer;
#pragma unroll
            for (int j = 0; j < kPer; ++j) row[j] = x[j];
          }
        }
      }
    } else {
      const int per_page = 2 * head_dim;
      const int total = pages * per_page;
      for (int first = tid; first < total; first += threads * kBatch) {
        float x[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int idx = first + b * threads;
          if (idx < total) {
            const int p = idx / per_page;
            x[b] = ElementToFloat<kDigest>(
                digests + size_t(s_page[p]) * digest_bytes, idx - p * per_page);
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int idx = first + b * threads;
          if (idx < total) {
            const int p = idx / per_page;
            s_rows[p * row_words + idx - p * per_page] = x[b];
          }
        }
      }
    }
    __syncthreads();
    if (tid < pages) {
      const float* row = s_rows + tid * row_words;
      float score = 0.0f;
      for (int g = 0; g < group; ++g) {
        const float* q = s_query + g * head_dim;
        const float bound =
            args.kind.rotation_invariant
                ? PairNormHeadBound(q, row, head_dim, args.kind.rotated_dims,
                                    args.kind.pairing)
                : QuestHeadBound(q, row, head_dim);
        if (g == 0) {
          score = bound;
        } else if (args.reduction == GroupReduction::kMax) {
          score = bound > score ? bound : score;
        } else {
          score = AddF(score, bound);
        }
      }
      args.scores[begin + tile + tid] = score;
    }
  }
}

// The Quest bound (every non-rotation-invariant digest, with rows that
// split into 16-byte pieces): eight lanes per (page, query head). Lane k
// sums the channels i ≡ k (mod 8) in ascending order and three xor
// shuffles add the eight sums pairwise, which is QuestHeadBound's own
// order, so the bits stay the CPU's while a page's work spreads over 8·G
// lanes. Queries and digests are staged in shared memory as fp32 (exact)
// and transposed, lane k's channels side by side, so a lane reads four of
// them with one 16-byte load; lane rows are 16·odd bytes apart, so the
// eight lanes of a quarter-warp hit different banks. Each 8-lane group
// scores kQuestUnits (page, head) units of a tile, and the next tile's
// pieces are loaded into registers while this one is scored.
constexpr int kQuestThreads = 256;
constexpr int kQuestGroups = kQuestThreads / 8;  // 8-lane groups a block
constexpr int kQuestUnits = 4;                   // (page, head) a group
constexpr int kQuestPieces = 4;  // 16-byte pieces a thread stages a tile
constexpr int kQuestTargetBlocks = 2048;

struct QuestTile {
  int pages_per_tile;  // pages a block scores at once
  int lane_stride;     // floats between two lanes' staged channels
  int pieces;          // 16-byte pieces of a digest row
};

// Floats of shared memory: queries [G][8][stride], bounds [ppt][G] (padded
// to a multiple of 4), digests [ppt][2][8][stride].
__host__ __device__ int QuestRowsOffset(int group, const QuestTile& t) {
  return group * 8 * t.lane_stride + (t.pages_per_tile * group + 3) / 4 * 4;
}

size_t QuestSmemBytes(const PageScoreShape& shape, const QuestTile& t) {
  return sizeof(float) * (QuestRowsOffset(shape.group, t) +
                          size_t(t.pages_per_tile) * 16 * t.lane_stride);
}

QuestTile PlanQuestTile(const PageScoreShape& shape) {
  QuestTile t;
  t.pieces = 2 * shape.head_dim * DTypeBytes(shape.digest_dtype) / 16;
  t.pages_per_tile = std::min(kQuestUnits * kQuestGroups / shape.group,
                              kQuestPieces * kQuestThreads / t.pieces);
  const int per_lane = (shape.head_dim + 7) / 8;
  t.lane_stride = (per_lane + 3) / 4 * 4;
  if ((t.lane_stride / 4) % 2 == 0) t.lane_stride += 4;
  // Within the 48 KB a block may take without opting in.
  while (t.pages_per_tile > 1 && QuestSmemBytes(shape, t) > 48 * 1024) {
    --t.pages_per_tile;
  }
  return t;
}

template <DType kQ, DType kDigest>
__global__ void __launch_bounds__(kQuestThreads)
    ScoreQuestKernel(const ScoreArgs args, const QuestTile plan) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  constexpr int kPer = kDigest == DType::kFp32 ? 4 : 8;  // channels a piece
  const int head_dim = args.head_dim;
  const int group = args.group;
  const int ppt = plan.pages_per_tile;
  const int stride = plan.lane_stride;
  float* s_query = smem;                                // [G][8][stride]
  float* s_bound = s_query + group * 8 * stride;        // [ppt][G]
  float* s_rows = smem + QuestRowsOffset(group, plan);  // [ppt][2][8][stride]
  const int tid = threadIdx.x;
  const int stream = blockIdx.y;
  const char* query_base = static_cast<const char*>(args.queries) +
                           size_t(stream) * group * head_dim * DTypeBytes(kQ);
  for (int i = tid; i < group * head_dim; i += kQuestThreads) {
    const int g = i / head_dim;
    const int c = i - g * head_dim;
    s_query[(g * 8 + c % 8) * stride + c / 8] =
        ElementToFloat<kQ>(query_base, i);
  }
  const int n = args.candidate_count[stream];
  const int begin = args.candidate_begin[stream];
  const uint4* digests = static_cast<const uint4*>(args.digests);
  const int tile_pieces = ppt * plan.pieces;
  const int tile_stride = gridDim.x * ppt;

  uint4 piece[kQuestPieces];
  auto load = [&](int tile) {
    const int pages = min(ppt, n - tile);
#pragma unroll
    for (int b = 0; b < kQuestPieces; ++b) {
      const int idx = tid + b * kQuestThreads;
      const int p = idx / plan.pieces;
      if (idx < tile_pieces && p < pages) {
        const int page = args.candidate_pages[begin + tile + p];
        piece[b] = __ldg(digests + size_t(page) * plan.pieces +
                         (idx - p * plan.pieces));
      }
    }
  };
  int tile = blockIdx.x * ppt;
  if (tile < n) load(tile);
  const int k = tid & 7;
  const int lane_channels = (head_dim - k + 7) / 8;
  for (; tile < n; tile += tile_stride) {
    const int pages = min(ppt, n - tile);
    __syncthreads();  // queries written; the previous tile is read
#pragma unroll
    for (int b = 0; b < kQuestPieces; ++b) {
      const int idx = tid + b * kQuestThreads;
      const int p = idx / plan.pieces;
      if (idx < tile_pieces && p < pages) {
        // A piece may straddle the low and high rows when D·e is not a
        // multiple of 16: place each element by its own index in [2, D].
        const int first = (idx - p * plan.pieces) * kPer;
        float x[kLaneSlots];
        UnpackVector<kDigest>(piece[b], x);
        float* dst = s_rows + p * 16 * stride;
#pragma unroll
        for (int e = 0; e < kPer; ++e) {
          const int at = first + e;
          const int row = at >= head_dim ? 1 : 0;  // 0 low, 1 high
          const int c = at - row * head_dim;
          dst[(row * 8 + c % 8) * stride + c / 8] = x[e];
        }
      }
    }
    if (tile + tile_stride < n) load(tile + tile_stride);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kQuestUnits; ++u) {
      const int unit = (tid >> 3) + u * kQuestGroups;
      const int p = unit / group;
      const int g = unit - p * group;
      float sum = 0.0f;
      if (p < pages) {
        const float* q = s_query + (g * 8 + k) * stride;
        const float* low = s_rows + (p * 16 + k) * stride;
        const float* high = low + 8 * stride;
#pragma unroll
        for (int t0 = 0; t0 < lane_channels; t0 += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(q + t0);
          const float4 hv = *reinterpret_cast<const float4*>(high + t0);
          const float4 lv = *reinterpret_cast<const float4*>(low + t0);
          const float qs[4] = {qv.x, qv.y, qv.z, qv.w};
          const float hs[4] = {hv.x, hv.y, hv.z, hv.w};
          const float ls[4] = {lv.x, lv.y, lv.z, lv.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (t0 + e < lane_channels) {
              const float up = MulF(qs[e], hs[e]);
              const float down = MulF(qs[e], ls[e]);
              sum = AddF(sum, up > down ? up : down);
            }
          }
        }
      }
      sum = AddF(sum, __shfl_xor_sync(0xffffffffu, sum, 1));
      sum = AddF(sum, __shfl_xor_sync(0xffffffffu, sum, 2));
      sum = AddF(sum, __shfl_xor_sync(0xffffffffu, sum, 4));
      if (k == 0 && p < pages) s_bound[p * group + g] = sum;
    }
    __syncthreads();
    if (tid < pages) {
      float score = s_bound[tid * group];
      for (int h = 1; h < group; ++h) {
        const float bound = s_bound[tid * group + h];
        if (args.reduction == GroupReduction::kMax) {
          score = bound > score ? bound : score;
        } else {
          score = AddF(score, bound);
        }
      }
      args.scores[begin + tile + tid] = score;
    }
  }
}

// The Quest bound at D 128 with 16-bit queries and digests and G 1/2/4/8,
// the shape of every model the service is tuned for. Same lanes and order
// as ScoreQuestKernel (lane k: channels i ≡ k mod 8 ascending, then the
// three xor shuffles), but shared memory no longer bounds it (ncu had L1
// at 87 % there, from 48 wavefronts a page):
// - a lane keeps its channels of kHeads queries in registers for the whole
//   kernel, and reads its page's digest channels once for all of them;
// - a thread stages four adjacent 16-byte pieces of one digest row, whose
//   channel c sits in column c / 8 of residue row c % 8, so one residue's
//   four columns leave as one 16-byte store (8 stores a thread, not 32).
// Residue rows are kQ128Stride floats apart (16·odd bytes: the eight lanes
// of a page read distinct banks) and pages kQ128PagePitch (16 banks on, so
// the two pages of a quarter-warp's stores do not collide).
constexpr int kQ128Threads = 256;
// Blocks a launch, in resident waves: 4 and 16 (smaller runs of tiles a
// block) measured alike or slower than 1.
constexpr int kQ128Waves = 1;
constexpr int kQ128Pages = 32;  // a tile: 8 threads stage each page
constexpr int kQ128Stride = 20;
constexpr int kQ128PagePitch = 16 * kQ128Stride + 16;
// Query heads a lane holds (32 registers): 2 measured faster than 4 (one
// digest read a page for all four heads, but 125 registers and 2 blocks an
// SM): 25.0 against 30.5 µs at b32 × 4K, 237 against 244 at 64K.
constexpr int kQ128MaxHeads = 2;

// Rows, queries [G·8][stride], bounds [32][G].
size_t Quest128SmemBytes(int group) {
  return sizeof(float) *
         (size_t(kQ128Pages) * kQ128PagePitch +
          size_t(group) * 8 * kQ128Stride + size_t(kQ128Pages) * group);
}

// Work items are (stream, tile) pairs, stream-major, tiles_per_stream a
// stream (from the largest candidate count); a block takes per_block of
// them in a row.
struct Quest128Work {
  int tiles_per_stream;
  int items;
  int per_block;
};

template <DType kQ, DType kDigest, int kG>
__global__ void __launch_bounds__(kQ128Threads, 3)
    ScoreQuest128Kernel(const ScoreArgs args, const Quest128Work work) {
  LetDependentsLaunch();  // the selection, which waits for this grid
  constexpr int kHeads = kG < kQ128MaxHeads ? kG : kQ128MaxHeads;
  constexpr int kUnits = kG / kHeads;  // (page, head chunk) units a page
  extern __shared__ float4 smem4[];
  float* s_rows = reinterpret_cast<float*>(smem4);        // [32][pitch]
  float* s_query = s_rows + kQ128Pages * kQ128PagePitch;  // [G·8][stride]
  float* s_bound = s_query + kG * 8 * kQ128Stride;        // [32][G]
  const int tid = threadIdx.x;
  const int k = tid & 7;
  const int unit_group = tid >> 3;  // 32 of them
  const int first_head = (unit_group % kUnits) * kHeads;
  const uint4* digests = static_cast<const uint4*>(args.digests);
  // Staging: quarter-warp = two pages × four 64-byte groups of one row.
  const int stage_group = tid & 3;  // columns 4·group .. 4·group + 3
  const int stage_row = (tid >> 3) & 1;
  const int stage_page = (tid >> 4) * 2 + ((tid >> 2) & 1);
  float* stage_dst = s_rows + stage_page * kQ128PagePitch +
                     stage_row * 8 * kQ128Stride + 4 * stage_group;

  // The block's work items: a contiguous run of (stream, tile) pairs, so
  // that it loads a stream's queries once or twice, and keeps the next
  // tile's pieces in flight while it scores this one (at 4K tokens a block
  // a tile had left the kernel waiting on memory).
  const int w_begin = blockIdx.x * work.per_block;
  const int w_end = min(work.items, w_begin + work.per_block);
  // Two stages: the page this thread stages for item w + 2 is read while
  // item w is scored, and its digest pieces for item w + 1, so that the
  // digest loads no longer wait on the page index behind them.
  auto page_of = [&](int w) {
    if (w >= w_end) return -1;
    const int stream = w / work.tiles_per_stream;
    const int tile = (w - stream * work.tiles_per_stream) * kQ128Pages;
    if (tile + stage_page >= args.candidate_count[stream]) return -1;
    return args
        .candidate_pages[args.candidate_begin[stream] + tile + stage_page];
  };
  uint4 piece[4];
  auto load = [&](int page) {
    if (page >= 0) {
      const uint4* src =
          digests + size_t(page) * 32 + stage_row * 16 + stage_group * 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) piece[j] = __ldg(src + j);
    }
  };
  load(page_of(w_begin));
  int next_page = page_of(w_begin + 1);
  float q[kHeads][16];
  int stream = -1;
  for (int w = w_begin; w < w_end; ++w) {
    const int w_stream = w / work.tiles_per_stream;
    if (w_stream != stream) {
      // This lane's channels (k + 8c) of its heads, kept in registers; the
      // queries come in 16-byte pieces, transposed through shared memory.
      stream = w_stream;
      __syncthreads();  // the previous stream's queries are read
      const uint4* query_pieces =
          static_cast<const uint4*>(args.queries) + size_t(stream) * kG * 16;
      for (int i = tid; i < kG * 16; i += kQ128Threads) {
        float x[kLaneSlots];
        UnpackVector<kQ>(__ldg(query_pieces + i), x);
        const int g = i / 16;  // piece i: channels 8m..8m+7 of head g
        const int m = i % 16;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          s_query[(g * 8 + e) * kQ128Stride + m] = x[e];
        }
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const float* row = s_query + ((first_head + h) * 8 + k) * kQ128Stride;
#pragma unroll
        for (int c = 0; c < 16; c += 4) {
          const float4 v = *reinterpret_cast<const float4*>(row + c);
          q[h][c] = v.x;
          q[h][c + 1] = v.y;
          q[h][c + 2] = v.z;
          q[h][c + 3] = v.w;
        }
      }
    }
    const int tile = (w - stream * work.tiles_per_stream) * kQ128Pages;
    const int begin = args.candidate_begin[stream];
    const int pages = min(kQ128Pages, args.candidate_count[stream] - tile);
    __syncthreads();  // the previous tile is read
    if (stage_page < pages) {
      float x[4][kLaneSlots];
#pragma unroll
      for (int j = 0; j < 4; ++j) UnpackVector<kDigest>(piece[j], x[j]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        *reinterpret_cast<float4*>(stage_dst + e * kQ128Stride) =
            make_float4(x[0][e], x[1][e], x[2][e], x[3][e]);
      }
    }
    load(next_page);
    next_page = page_of(w + 2);
    if (pages <= 0) continue;  // a short stream's unused tile
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int p = (unit_group + u * 32) / kUnits;
      float sum[kHeads];
#pragma unroll
      for (int h = 0; h < kHeads; ++h) sum[h] = 0.0f;
      if (p < pages) {
        const float* low = s_rows + p * kQ128PagePitch + k * kQ128Stride;
        const float* high = low + 8 * kQ128Stride;
#pragma unroll
        for (int t0 = 0; t0 < 16; t0 += 4) {
          const float4 lv = *reinterpret_cast<const float4*>(low + t0);
          const float4 hv = *reinterpret_cast<const float4*>(high + t0);
          const float ls[4] = {lv.x, lv.y, lv.z, lv.w};
          const float hs[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
#pragma unroll
            for (int h = 0; h < kHeads; ++h) {
              const float up = MulF(q[h][t0 + e], hs[e]);
              const float down = MulF(q[h][t0 + e], ls[e]);
              sum[h] = AddF(sum[h], up > down ? up : down);
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        sum[h] = AddF(sum[h], __shfl_xor_sync(0xffffffffu, sum[h], 1));
        sum[h] = AddF(sum[h], __shfl_xor_sync(0xffffffffu, sum[h], 2));
        sum[h] = AddF(sum[h], __shfl_xor_sync(0xffffffffu, sum[h], 4));
      }
      if (k == 0 && p < pages) {
        if constexpr (kUnits == 1) {
          float score = sum[0];
#pragma unroll
          for (int h = 1; h < kHeads; ++h) {
            score = args.reduction == GroupReduction::kMax
                        ? (sum[h] > score ? sum[h] : score)
                        : AddF(score, sum[h]);
          }
          args.scores[begin + tile + p] = score;
        } else {
#pragma unroll
          for (int h = 0; h < kHeads; ++h) {
            s_bound[p * kG + first_head + h] = sum[h];
          }
        }
      }
    }
    if constexpr (kUnits > 1) {
      __syncthreads();
      if (tid < pages) {
        float score = s_bound[tid * kG];
#pragma unroll
        for (int h = 1; h < kG; ++h) {
          const float bound = s_bound[tid * kG + h];
          score = args.reduction == GroupReduction::kMax
                      ? (bound > score ? bound : score)
                      : AddF(score, bound);
        }
        args.scores[begin + tile + tid] = score;
      }
    }
  }
}

template <DType kQ, DType kDigest>
void* Quest128KernelFor(int group) {
  switch (group) {
    case 1:
      return reinterpret_cast<void*>(&ScoreQuest128Kernel<kQ, kDigest, 1>);
    case 2:
      return reinterpret_cast<void*>(&ScoreQuest128Kernel<kQ, kDigest, 2>);
    case 4:
      return reinterpret_cast<void*>(&ScoreQuest128Kernel<kQ, kDigest, 4>);
    case 8:
      return reinterpret_cast<void*>(&ScoreQuest128Kernel<kQ, kDigest, 8>);
    default:
      return nullptr;
  }
}

// The D-128 kernel for a shape, or null where it does not apply.
void* Quest128KernelFor(const PageScoreShape& shape) {
  if (shape.head_dim != 128) return nullptr;
  const bool q16 =
      shape.query_dtype == DType::kBf16 || shape.query_dtype == DType::kFp16;
  const bool d16 =
      shape.digest_dtype == DType::kBf16 || shape.digest_dtype == DType::kFp16;
  if (!q16 || !d16) return nullptr;
  if (shape.query_dtype == DType::kBf16) {
    return shape.digest_dtype == DType::kBf16
               ? Quest128KernelFor<DType::kBf16, DType::kBf16>(shape.group)
               : Quest128KernelFor<DType::kBf16, DType::kFp16>(shape.group);
  }
  return shape.digest_dtype == DType::kBf16
             ? Quest128KernelFor<DType::kFp16, DType::kBf16>(shape.group)
             : Quest128KernelFor<DType::kFp16, DType::kFp16>(shape.group);
}

template <DType kQ>
void* QuestKernelFor(DType digest) {
  switch (digest) {
    case DType::kBf16:
      return reinterpret_cast<void*>(&ScoreQuestKernel<kQ, DType::kBf16>);
    case DType::kFp16:
      return reinterpret_cast<void*>(&ScoreQuestKernel<kQ, DType::kFp16>);
    default:
      return reinterpret_cast<void*>(&ScoreQuestKernel<kQ, DType::kFp32>);
  }
}

template <DType kQ>
void* KernelFor(DType digest) {
  switch (digest) {
    case DType::kBf16:
      return reinterpret_cast<void*>(&ScorePagesKernel<kQ, DType::kBf16>);
    case DType::kFp16:
      return reinterpret_cast<void*>(&ScorePagesKernel<kQ, DType::kFp16>);
    default:
      return reinterpret_cast<void*>(&ScorePagesKernel<kQ, DType::kFp32>);
  }
}

bool KnownDType(DType t) {
  return t == DType::kBf16 || t == DType::kFp16 || t == DType::kFp32;
}

}  // namespace

absl::Status ScorePages(const PageScoreShape& shape,
                        const PageScoreInputs& inputs, float* scores,
                        cudaStream_t stream) {
  if (shape.streams < 1 || shape.streams > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams: ", shape.streams, ", want 1..65535"));
  }
  if (shape.group < 1 || shape.group > kMaxScoreGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("group: ", shape.group, ", want 1..", kMaxScoreGroup));
  }
  if (shape.head_dim < 1 || shape.head_dim > kMaxScoreHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim: ", shape.head_dim, ", want 1..", kMaxScoreHeadDim));
  }
  if (!KnownDType(shape.query_dtype) || !KnownDType(shape.digest_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_dtype: ", static_cast<int>(shape.query_dtype),
                     ", digest_dtype: ", static_cast<int>(shape.digest_dtype),
                     "; want bf16/fp16/fp32"));
  }
  absl::Status valid = shape.kind.Validate(shape.head_dim);
  if (!valid.ok()) return valid;
  if (shape.kind.rotation_invariant && shape.digest_dtype != DType::kFp32) {
    return absl::InvalidArgumentError(
        "digest_dtype: rotation-invariant digests are fp32 (pair norms are "
        "rounded up in fp32)");
  }
  if (shape.reduction != GroupReduction::kMax &&
      shape.reduction != GroupReduction::kSum) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reduction: ", static_cast<int>(shape.reduction), ", want MAX or SUM"));
  }
  if (shape.max_candidates_per_stream < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_candidates_per_stream: ", shape.max_candidates_per_stream,
        ", want >= 1"));
  }
  if (inputs.queries == nullptr || inputs.digests == nullptr ||
      inputs.candidate_pages == nullptr || inputs.candidate_begin == nullptr ||
      inputs.candidate_count == nullptr || scores == nullptr) {
    return absl::InvalidArgumentError(
        "inputs: queries, digests, candidate_pages, candidate_begin, "
        "candidate_count and scores must all be set");
  }
  ScoreArgs args;
  args.group = shape.group;
  args.head_dim = shape.head_dim;
  args.kind = shape.kind;
  args.reduction = shape.reduction;
  args.queries = inputs.queries;
  args.digests = inputs.digests;
  args.candidate_pages = inputs.candidate_pages;
  args.candidate_begin = inputs.candidate_begin;
  args.candidate_count = inputs.candidate_count;
  args.scores = scores;
  args.vector =
      (2 * shape.head_dim * DTypeBytes(shape.digest_dtype)) % 16 == 0 &&
      Aligned16(inputs.digests);
  // Its work items, (stream, tile) pairs, are counted in an int.
  const int64_t quest128_tiles =
      (int64_t{shape.max_candidates_per_stream} + kQ128Pages - 1) / kQ128Pages;
  const int64_t quest128_items = quest128_tiles * shape.streams;
  if (void* kernel = Quest128KernelFor(shape);
      kernel != nullptr && !shape.kind.rotation_invariant && args.vector &&
      Aligned16(inputs.queries) &&
      quest128_items <= std::numeric_limits<int>::max()) {
    const size_t smem = Quest128SmemBytes(shape.group);
    if (absl::Status allowed = AllowDynamicSharedMemory(kernel, smem);
        !allowed.ok()) {
      return allowed;
    }
    absl::StatusOr<int> slots = ResidentBlocks(kernel, kQ128Threads, smem);
    if (!slots.ok()) return slots.status();
    Quest128Work work;
    work.tiles_per_stream = int(quest128_tiles);
    work.items = int(quest128_items);
    const int target = *slots * kQ128Waves;
    work.per_block = (work.items + target - 1) / target;
    const int blocks = (work.items + work.per_block - 1) / work.per_block;
    void* kernel_args[] = {&args, &work};
    KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernel(
        kernel, dim3(blocks), dim3(kQ128Threads), kernel_args, smem, stream));
    KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScoreQuest128Kernel");
    return absl::OkStatus();
  }
  if (!shape.kind.rotation_invariant && args.vector) {
    const QuestTile plan = PlanQuestTile(shape);
    const int tiles =
        (shape.max_candidates_per_stream + plan.pages_per_tile - 1) /
        plan.pages_per_tile;
    const int per_stream =
        std::max(1, std::min(tiles, (kQuestTargetBlocks + shape.streams - 1) /
                                        shape.streams));
    void* kernel = shape.query_dtype == DType::kBf16
                       ? QuestKernelFor<DType::kBf16>(shape.digest_dtype)
                   : shape.query_dtype == DType::kFp16
                       ? QuestKernelFor<DType::kFp16>(shape.digest_dtype)
                       : QuestKernelFor<DType::kFp32>(shape.digest_dtype);
    void* kernel_args[] = {&args, const_cast<QuestTile*>(&plan)};
    KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernel(
        kernel, dim3(per_stream, shape.streams), dim3(kQuestThreads),
        kernel_args, QuestSmemBytes(shape, plan), stream));
    KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScoreQuestKernel");
    return absl::OkStatus();
  }
  // 64 pages a block where the staged rows fit in 72 KB, else 32.
  const size_t row_bytes = sizeof(float) * RowWords(shape.head_dim);
  args.pages_per_tile = 64 * row_bytes <= 72 * 1024 ? 64 : 32;
  const size_t smem = sizeof(float) * shape.group * shape.head_dim +
                      args.pages_per_tile * row_bytes +
                      sizeof(int) * args.pages_per_tile;
  void* kernel = shape.query_dtype == DType::kBf16
                     ? KernelFor<DType::kBf16>(shape.digest_dtype)
                 : shape.query_dtype == DType::kFp16
                     ? KernelFor<DType::kFp16>(shape.digest_dtype)
                     : KernelFor<DType::kFp32>(shape.digest_dtype);
  if (absl::Status allowed = AllowDynamicSharedMemory(kernel, smem);
      !allowed.ok()) {
    return allowed;
  }
  int tiles = (shape.max_candidates_per_stream + args.pages_per_tile - 1) /
              args.pages_per_tile;
  if (tiles > kMaxGridTiles) tiles = kMaxGridTiles;
  void* kernel_args[] = {&args};
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaLaunchKernel(kernel, dim3(tiles, shape.streams),
                       dim3(args.pages_per_tile), kernel_args, smem, stream));
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScorePagesKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
