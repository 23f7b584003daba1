// The tiles both attention passes of a prefill chunk share
// (chunk_attention.cu and chunk_attention_sm90a.cu): the block's shape, the
// workspace, and the device helpers that stage query and key tiles in
// shared memory and multiply them on tensor cores (mma.sync m16n8k16,
// bf16/fp16 in, fp32 accumulate). See chunk_attention.cu for the layout.
#ifndef KVMEM_KERNELS_CUDA_CHUNK_TILES_CUH_
#define KVMEM_KERNELS_CUDA_CHUNK_TILES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/chunk_attention.h"

namespace kvmem::cuda::chunk_tiles {

constexpr int kD = kChunkHeadDim;
constexpr int kRows = 128;  // query rows per block
constexpr int kKeys = 64;   // keys per tile
constexpr int kWarps = 8;   // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr int kPitch = kD + 8;  // halves per shared row: 272 B, so the 8
                                // rows of an ldmatrix phase hit 32 banks
constexpr int kTileHalves = kKeys * kPitch;
constexpr int kQueryHalves = kRows * kPitch;
constexpr int kNever = INT_MAX;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr size_t kAlign = 256;

inline size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

inline int QueryBlocks(const ChunkShape& shape) {
  return (shape.chunk * shape.group + kRows - 1) / kRows;
}

// The workspace: per stream and query the factor f(n+1+q) times every
// renormalisation scale after q, and the scale of a renormalisation just
// before q (0 = none); per stream the scale of the old u (0 = none); per
// query block, stream and key the block's sum of f·r.
struct Workspace {
  float* factor;     // [B, T]
  double* prescale;  // [B, T]
  double* scale;     // [B]
  float* partials;   // [query blocks, B, slots + T]
};

inline size_t PartialsCount(const ChunkShape& shape) {
  return size_t(QueryBlocks(shape)) * size_t(shape.streams) *
         size_t(shape.slots() + shape.chunk);
}

inline Workspace CarveWorkspace(const ChunkShape& shape, void* base) {
  const size_t bt = size_t(shape.streams) * size_t(shape.chunk);
  char* p = static_cast<char*>(base);
  Workspace w;
  w.factor = reinterpret_cast<float*>(p);
  p += AlignUp(bt * sizeof(float));
  w.prescale = reinterpret_cast<double*>(p);
  p += AlignUp(bt * sizeof(double));
  w.scale = reinterpret_cast<double*>(p);
  p += AlignUp(size_t(shape.streams) * sizeof(double));
  w.partials = reinterpret_cast<float*>(p);
  return w;
}

// ---- device helpers -------------------------------------------------------

// The kernels' dynamic shared memory, one symbol for the kernels and the
// helpers below alike.
extern __shared__ __align__(16) unsigned char shared_bytes[];

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

// 2^x by the SFU alone (ex2.approx.ftz: about 2 ulp, subnormals flushed to
// 0, 2^−∞ = 0); exp2f adds a denormal fix-up around it, on every
// probability of both passes.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
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

// Query block qb's partial sums of stream b: [keys_total = slots + T].
__device__ __forceinline__ float* BlockPartials(const ChunkArgs& a, int qb,
                                                int b, int64_t keys_total) {
  return a.w.partials + (int64_t{qb} * a.streams + b) * keys_total;
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

// A stream's slot indices for key tiles, staged in shared memory by
// cp.async three tiles ahead of the tile's own copy (tile i in stage
// i % kIndexStages), so that finding a tile's pool rows never waits on a
// chain of global loads: [kIndexStages][64] each. (The wgmma kernels keep
// up to four of these in flight: chunk_attention_sm90a.cu.)
constexpr int kIndexStages = 8;
constexpr int kIndexAhead = 3;
struct KeyIndexTiles {
  int64_t* positions;
  int32_t* rows;
};
constexpr size_t kIndexSharedBytes =
    size_t(kIndexStages) * kKeys * (sizeof(int64_t) + sizeof(int32_t));

// They lead both kernels' dynamic shared memory: at a fixed address, they
// cost no registers to find (kept in registers, the forward pass spilled).
__device__ __forceinline__ KeyIndexTiles SharedKeyIndices() {
  int64_t* positions = reinterpret_cast<int64_t*>(shared_bytes);
  return {positions,
          reinterpret_cast<int32_t*>(positions + kIndexStages * kKeys)};
}

// Starts the copy of the indices of key tile `tile` (slots only; chunk
// keys need none) into its stage.
__device__ __forceinline__ void LoadKeyIndices(const StreamSlots& mine,
                                               int64_t slots, int tile) {
  const KeyIndexTiles idx = SharedKeyIndices();
  if (threadIdx.x < kKeys) {
    const int at = (tile % kIndexStages) * kKeys + threadIdx.x;
    const int64_t k = int64_t{tile} * kKeys + threadIdx.x;
    const bool slot = k < slots;
    CopyAsync8(idx.positions + at, mine.positions + (slot ? k : 0), slot);
    CopyAsync4(idx.rows + at, mine.slot_rows + (slot ? k : 0), slot);
  }
}

// The wgmma kernels' tiles (chunk_attention_sm90a.cu): the canonical
// 128-byte swizzle that their matrix descriptors name, in two halves of 64
// channels, each [kTileKeys keys][128 B], with 16-byte piece c of key r at
// (c ^ r mod 8)·16, so the 8 rows of a core matrix hit all 32 banks.
template <int kTileKeys>
struct SwizzledTile {
  static constexpr int kHalfBytes = kTileKeys * 128;
  static constexpr int kBytes = 2 * kHalfBytes;
  __device__ static int Offset(int key, int piece) {
    return (piece / 8) * kHalfBytes + key * 128 +
           ((piece % 8) ^ (key % 8)) * 16;
  }
};

// Starts the copy of key tile `tile` (keys [64·tile, +64)) of stream b
// (rows into k_tile and, when v_tile is not null, v_tile, rows of kPitch
// halves), and writes their vis. The tile's indices must be in their stage
// and visible.
template <typename T>
__device__ void LoadKeyTile(const ChunkArgs& a, int b, int tile, T* k_rows_to,
                            T* v_rows_to, int* vis) {
  unsigned char* k_tile = reinterpret_cast<unsigned char*>(k_rows_to);
  unsigned char* v_tile = reinterpret_cast<unsigned char*>(v_rows_to);
  const KeyIndexTiles idx = SharedKeyIndices();
  const T* key_rows = static_cast<const T*>(a.in.key_rows);
  const T* value_rows = static_cast<const T*>(a.in.value_rows);
  const T* keys = static_cast<const T*>(a.in.keys);
  const T* values = static_cast<const T*>(a.in.values);
  constexpr int kPieces = kD * int(sizeof(T)) / 16;  // 16-byte pieces a row
  const int64_t k0 = int64_t{tile} * kKeys;
  const int stage = (tile % kIndexStages) * kKeys;
#pragma unroll 1
  for (int c = threadIdx.x; c < kKeys * kPieces; c += kThreads) {
    const int key = c / kPieces;
    const int piece = c % kPieces;
    const int64_t k = k0 + key;
    const T* ksrc = keys;
    const T* vsrc = values;
    int first_token = kNever;
    if (k < a.slots) {
      if (idx.positions[stage + key] >= 0) {
        const int64_t row = idx.rows[stage + key];
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
    const int at = key * kPitch * 2 + piece * 16;  // bytes
    CopyAsync16(k_tile + at, ksrc + offset, valid);
    if (v_tile != nullptr) CopyAsync16(v_tile + at, vsrc + offset, valid);
    if (piece == 0) vis[key] = first_token;
  }
}

// The stream row (from the block's first) that MMA row ρ of a 16-row warp
// tile holds: 2·(ρ mod 8) + ρ/8, so that a thread's two fragment rows (gid
// and gid + 8) are consecutive stream rows, two heads of one token when
// G ≥ 2: the group reduction then starts inside the thread.
__device__ __forceinline__ int TileRow(int row) {
  return (row / 16) * 16 + 2 * (row % 8) + (row % 16) / 8;
}

// Starts the copy of stream b's query rows [r0, r0 + 128) into q_tile, in
// TileRow order.
template <typename T>
__device__ void LoadQueryTile(const ChunkArgs& a, int b, int r0, T* q_tile) {
  const T* queries = static_cast<const T*>(a.in.queries);
  const int rows = a.chunk * a.group;
  constexpr int kPieces = kD * int(sizeof(T)) / 16;
  for (int c = threadIdx.x; c < kRows * kPieces; c += kThreads) {
    const int row = c / kPieces;
    const int piece = c % kPieces;
    const int r = r0 + TileRow(row);
    const bool valid = r < rows;
    const T* src = queries + (valid ? QueryRow(a, b, r) * kD : 0);
    const int offset = piece * (16 / int(sizeof(T)));
    CopyAsync16(q_tile + row * kPitch + offset, src + offset, valid);
  }
}

// The start of both attention passes: the query tile and the indices of
// the first tiles arrive (and are waited for), then tile 0's copy starts.
template <typename T>
__device__ __forceinline__ void StartKeyTiles(const ChunkArgs& a, int b, int r0,
                                              int tiles, T* q_tile, T* k_tile,
                                              T* v_tile, int* vis) {
  const StreamSlots mine = SlotsOf(a, b);
  for (int t = 0; t < kIndexAhead && t < tiles; ++t) {
    LoadKeyIndices(mine, a.slots, t);
  }
  LoadQueryTile<T>(a, b, r0, q_tile);
  CommitCopies();
  WaitCopies<0>();
  __syncthreads();
  LoadKeyTile<T>(a, b, 0, k_tile, v_tile, vis);
  CommitCopies();
}

// Each iteration's copies, before its wait: tile + 1's rows and
// tile + kIndexAhead's indices. The indices' stage was last read when
// tile − 1 was copied, before the previous iteration's barrier.
template <typename T>
__device__ __forceinline__ void LoadNextKeyTile(const ChunkArgs& a, int b,
                                                int tile, int tiles, T* k_tile,
                                                T* v_tile, int* vis) {
  if (tile + 1 < tiles) LoadKeyTile<T>(a, b, tile + 1, k_tile, v_tile, vis);
  if (tile + kIndexAhead < tiles) {
    LoadKeyIndices(SlotsOf(a, b), a.slots, tile + kIndexAhead);
  }
  CommitCopies();
}

// The A fragment of channels kk·16 … +15 of this warp's 16 query rows:
// rows (j%2)·8 + 0..7, channels kk·16 + (j/2)·8, j = lane/8.
template <typename T>
__device__ __forceinline__ void QueryFragment(const T* q_tile, int kk,
                                              uint32_t (&qf)[4]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int j = lane / 8;
  LdMatrix(
      qf, SharedAddress(q_tile + (warp * 16 + (j % 2) * 8 + lane % 8) * kPitch +
                        kk * 16 + (j / 2) * 8));
}

// All 8 A fragments of this warp's 16 query rows, kept in registers for
// every tile by the passes that have the room.
template <typename T>
__device__ __forceinline__ void QueryFragments(const T* q_tile,
                                               uint32_t (&qf)[kD / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) QueryFragment(q_tile, kk, qf[kk]);
}

// s += the products of query fragment kk with the key tile's channels
// kk·16 … +15 (16 rows × 64 keys).
template <typename T>
__device__ __forceinline__ void AddKeyProducts(const uint32_t (&qf)[4],
                                               const T* k_tile, int kk,
                                               float (&s)[8][4]) {
  const int lane = threadIdx.x % 32;
  const int j = lane / 8;
#pragma unroll
  for (int n2 = 0; n2 < 4; ++n2) {
    // B: keys n2·16 + (j/2)·8 + 0..7, channels kk·16 + (j%2)·8.
    const int key = n2 * 16 + (j / 2) * 8 + lane % 8;
    const int d = kk * 16 + (j % 2) * 8;
    uint32_t kb[4];
    LdMatrix(kb, SharedAddress(k_tile + key * kPitch + d));
    Elem<T>::Mma(s[2 * n2], qf, kb[0], kb[1]);
    Elem<T>::Mma(s[2 * n2 + 1], qf, kb[2], kb[3]);
  }
}

// S (16 rows of this warp × 64 keys) = Q·Kᵀ from the query and key tiles.
template <typename T>
__device__ __forceinline__ void QueryKeyTile(const T* q_tile, const T* k_tile,
                                             float (&s)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t qf[4];
    QueryFragment(q_tile, kk, qf);
    AddKeyProducts(qf, k_tile, kk, s);
  }
}

// The rows of this thread's two fragment rows (gid, gid + 8 of its warp)
// and the keys a block must visit: every slot, and the chunk up to its
// last token.
struct BlockRows {
  int rows;              // T·G
  int row_a, row_b;      // stream rows
  int token_a, token_b;  // their tokens, −2 past the end (they see nothing)
  int tiles;             // 64-key tiles to visit
};
__device__ __forceinline__ BlockRows RowsOf(const ChunkArgs& a, int r0) {
  BlockRows r;
  r.rows = a.chunk * a.group;
  const int lane = threadIdx.x % 32;
  r.row_a = r0 + TileRow((threadIdx.x / 32) * 16 + lane / 4);
  r.row_b = r0 + TileRow((threadIdx.x / 32) * 16 + lane / 4 + 8);
  r.token_a = r.row_a < r.rows ? r.row_a / a.group : -2;
  r.token_b = r.row_b < r.rows ? r.row_b / a.group : -2;
  const int last_token = (min(r0 + kRows, r.rows) - 1) / a.group;
  r.tiles = int((a.slots + last_token + 1 + kKeys - 1) / kKeys);
  return r;
}

// ---- the math of a tile, whichever instructions made its logits ----------
// s[n][e] (e 0, 1: fragment row gid; e 2, 3: gid + 8) is key column
// n·8 + tig·2 + e%2 of the tile: the accumulator layout of mma.sync
// m16n8k16 and, per warp, of wgmma m64nNk16 alike.

// The forward pass's running softmax of a thread's two fragment rows: the
// reference max (at most kRescaleSlack below the true one, SoftmaxTile) in
// log2 units and this lane's share of Σp.
constexpr float kRescaleSlack = 8.0f;  // log2 units (SoftmaxTile)
struct RunningSoftmax {
  float m_a = -INFINITY, m_b = -INFINITY;
  float l_a = 0.0f, l_b = 0.0f;
};

// One tile of the forward pass (kN·8 keys): masks the logits by the keys' vis
// (when kMasked; else every key is visible to both rows and tile_vis is not
// read), scales them to log2 units, moves the reference max when a logit
// passes it by more than kRescaleSlack (rescaling the output accumulators
// and the sums), and leaves p = 2^(x − reference) ≤ 2^8 in s.
template <bool kMasked, int kN>
__device__ __forceinline__ void SoftmaxTile(
    const ChunkArgs& a, const BlockRows& my, const int* tile_vis,
    float (&s)[kN][4], float (&o)[16][4], RunningSoftmax& r) {
  const int tig = threadIdx.x % 4;
  // Masked, s becomes x = s·scale (log2 units) or −∞ first; unmasked, the
  // maxima are taken of s and scaled after (scale > 0), and the exponent
  // below is one fma.
  float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if constexpr (kMasked) {
        const int first = tile_vis[n * 8 + tig * 2 + e];
        s[n][e] = my.token_a >= first ? s[n][e] * a.scale_log2 : -INFINITY;
        s[n][e + 2] =
            my.token_b >= first ? s[n][e + 2] * a.scale_log2 : -INFINITY;
      }
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
  if constexpr (!kMasked) {
    tile_max_a *= a.scale_log2;
    tile_max_b *= a.scale_log2;
  }
  // The running max is a reference, not the exact max: it moves (and o
  // and the sums are rescaled, 70 instructions) only when a row of the
  // warp meets a logit over it by more than kRescaleSlack, so p ≤ 2^8.
  // Out (o / Σp) and the LSE (max + log Σp) stay exact: both use one
  // reference.
  const bool moved =
      tile_max_a > r.m_a + kRescaleSlack || tile_max_b > r.m_b + kRescaleSlack;
  if (__any_sync(0xffffffffu, moved)) {
    const float new_m_a = fmaxf(r.m_a, tile_max_a);
    const float new_m_b = fmaxf(r.m_b, tile_max_b);
    // A row that has seen no key yet keeps p = 0 (never exp(−∞ + ∞)).
    const float alpha_a = Exp2(r.m_a - (new_m_a == -INFINITY ? 0.0f : new_m_a));
    const float alpha_b = Exp2(r.m_b - (new_m_b == -INFINITY ? 0.0f : new_m_b));
    r.m_a = new_m_a;
    r.m_b = new_m_b;
    r.l_a *= alpha_a;
    r.l_b *= alpha_b;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[n][0] *= alpha_a;
      o[n][1] *= alpha_a;
      o[n][2] *= alpha_b;
      o[n][3] *= alpha_b;
    }
  }
  const float base_a = r.m_a == -INFINITY ? 0.0f : r.m_a;
  const float base_b = r.m_b == -INFINITY ? 0.0f : r.m_b;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if constexpr (kMasked) {
        s[n][e] = Exp2(s[n][e] - base_a);
        s[n][e + 2] = Exp2(s[n][e + 2] - base_b);
      } else {
        s[n][e] = Exp2(fmaf(s[n][e], a.scale_log2, -base_a));
        s[n][e + 2] = Exp2(fmaf(s[n][e + 2], a.scale_log2, -base_b));
      }
    }
    r.l_a += s[n][0] + s[n][1];
    r.l_b += s[n][2] + s[n][3];
  }
}

