// The three launches of a prefill chunk (chunk_attention.h). Both attention
// kernels use mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) on 64×64
// tiles held in shared memory, four warps of 16 query rows each:
// - fragments come from shared memory by ldmatrix (V transposed on the
//   fly), tiles arrive by cp.async one tile ahead of the math; invalid keys
//   (empty slots, past the end) are zero-filled so that 0·garbage cannot
//   make a NaN;
// - a key k of stream b is slot k (k < slots: pool row slot_rows[b, k],
//   visible when its position ≥ 0) or the chunk's token j = k − slots
//   (visible to query token t ≥ j). vis[k] holds the first query token that
//   sees key k: −1, j, or kNever.
// The query rows of a stream are r = t·G + g (G divides 64, so a tile of 64
// rows holds whole tokens).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/cuda_status.h"

namespace kvmem::cuda {
namespace {

constexpr int kD = kChunkHeadDim;
constexpr int kRows = kChunkTileRows;  // query rows per tile
constexpr int kKeys = 64;              // keys per tile
constexpr int kThreads = 128;          // 4 warps × 16 rows
constexpr int kPitch = kD + 8;         // halves per shared row: 272 B, so the 8
                                       // rows of an ldmatrix phase hit 32 banks
constexpr int kTileHalves = kKeys * kPitch;
constexpr int kProbPitch = kKeys + 8;  // floats per row of the p tile
constexpr int kNever = INT_MAX;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The workspace: per stream and query, the factor f and the renormalisation
// scale applied before it (0 = none); per stream the end-of-step scale.
struct Workspace {
  float* factor;       // [B, T]
  double* prescale;    // [B, T]
  double* finalscale;  // [B]
};

Workspace CarveWorkspace(const ChunkShape& shape, void* base) {
  const size_t bt = size_t(shape.streams) * size_t(shape.chunk);
  char* p = static_cast<char*>(base);
  Workspace w;
  w.factor = reinterpret_cast<float*>(p);
  p += AlignUp(bt * sizeof(float));
  w.prescale = reinterpret_cast<double*>(p);
  p += AlignUp(bt * sizeof(double));
  w.finalscale = reinterpret_cast<double*>(p);
  return w;
}

// ---- phase 1: the factors, walking n as UpdateScores does ----------------

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
  int64_t end = n + chunk;
  if (any_mid_step == 0) {
    for (int q = threadIdx.x; q < chunk; q += blockDim.x) {
      factor[q] = IncrementFactor(beta, n + q + 1);
      prescale[q] = 0.0;
    }
  } else {
    if (threadIdx.x != 0) return;
    int64_t e = n;  // UpdateScores' loop, literally
    for (int q = 0; q < chunk; ++q) {
      prescale[q] = 0.0;
      if (e > 0 && NeedsMidStepRenormalisation(beta, e + 1)) {
        prescale[q] = ScoreScale(beta, e);
        e = 0;
      }
      factor[q] = IncrementFactor(beta, e + 1);
      ++e;
    }
    end = e;
  }
  if (threadIdx.x == 0) {
    double final_scale = 0.0;
    if (NeedsRenormalisation(beta, end)) {
      final_scale = ScoreScale(beta, end);
      end = 0;
    }
    w.finalscale[b] = final_scale;
    *score_exponent = end;
  }
}

// ---- device helpers -------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  __device__ static uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Elem<__half> {
  __device__ static uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// Four 8×8 b16 matrices; lane i gives the address of row i%8 of matrix i/8.
__device__ __forceinline__ void LdMatrix(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void LdMatrixTransposed(uint32_t (&r)[4],
                                                   uint32_t address) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(address));
}

// 16 bytes global → shared; zeros when !valid (nothing is read then).
__device__ __forceinline__ void CopyAsync16(void* shared, const void* global,
                                            bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   SharedAddress(shared)),
               "l"(global), "r"(valid ? 16 : 0));
}
template <int kBytes>
__device__ __forceinline__ void CopyAsyncSmall(void* shared,
                                               const void* global) {
  asm volatile(
      "cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(SharedAddress(shared)),
      "l"(global), "n"(kBytes));
}
__device__ __forceinline__ void CommitCopies() {
  asm volatile("cp.async.commit_group;");
}
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

struct ChunkArgs {
  int streams;
  int group;
  int chunk;
  int sinks;
  int64_t slots;
  float scale_log2;  // softmax_scale · log2(e)
  ScoreReduction reduction;
  ChunkInputs in;
  ChunkScoreState state;
  ChunkOutputs out;
  Workspace w;
};

// Global index of stream b's query row r = t·G + g.
__device__ __forceinline__ int64_t QueryRow(const ChunkArgs& a, int b, int r) {
  const int t = r / a.group;
  return (int64_t{t} * a.streams + b) * a.group + r % a.group;
}

// Stream b's slot arrays, from the flat arrays or its own pointers.
struct StreamSlots {
  const int64_t* positions;  // [slots]
  const int32_t* slot_rows;  // [slots]
  float* scores;             // [slots]
};
__device__ __forceinline__ StreamSlots SlotsOf(const ChunkArgs& a, int b) {
  if (a.state.streams != nullptr) {
    const CascadeStreamPointers& p = a.state.streams[b];
    return {p.positions, p.slot_rows, p.scores};
  }
  const int64_t at = int64_t{b} * a.slots;
  return {a.in.positions + at, a.in.slot_rows + at, a.state.scores + at};
}

// Starts the copy of keys [k0, k0 + 64) of stream b (rows into k_tile and,
// when v_tile is not null, v_tile), and writes their vis.
template <typename T>
__device__ void LoadKeyTile(const ChunkArgs& a, int b, int64_t k0, T* k_tile,
                            T* v_tile, int* vis) {
  const T* key_rows = static_cast<const T*>(a.in.key_rows);
  const T* value_rows = static_cast<const T*>(a.in.value_rows);
  const T* keys = static_cast<const T*>(a.in.keys);
  const T* values = static_cast<const T*>(a.in.values);
  constexpr int kPieces = kD * int(sizeof(T)) / 16;  // 16-byte pieces a row
  const StreamSlots mine = SlotsOf(a, b);
  for (int c = threadIdx.x; c < kKeys * kPieces; c += kThreads) {
    const int key = c / kPieces;
    const int piece = c % kPieces;
    const int64_t k = k0 + key;
    const T* ksrc = keys;
    const T* vsrc = values;
    int first_token = kNever;
    if (k < a.slots) {
      if (mine.positions[k] >= 0) {
        const int64_t row = mine.slot_rows[k];
        ksrc = key_rows + row * kD;
        vsrc = value_rows + row * kD;
        first_token = -1;
      }
    } else if (k < a.slots + a.chunk) {
      const int64_t j = k - a.slots;
      ksrc = keys + (j * a.streams + b) * kD;
      vsrc = values + (j * a.streams + b) * kD;
      first_token = int(j);
    }
    const bool valid = first_token != kNever;
    const int offset = piece * (16 / int(sizeof(T)));
    CopyAsync16(k_tile + key * kPitch + offset, ksrc + offset, valid);
    if (v_tile != nullptr) {
      CopyAsync16(v_tile + key * kPitch + offset, vsrc + offset, valid);
    }
    if (piece == 0) vis[key] = first_token;
  }
}

// Starts the copy of stream b's query rows [r0, r0 + 64) into q_tile.
template <typename T>
__device__ void LoadQueryTile(const ChunkArgs& a, int b, int r0, T* q_tile) {
  const T* queries = static_cast<const T*>(a.in.queries);
  const int rows = a.chunk * a.group;
  constexpr int kPieces = kD * int(sizeof(T)) / 16;
  for (int c = threadIdx.x; c < kRows * kPieces; c += kThreads) {
    const int row = c / kPieces;
    const int piece = c % kPieces;
    const int r = r0 + row;
    const bool valid = r < rows;
    const T* src = queries + (valid ? QueryRow(a, b, r) * kD : 0);
    const int offset = piece * (16 / int(sizeof(T)));
    CopyAsync16(q_tile + row * kPitch + offset, src + offset, valid);
  }
}

// S (16 rows of this warp × 64 keys) = Q·Kᵀ from A fragments and a key tile.
template <typename T>
__device__ __forceinline__ void QueryKeyTile(const uint32_t (&qf)[8][4],
                                             const T* k_tile,
                                             float (&s)[8][4]) {
  const int lane = threadIdx.x % 32;
  const int j = lane / 8;  // which of the four matrices this lane addresses
#pragma unroll
  for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
    for (int n2 = 0; n2 < 4; ++n2) {
      // Matrices: keys n2·16 + (j/2)·8 + 0..7, channels kk·16 + (j%2)·8.
      const int key = n2 * 16 + (j / 2) * 8 + lane % 8;
      const int d = kk * 16 + (j % 2) * 8;
      uint32_t kb[4];
      LdMatrix(kb, SharedAddress(k_tile + key * kPitch + d));
      Elem<T>::Mma(s[2 * n2], qf[kk], kb[0], kb[1]);
      Elem<T>::Mma(s[2 * n2 + 1], qf[kk], kb[2], kb[3]);
    }
  }
}