// The A fragment of P for keys kk·16 … +15: the S accumulators of key
// columns 2kk and 2kk + 1, rounded to T.
template <typename T, int kN>
__device__ __forceinline__ void ProbabilityFragment(const float (&s)[kN][4],
                                                    int kk, uint32_t (&pa)[4]) {
  pa[0] = Elem<T>::Pack(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = Elem<T>::Pack(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = Elem<T>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = Elem<T>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// The forward pass's end: out = o / Σp and the natural-log LSE of this
// thread's two rows.
__device__ __forceinline__ void StoreForwardRows(const ChunkArgs& a, int b,
                                                 const BlockRows& my,
                                                 const float (&o)[16][4],
                                                 RunningSoftmax r) {
  const int tig = threadIdx.x % 4;
#pragma unroll
  for (int mask = 1; mask <= 2; mask <<= 1) {
    r.l_a += __shfl_xor_sync(0xffffffffu, r.l_a, mask);
    r.l_b += __shfl_xor_sync(0xffffffffu, r.l_b, mask);
  }
  const int rows[2] = {my.row_a, my.row_b};
  const float sums[2] = {r.l_a, r.l_b};
  const float maxes[2] = {r.m_a, r.m_b};
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // fragment rows gid, gid + 8
    if (rows[h] >= my.rows) continue;
    const float inv = sums[h] > 0.0f ? 1.0f / sums[h] : 0.0f;
    const int64_t g = QueryRow(a, b, rows[h]);
    float* out = a.out.out + g * kD;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      *reinterpret_cast<float2*>(out + n * 8 + tig * 2) =
          make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
    }
    if (tig == 0) {
      a.out.lse[g] =
          sums[h] > 0.0f ? (maxes[h] + log2f(sums[h])) * kLn2 : -INFINITY;
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

// What the score pass knows of a thread's two fragment rows: the LSE (log2
// units) and the token's factor (0 for a row past the end). With G ≥ 2
// both rows are heads of one token, and the group spans the lanes whose
// gid differs in its low log2(G/2) bits.
struct ScoreRows {
  float lse_a, lse_b;
  float f_a;       // the factor of both rows' token when G ≥ 2
  float w_a, w_b;  // f / G under MEAN, f under MAX
  bool mean;
};
template <int kGroup>
__device__ __forceinline__ ScoreRows ScoreRowsOf(const ChunkArgs& a, int b,
                                                 const BlockRows& my) {
  ScoreRows r;
  r.lse_a =
      my.token_a >= 0 ? a.out.lse[QueryRow(a, b, my.row_a)] * kLog2e : 0.0f;
  r.lse_b =
      my.token_b >= 0 ? a.out.lse[QueryRow(a, b, my.row_b)] * kLog2e : 0.0f;
  r.f_a =
      my.token_a >= 0 ? a.w.factor[int64_t{b} * a.chunk + my.token_a] : 0.0f;
  const float f_b =
      my.token_b >= 0 ? a.w.factor[int64_t{b} * a.chunk + my.token_b] : 0.0f;
  // MAX over a group of 4 or 8 spans lanes: it is reduced before the
  // exponential. MEAN (and G 1) sums p · f / G straight away.
  r.mean = a.reduction == ScoreReduction::kMean;
  const float inv_group = r.mean ? 1.0f / float(kGroup) : 1.0f;
  r.w_a = r.f_a * inv_group;
  r.w_b = f_b * inv_group;
  return r;
}

// One tile of the score pass: from the logits s of this warp's 16 rows,
// the warp's Σ f·r per key column, into warp_sums[64]. Keys masked by
// their vis when kMasked (else tile_vis is not read).
template <int kGroup, bool kMasked>
__device__ __forceinline__ void ReduceScoreTile(
    const ChunkArgs& a, const BlockRows& my, const ScoreRows& w,
    const int* tile_vis, const float (&s)[8][4], float* warp_sums) {
  const int lane = threadIdx.x % 32;
  const int gid = lane / 4;
  const int tig = lane % 4;
  constexpr bool kLaneMax = kGroup >= 4;
  // v[2n + e]: this thread's value for key column n·8 + tig·2 + e, from
  // its two fragment rows: x = log2 p (their max, G ≥ 2 under MAX) or
  // p · w summed.
  float v[16];
  const bool lane_max = !w.mean && kGroup > 1;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float xa, xb;
      if constexpr (kMasked) {
        const int first = tile_vis[n * 8 + tig * 2 + e];
        xa = my.token_a >= first ? s[n][e] * a.scale_log2 - w.lse_a : -INFINITY;
        xb = my.token_b >= first ? s[n][e + 2] * a.scale_log2 - w.lse_b
                                 : -INFINITY;
      } else {
        xa = fmaf(s[n][e], a.scale_log2, -w.lse_a);
        xb = fmaf(s[n][e + 2], a.scale_log2, -w.lse_b);
      }
      v[2 * n + e] =
          lane_max ? fmaxf(xa, xb) : w.w_a * Exp2(xa) + w.w_b * Exp2(xb);
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
    for (int i = 0; i < kLeft; ++i) v[i] = w.f_a * Exp2(v[i]);
    if constexpr (!kLaneMax) HalveAcrossLanes<16, false>(v, 4);
    if constexpr (kGroup != 8) HalveAcrossLanes<8, false>(v, 8);
  } else {
    HalveAcrossLanes<16, false>(v, 4);
    HalveAcrossLanes<8, false>(v, 8);
  }
  HalveAcrossLanes<4, false>(v, 16);
  const int n = 4 * (gid & 1) + 2 * ((gid >> 1) & 1) + (gid >> 2);
  *reinterpret_cast<float2*>(warp_sums + n * 8 + tig * 2) =
      make_float2(v[0], v[1]);
}

// After a barrier: the block's sum over its warps of each key of the tile,
// in a fixed order, into the block's partials.
__device__ __forceinline__ void StoreTilePartials(const float* stage_sums,
                                                  float* partial, int tile,
                                                  int64_t keys_total) {
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
}

// The two attention passes' kernels of one family, each launched with one
// `const ChunkArgs` argument, a (query blocks, B) grid of kThreads threads
// and its dynamic shared memory.
struct PassKernels {
  const void* forward;
  size_t forward_bytes;
  const void* scores;
  size_t scores_bytes;
};
// The warpgroup-MMA family (chunk_attention_sm90a.cu, built for sm_90a
// alone: they run on a device of compute capability 9.0 only).
PassKernels WarpGroupKernelsFor(bool bf16, int group);

}  // namespace kvmem::cuda::chunk_tiles

#endif  // KVMEM_KERNELS_CUDA_CHUNK_TILES_CUH_