// This warp's A fragments of a query tile (16 rows × 128 channels).
template <typename T>
__device__ __forceinline__ void LoadQueryFragments(const T* q_tile,
                                                   uint32_t (&qf)[8][4]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int j = lane / 8;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    // Matrices: rows (j%2)·8 + 0..7, channels kk·16 + (j/2)·8.
    const int row = warp * 16 + (j % 2) * 8 + lane % 8;
    const int d = kk * 16 + (j / 2) * 8;
    LdMatrix(qf[kk], SharedAddress(q_tile + row * kPitch + d));
  }
}

// ---- phase 2: forward ------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ChunkForwardKernel(const ChunkArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);
  T* k_tiles = q_tile + kTileHalves;       // [2][64][kPitch]
  T* v_tiles = k_tiles + 2 * kTileHalves;  // [2][64][kPitch]
  int* vis = reinterpret_cast<int*>(v_tiles + 2 * kTileHalves);  // [2][64]

  const int b = blockIdx.y;
  const int r0 = blockIdx.x * kRows;
  const int rows = a.chunk * a.group;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int gid = lane / 4;  // fragment row within 8
  const int tig = lane % 4;  // fragment column pair
  const int row_a = r0 + warp * 16 + gid;
  const int row_b = row_a + 8;
  const int token_a = row_a < rows ? row_a / a.group : -2;  // −2 sees none
  const int token_b = row_b < rows ? row_b / a.group : -2;
  const int last_token = (min(r0 + kRows, rows) - 1) / a.group;
  const int64_t key_end = a.slots + last_token + 1;  // later keys: masked
  const int tiles = int((key_end + kKeys - 1) / kKeys);

  LoadQueryTile<T>(a, b, r0, q_tile);
  LoadKeyTile<T>(a, b, 0, k_tiles, v_tiles, vis);
  CommitCopies();

  uint32_t qf[8][4];
  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY;  // running max, log2 units
  float l_a = 0.0f, l_b = 0.0f;            // this lane's share of Σp

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < tiles) {
      const int next = stage ^ 1;
      LoadKeyTile<T>(a, b, int64_t{tile + 1} * kKeys,
                     k_tiles + next * kTileHalves, v_tiles + next * kTileHalves,
                     vis + next * kKeys);
    }
    CommitCopies();
    WaitCopies<1>();
    __syncthreads();
    if (tile == 0) LoadQueryFragments<T>(q_tile, qf);
    const T* k_tile = k_tiles + stage * kTileHalves;
    const T* v_tile = v_tiles + stage * kTileHalves;
    const int* tile_vis = vis + stage * kKeys;

    float s[8][4];
    QueryKeyTile<T>(qf, k_tile, s);

    float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int first = tile_vis[n * 8 + tig * 2 + e];
        s[n][e] = token_a >= first ? s[n][e] * a.scale_log2 : -INFINITY;
        s[n][e + 2] = token_b >= first ? s[n][e + 2] * a.scale_log2 : -INFINITY;
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
    const float alpha_a = exp2f(m_a - base_a);
    const float alpha_b = exp2f(m_b - base_b);
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
      s[n][0] = exp2f(s[n][0] - base_a);
      s[n][1] = exp2f(s[n][1] - base_a);
      s[n][2] = exp2f(s[n][2] - base_b);
      s[n][3] = exp2f(s[n][3] - base_b);
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
        // Matrices: keys kk·16 + (j%2)·8 + 0..7, channels (2·nd2 + j/2)·8.
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
  if (row_a < rows) {
    const int64_t g = QueryRow(a, b, row_a);
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
  if (row_b < rows) {
    const int64_t g = QueryRow(a, b, row_b);
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

// ---- phase 3: scores
// ---------------------------------------------------------

// Per query tile: the queries, their LSE, factors and renormalisations.
template <typename T>
struct ScoreStage {
  T q[kTileHalves];
  float lse[kRows];
  float factor[kRows];     // per token of the tile (≤ 64)
  double prescale[kRows];  // per token of the tile
};

template <typename T>
__device__ void LoadScoreStage(const ChunkArgs& a, int b, int qt,
                               ScoreStage<T>* stage) {
  const int r0 = qt * kRows;
  const int rows = a.chunk * a.group;
  LoadQueryTile<T>(a, b, r0, stage->q);
  const int tokens = kRows / a.group;
  const int t0 = r0 / a.group;
  const int i = threadIdx.x;
  if (i < kRows && r0 + i < rows) {
    CopyAsyncSmall<4>(&stage->lse[i], a.out.lse + QueryRow(a, b, r0 + i));
  }
  if (i < tokens && t0 + i < a.chunk) {
    const int64_t q = int64_t{b} * a.chunk + t0 + i;
    CopyAsyncSmall<4>(&stage->factor[i], a.w.factor + q);
    CopyAsyncSmall<8>(&stage->prescale[i], a.w.prescale + q);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ChunkScoresKernel(const ChunkArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto* stages = reinterpret_cast<ScoreStage<T>*>(shared_bytes);  // [2]
  T* k_tile = reinterpret_cast<T*>(stages + 2);
  float* probs = reinterpret_cast<float*>(k_tile + kTileHalves);  // [64][pitch]
  int* vis = reinterpret_cast<int*>(probs + kRows * kProbPitch);  // [64]

  const int b = blockIdx.y;
  const int64_t k0 = int64_t{blockIdx.x} * kKeys;
  const int rows = a.chunk * a.group;
  const int q_tiles = (rows + kRows - 1) / kRows;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int gid = lane / 4;
  const int tig = lane % 4;
  const int tokens_per_tile = kRows / a.group;

  LoadKeyTile<T>(a, b, k0, k_tile, nullptr, vis);
  LoadScoreStage<T>(a, b, 0, &stages[0]);
  CommitCopies();

  // Thread c < 64 owns key k0 + c: a resident cascade slot's u, or a new
  // token's initial score (from 0). Sinks, empty slots and keys past the
  // end have no score.
  const int64_t my_key = k0 + threadIdx.x;
  float* my_score = nullptr;
  if (threadIdx.x < kKeys) {
    if (my_key >= a.sinks && my_key < a.slots) {
      const StreamSlots mine = SlotsOf(a, b);
      if (mine.positions[my_key] >= 0) my_score = mine.scores + my_key;
    } else if (my_key >= a.slots && my_key < a.slots + a.chunk) {
      my_score =
          a.out.initial_scores + int64_t{b} * a.chunk + (my_key - a.slots);
    }
  }
  float u = 0.0f;
  if (my_score != nullptr && my_key < a.slots) u = *my_score;
  // Query tiles before the first token that sees any key here add only
  // zeros (u + f·0 = u): their products are skipped, not their
  // renormalisations.
  const int64_t last_key = min(k0 + kKeys, a.slots + a.chunk) - 1;
  const int first_seeing_token =
      k0 < a.slots ? 0 : int(min(k0, last_key) - a.slots);

  for (int qt = 0; qt < q_tiles; ++qt) {
    ScoreStage<T>& stage = stages[qt & 1];
    if (qt + 1 < q_tiles)
      LoadScoreStage<T>(a, b, qt + 1, &stages[(qt + 1) & 1]);
    CommitCopies();
    WaitCopies<1>();
    __syncthreads();
    const int t0 = qt * tokens_per_tile;
    const bool any_seen = t0 + tokens_per_tile > first_seeing_token;
    if (any_seen) {
      uint32_t qf[8][4];
      LoadQueryFragments<T>(stage.q, qf);
      float s[8][4];
      QueryKeyTile<T>(qf, k_tile, s);
      const int local_a = warp * 16 + gid;
      const int local_b = local_a + 8;
      const int row_a = qt * kRows + local_a;
      const int row_b = row_a + 8;
      const int token_a = row_a < rows ? row_a / a.group : -2;
      const int token_b = row_b < rows ? row_b / a.group : -2;
      const float lse_a = row_a < rows ? stage.lse[local_a] * kLog2e : 0.0f;
      const float lse_b = row_b < rows ? stage.lse[local_b] * kLog2e : 0.0f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int key = n * 8 + tig * 2;
        float2 pa, pb;
        pa.x =
            token_a >= vis[key] ? exp2f(s[n][0] * a.scale_log2 - lse_a) : 0.0f;
        pa.y = token_a >= vis[key + 1] ? exp2f(s[n][1] * a.scale_log2 - lse_a)
                                       : 0.0f;
        pb.x =
            token_b >= vis[key] ? exp2f(s[n][2] * a.scale_log2 - lse_b) : 0.0f;
        pb.y = token_b >= vis[key + 1] ? exp2f(s[n][3] * a.scale_log2 - lse_b)
                                       : 0.0f;
        *reinterpret_cast<float2*>(probs + local_a * kProbPitch + key) = pa;
        *reinterpret_cast<float2*>(probs + local_b * kProbPitch + key) = pb;
      }
    }
    __syncthreads();
    if (my_score != nullptr) {
      const int tokens = min(tokens_per_tile, a.chunk - t0);
      for (int i = 0; i < tokens; ++i) {
        const float r =
            any_seen ? ReduceGroupProbability(
                           probs + i * a.group * kProbPitch + threadIdx.x,
                           a.group, kProbPitch, a.reduction)
                     : 0.0f;
        if (stage.prescale[i] != 0.0) u = RescaleScore(u, stage.prescale[i]);
        u = AccumulateScore(u, stage.factor[i], r);
      }
    }
    __syncthreads();  // probs and the stage are refilled next iteration
  }
  if (my_score != nullptr) {
    const double final_scale = a.w.finalscale[b];
    if (final_scale != 0.0) u = RescaleScore(u, final_scale);
    *my_score = u;
  }
}

size_t ForwardSharedBytes() {
  return size_t(5) * kTileHalves * 2 + 2 * kKeys * sizeof(int);
}
template <typename T>
size_t ScoresSharedBytes() {
  return 2 * sizeof(ScoreStage<T>) + kTileHalves * sizeof(T) +
         kRows * kProbPitch * sizeof(float) + kKeys * sizeof(int);
}

template <typename T>
absl::Status LaunchAttention(const ChunkArgs& a, const ChunkPhaseEvents& events,
                             cudaStream_t stream) {
  const size_t forward_smem = ForwardSharedBytes();
  const size_t scores_smem = ScoresSharedBytes<T>();
  KVMEM_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      ChunkForwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      int(forward_smem)));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      ChunkScoresKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      int(scores_smem)));
  const int rows = a.chunk * a.group;
  const dim3 forward_grid((rows + kRows - 1) / kRows, a.streams);
  ChunkForwardKernel<T><<<forward_grid, kThreads, forward_smem, stream>>>(a);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkForwardKernel");
  if (events.after_forward != nullptr) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(events.after_forward, stream));
  }
  const dim3 scores_grid(unsigned((a.slots + a.chunk + kKeys - 1) / kKeys),
                         a.streams);
  ChunkScoresKernel<T><<<scores_grid, kThreads, scores_smem, stream>>>(a);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkScoresKernel");
  return absl::OkStatus();
}

absl::Status CheckShape(const ChunkShape& shape) {
  if (absl::Status valid = shape.params.Validate(); !valid.ok()) return valid;
  if (shape.streams < 1 || shape.streams > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "streams: ", shape.streams, ", want 1..65535 (a grid dimension)"));
  }
  if (shape.group < 1 || kRows % shape.group != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group: ", shape.group, ", want a divisor of ", kRows));
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
  const size_t bt =
      size_t(std::max(shape.streams, 0)) * size_t(std::max(shape.chunk, 0));
  return AlignUp(bt * sizeof(float)) + AlignUp(bt * sizeof(double)) +
         AlignUp(size_t(std::max(shape.streams, 0)) * sizeof(double));
}

absl::Status AttendChunk(const ChunkShape& shape, const ChunkInputs& inputs,
                         const ChunkScoreState& state,
                         const ChunkOutputs& outputs, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream,
                         const ChunkPhaseEvents& events) {
  if (absl::Status valid = CheckShape(shape); !valid.ok()) return valid;
  // With per-stream pointers the flat state arrays are not read.
  const bool flat = state.streams == nullptr;
  const void* required[] = {
      inputs.queries,
      inputs.keys,
      inputs.values,
      inputs.key_rows,
      inputs.value_rows,
      flat ? static_cast<const void*>(inputs.slot_rows) : state.streams,
      flat ? static_cast<const void*>(inputs.positions) : state.streams,
      flat ? static_cast<const void*>(state.scores) : state.streams,
      flat ? static_cast<const void*>(state.score_exponent) : state.streams,
      outputs.out,
      outputs.lse,
      outputs.initial_scores,
      workspace};
  const char* names[] = {
      "queries",   "keys",           "values",   "key_rows",       "value_rows",
      "slot_rows", "positions",      "scores",   "score_exponent", "out",
      "lse",       "initial_scores", "workspace"};
  for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); ++i) {
    if (required[i] == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(names[i], ": null, want a device pointer"));
    }
  }
  for (const void* p : {inputs.queries, inputs.keys, inputs.values,
                        inputs.key_rows, inputs.value_rows}) {
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
  return shape.dtype == DType::kBf16
             ? LaunchAttention<__nv_bfloat16>(a, events, stream)
             : LaunchAttention<__half>(a, events, stream);
}

}  // namespace kvmem::cuda
