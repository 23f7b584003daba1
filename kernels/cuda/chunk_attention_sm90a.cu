// The two attention passes of a prefill chunk on Hopper's warpgroup MMA
// (wgmma), built for sm_90a alone (kernels/CMakeLists.txt): the same
// blocks, rows, staging and math as the mma.sync kernels of
// chunk_attention.cu (chunk_tiles.cuh holds what they share). What differs
// is where the tensor cores read their operands:
// - a block's 8 warps are two warpgroups of 64 query rows; one wgmma reads
//   a key or value tile from shared memory once for its 4 warps, where
//   mma.sync has every warp read its own fragments by ldmatrix (4× the
//   shared-memory reads, which bound those kernels);
// - K and V tiles sit in the 128-byte swizzled layout that the matrix
//   descriptors name (SwizzledTile), copied ahead (TileStream) so that a
//   tile's gathered rows have one or two tiles' time to arrive;
// - in the forward pass the two warpgroups run in opposite phases, one's
//   softmax beside the other's products (ChunkForwardWarpGroupKernel), and
//   the running max moves only when a logit passes it by more than 8 in
//   log2 units (SoftmaxTile);
// - the queries stay in registers as the A operand (ldmatrix'd once), and
//   P goes from the S accumulators to the A operand of P·V in registers;
// - the math warps issue less per tile (what bounds these kernels, by ncu;
//   bench/results/gpu-2026-12-07.md): a tile that every row of the block
//   sees skips the masks, and the copy's offsets are fixed (TileStream).
// The copies are cp.async, written through the generic proxy: each thread
// fences them to the async proxy (fence.proxy.async) before the barrier
// after which wgmma reads them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/chunk_attention.h"
#include "kernels/cuda/chunk_tiles.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "chunk_attention_sm90a.cu uses wgmma: build it for sm_90a only"
#endif

namespace kvmem::cuda::chunk_tiles {
namespace {

// ---- wgmma -----------------------------------------------------------------

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Keeps the compiler from moving reads or writes of accumulators across
// the asynchronous MMA that owns them until its wait, and from reusing an
// A fragment's registers (uint32_t) before the MMA that reads them has
// been waited for.
template <typename V, int kN>
__device__ __forceinline__ void Pin(V (&v)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (std::is_same_v<V, float>) {
        asm volatile("" : "+f"(v[n][e])::"memory");
      } else {
        asm volatile("" : "+r"(v[n][e])::"memory");
      }
    }
  }
}

// A matrix descriptor (PTX ISA, "Matrix Descriptor Format") for the
// 128-byte swizzle, the tile 1024-byte aligned (base offset 0).
__device__ __forceinline__ uint64_t Descriptor(uint32_t address,
                                               uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  return uint64_t((address & 0x3FFFF) >> 4) |
         uint64_t(leading_bytes >> 4) << 16 |
         uint64_t(stride_bytes >> 4) << 32 | uint64_t{1} << 62;
}
// Channels kk·16 … +15 of a key tile as B of S = Q·Kᵀ, K-major: 32 bytes
// into a 128-byte row of half kk/4; 8-key groups 1024 bytes apart (the
// leading offset is unused by swizzled K-major layouts).
template <int kTileKeys>
__device__ __forceinline__ uint64_t KeyDescriptor(uint32_t tile, int kk) {
  return Descriptor(
      tile + (kk / 4) * SwizzledTile<kTileKeys>::kHalfBytes + (kk % 4) * 32, 16,
      1024);
}
// Keys kk·16 … +15 of a value tile as B of O += P·V, N-major (channels
// contiguous): 8-key groups 1024 bytes apart, the second 64 channels a
// half further.
template <int kTileKeys>
__device__ __forceinline__ uint64_t ValueDescriptor(uint32_t tile, int kk) {
  return Descriptor(tile + kk * 16 * 128, SwizzledTile<kTileKeys>::kHalfBytes,
                    1024);
}

#define KVMEM_S_ACCUMULATORS                                                 \
  "+f"(s[0][0]), "+f"(s[0][1]), "+f"(s[0][2]), "+f"(s[0][3]), "+f"(s[1][0]), \
      "+f"(s[1][1]), "+f"(s[1][2]), "+f"(s[1][3]), "+f"(s[2][0]),            \
      "+f"(s[2][1]), "+f"(s[2][2]), "+f"(s[2][3]), "+f"(s[3][0]),            \
      "+f"(s[3][1]), "+f"(s[3][2]), "+f"(s[3][3]), "+f"(s[4][0]),            \
      "+f"(s[4][1]), "+f"(s[4][2]), "+f"(s[4][3]), "+f"(s[5][0]),            \
      "+f"(s[5][1]), "+f"(s[5][2]), "+f"(s[5][3]), "+f"(s[6][0]),            \
      "+f"(s[6][1]), "+f"(s[6][2]), "+f"(s[6][3]), "+f"(s[7][0]),            \
      "+f"(s[7][1]), "+f"(s[7][2]), "+f"(s[7][3])

#define KVMEM_O_ACCUMULATORS                                                 \
  "+f"(o[0][0]), "+f"(o[0][1]), "+f"(o[0][2]), "+f"(o[0][3]), "+f"(o[1][0]), \
      "+f"(o[1][1]), "+f"(o[1][2]), "+f"(o[1][3]), "+f"(o[2][0]),            \
      "+f"(o[2][1]), "+f"(o[2][2]), "+f"(o[2][3]), "+f"(o[3][0]),            \
      "+f"(o[3][1]), "+f"(o[3][2]), "+f"(o[3][3]), "+f"(o[4][0]),            \
      "+f"(o[4][1]), "+f"(o[4][2]), "+f"(o[4][3]), "+f"(o[5][0]),            \
      "+f"(o[5][1]), "+f"(o[5][2]), "+f"(o[5][3]), "+f"(o[6][0]),            \
      "+f"(o[6][1]), "+f"(o[6][2]), "+f"(o[6][3]), "+f"(o[7][0]),            \
      "+f"(o[7][1]), "+f"(o[7][2]), "+f"(o[7][3]), "+f"(o[8][0]),            \
      "+f"(o[8][1]), "+f"(o[8][2]), "+f"(o[8][3]), "+f"(o[9][0]),            \
      "+f"(o[9][1]), "+f"(o[9][2]), "+f"(o[9][3]), "+f"(o[10][0]),           \
      "+f"(o[10][1]), "+f"(o[10][2]), "+f"(o[10][3]), "+f"(o[11][0]),        \
      "+f"(o[11][1]), "+f"(o[11][2]), "+f"(o[11][3]), "+f"(o[12][0]),        \
      "+f"(o[12][1]), "+f"(o[12][2]), "+f"(o[12][3]), "+f"(o[13][0]),        \
      "+f"(o[13][1]), "+f"(o[13][2]), "+f"(o[13][3]), "+f"(o[14][0]),        \
      "+f"(o[14][1]), "+f"(o[14][2]), "+f"(o[14][3]), "+f"(o[15][0]),        \
      "+f"(o[15][1]), "+f"(o[15][2]), "+f"(o[15][3])

// The accumulators' operand numbers in the asm strings below.
#define KVMEM_REGS_0_31                                                    \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, " \
  "%30, %31"
#define KVMEM_REGS_32_63                                                   \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, " \
  "%60, %61, %62, %63"

template <typename T>
struct WarpGroupMma;

// S (the warpgroup's 64 rows × 64 keys; KeysWide: × 128 keys) = A·B, plus
// S when accumulate: A the warp's query fragment of 16 channels in
// registers, B a key tile's 16 channels. O (64 rows × 128 channels) += A·B:
// A the warp's P fragment of 16 keys, B a value tile's 16 keys
// (transposed: N-major).
#define KVMEM_WARP_GROUP_MMA(CPP_TYPE, PTX_TYPE)                               \
  template <>                                                                  \
  struct WarpGroupMma<CPP_TYPE> {                                              \
    __device__ static void Keys(float (&s)[8][4], const uint32_t (&a)[4],      \
                                uint64_t b, int accumulate) {                  \
      asm volatile(                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                         \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE  \
          " "                                                                  \
          "{" KVMEM_REGS_0_31                                                  \
          "}, "                                                                \
          "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                        \
          : KVMEM_S_ACCUMULATORS                                               \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),                \
            "r"(accumulate));                                                  \
    }                                                                          \
    __device__ static void Values(float (&o)[16][4], const uint32_t (&a)[4],   \
                                  uint64_t b) {                                \
      Wide<1>(o, a, b, 1);                                                     \
    }                                                                          \
    __device__ static void KeysWide(float (&o)[16][4], const uint32_t (&a)[4], \
                                    uint64_t b, int accumulate) {              \
      Wide<0>(o, a, b, accumulate);                                            \
    }                                                                          \
    /* m64n128k16: B N-major (values) when kTransposeB, else K-major. */       \
    template <int kTransposeB>                                                 \
    __device__ static void Wide(float (&o)[16][4], const uint32_t (&a)[4],     \
                                uint64_t b, int accumulate) {                  \
      asm volatile(                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                         \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE \
          " "                                                                  \
          "{" KVMEM_REGS_0_31 ", " KVMEM_REGS_32_63                            \
          "}, "                                                                \
          "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                      \
          : KVMEM_O_ACCUMULATORS                                               \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),                \
            "r"(accumulate), "n"(kTransposeB));                                \
    }                                                                          \
  };
KVMEM_WARP_GROUP_MMA(__nv_bfloat16, "bf16")
KVMEM_WARP_GROUP_MMA(__half, "f16")
#undef KVMEM_WARP_GROUP_MMA
#undef KVMEM_S_ACCUMULATORS
#undef KVMEM_O_ACCUMULATORS
#undef KVMEM_REGS_0_31
#undef KVMEM_REGS_32_63

// S = the warpgroup's queries (qf: this warp's 16 rows) · the key tile.
template <typename T>
__device__ __forceinline__ void KeyProducts(const uint32_t (&qf)[kD / 16][4],
                                            uint32_t k_tile, float (&s)[8][4]) {
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    WarpGroupMma<T>::Keys(s, qf[kk], KeyDescriptor<kKeys>(k_tile, kk), kk > 0);
  }
  WgmmaCommit();
  WgmmaWait();
  Pin(s);
}

// ---- staging ---------------------------------------------------------------

// The first 1024-byte boundary of shared memory at or after `after`.
__device__ __forceinline__ unsigned char* AlignedTiles(void* after) {
  const uint32_t address = SharedAddress(after);
  const uint32_t aligned = (address + 1023u) & ~1023u;
  return static_cast<unsigned char*>(after) + (aligned - address);
}

// The index tiles (kKeys each, chunk_tiles.cuh) of a kTileKeys-key tile.
template <int kTileKeys>
__device__ __forceinline__ void LoadTileIndices(const StreamSlots& mine,
                                                int64_t slots, int tile) {
  constexpr int kParts = kTileKeys / kKeys;
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    LoadKeyIndices(mine, slots, tile * kParts + p);
  }
}

// A kTileKeys-key tile's copy in the swizzled layout: a thread copies one
// fixed 16-byte piece of keys 16 apart, so its shared-memory offsets are
// constants; keys are counted in 32 bits (slots + chunk < 2^31,
// CheckShape; 2^31 is a multiple of the tile, so no key of a tile
// overflows). Returns whether every key whose vis this thread wrote is
// visible to token `visible_to` (true when it wrote none).
template <typename T, int kTileKeys>
__device__ __forceinline__ bool LoadSwizzledTile(const ChunkArgs& a, int b,
                                                 int tile,
                                                 unsigned char* k_tile,
                                                 unsigned char* v_tile,
                                                 int* vis, int visible_to) {
  constexpr int kPieces = kD * int(sizeof(T)) / 16;  // 16
  constexpr int kKeyStep = kThreads / kPieces;       // 16
  static_assert(kThreads % kPieces == 0 && kTileKeys % kKeyStep == 0 &&
                kKeys % kKeyStep == 0);
  const KeyIndexTiles idx = SharedKeyIndices();
  const int piece = threadIdx.x % kPieces;
  const int first_key = threadIdx.x / kPieces;
  // Keys 16 apart share (key mod 8), so the swizzle is the same for all.
  const int offset = SwizzledTile<kTileKeys>::Offset(first_key, piece);
  const int slots = int(a.slots);
  const int k0 = tile * kTileKeys;
  constexpr int kParts = kTileKeys / kKeys;  // index tiles in this tile
  bool visible = true;
#pragma unroll
  for (int i = 0; i < kTileKeys / kKeyStep; ++i) {
    const int key = first_key + i * kKeyStep;
    const int k = k0 + key;
    // Its index: first_key < kKeyStep, so the part is known for each i.
    const int at =
        ((tile * kParts + i * kKeyStep / kKeys) % kIndexStages) * kKeys +
        first_key + i * kKeyStep % kKeys;
    const T* k_rows;
    const T* v_rows;
    int64_t row;
    int first;
    if (k < slots) {
      first = idx.positions[at] >= 0 ? -1 : kNever;
      row = idx.rows[at];
      k_rows = static_cast<const T*>(a.in.key_rows);
      v_rows = static_cast<const T*>(a.in.value_rows);
    } else {
      const int j = k - slots;
      first = j < a.chunk ? j : kNever;
      row = int64_t{j} * a.streams + b;
      k_rows = static_cast<const T*>(a.in.keys);
      v_rows = static_cast<const T*>(a.in.values);
    }
    const bool valid = first != kNever;
    const int64_t from = valid ? row * kD + piece * (16 / int(sizeof(T))) : 0;
    const int to = offset + i * kKeyStep * 128;
    CopyAsync16(k_tile + to, k_rows + from, valid);
    if (v_tile != nullptr) CopyAsync16(v_tile + to, v_rows + from, valid);
    if (piece == 0) {
      vis[key] = first;
      visible = visible && first <= visible_to;
    }
  }
  return visible;
}

// The tiles' copies (LoadSwizzledTile), kLead tiles ahead into kStages
// stages of kTileKeys keys, and, for each tile, whether every key is
// visible to every row of the block (a full block and no empty slot: the
// usual tile), so that the math can skip the masks.
template <typename T, int kTileKeys, int kStages, int kLead>
struct TileStream {
  static_assert(kStages > kLead, "a stage for the tile in use");
  static_assert(kIndexStages * kKeys >= (2 * kLead + 1) * kTileKeys,
                "index stages too few");
  static constexpr int kBytes = SwizzledTile<kTileKeys>::kBytes;
  const ChunkArgs& a;
  int b;
  int tiles;
  unsigned char* k_tiles;
  unsigned char* v_tiles;  // null in the score pass
  int* vis;                // [kStages][kTileKeys]
  int visible_to;          // the block's first token; −3 (never) if not full
  unsigned visible = 0;    // this thread's answer for tile i, bit i % kStages

  __device__ void Load(int tile) {
    const int stage = tile % kStages;
    const bool mine = LoadSwizzledTile<T, kTileKeys>(
        a, b, tile, k_tiles + stage * kBytes,
        v_tiles != nullptr ? v_tiles + stage * kBytes : nullptr,
        vis + stage * kTileKeys, visible_to);
    visible = (visible & ~(1u << stage)) | (unsigned(mine) << stage);
  }

  // The start of both passes: the queries and the first tiles' indices
  // arrive, the queries go to registers (qf), and tiles 0 … kLead − 1
  // start, each in a group with the indices of the tile kLead after it.
  // kQueryInStages: the query tile lies in the stages, so it is read before
  // the first tile is copied (forward); else after (score pass: fewer
  // registers live while the copies are issued).
  template <bool kQueryInStages>
  __device__ void Start(int r0, T* q_tile, uint32_t (&qf)[kD / 16][4]) {
    const StreamSlots mine = SlotsOf(a, b);
    for (int t = 0; t < kLead && t < tiles; ++t) {
      LoadTileIndices<kTileKeys>(mine, a.slots, t);
    }
    LoadQueryTile<T>(a, b, r0, q_tile);
    CommitCopies();
    WaitCopies<0>();
    __syncthreads();
    if constexpr (kQueryInStages) {
      QueryFragments(q_tile, qf);
      __syncthreads();
    }
    for (int t = 0; t < kLead; ++t) {
      if (t < tiles) Load(t);
      if (t + kLead < tiles) {
        LoadTileIndices<kTileKeys>(mine, a.slots, t + kLead);
      }
      CommitCopies();
    }
    if constexpr (!kQueryInStages) QueryFragments(q_tile, qf);
  }

  // Each iteration's start: tile `tile` has arrived and is visible to every
  // thread and to the tensor cores; every thread is done with tile
  // tile + kLead − kStages, whose stage then takes tile + kLead (with the
  // indices kLead tiles after that). Returns whether tile `tile` needs no
  // masks.
  __device__ bool Next(int tile) {
    WaitCopies<kLead - 1>();
    FenceProxyAsync();
    const bool unmasked =
        __syncthreads_and(int((visible >> (tile % kStages)) & 1u)) != 0;
    const int next = tile + kLead;
    if (next < tiles) Load(next);
    if (next + kLead < tiles) {
      LoadTileIndices<kTileKeys>(SlotsOf(a, b), a.slots, next + kLead);
    }
    CommitCopies();
    return unmasked;
  }
};

// The first token every row of the block sees keys up to, or −3 (nothing
// is visible to all) when the block has rows past the end: those must stay
// masked, their factor 0 times an unbounded p.
__device__ __forceinline__ int VisibleToAll(const ChunkArgs& a, int r0) {
  return r0 + kRows <= a.chunk * a.group ? r0 / a.group : -3;
}

// The forward pass takes 128-key tiles: half the per-tile work a key
// (barrier, row maxima, vote, waits) and S as m64n128 products. A tile is
// copied one ahead into three stages (tiles i − 1, i and i + 1: 192 KiB),
// the query tile read from them before the first tile lands. The score
// pass keeps 64-key tiles, two blocks an SM (with 128-key tiles its
// registers would not fit two), copied two ahead into three stages.
constexpr int kForwardKeys = 128;
constexpr int kForwardStages = 3;
constexpr int kForwardLead = 1;
constexpr int kScoreStages = 3;
constexpr int kScoreLead = 2;

// Dynamic shared memory: the key indices, (the score pass's query tile),
// vis, (the score pass's sums), then the 1024-byte aligned K (and V)
// stages.
constexpr size_t kForwardVisAt = kIndexSharedBytes;
constexpr size_t kForwardBytes =
    kForwardVisAt + size_t(kForwardStages) * kForwardKeys * sizeof(int) + 1024 +
    2 * kForwardStages * size_t(SwizzledTile<kForwardKeys>::kBytes);
static_assert(kForwardBytes <= 227 * 1024, "the forward's block fits an SM");
static_assert(size_t(kQueryHalves) * 2 <=
                  kForwardStages * size_t(SwizzledTile<kForwardKeys>::kBytes),
              "the query tile fits in the K stages");
constexpr size_t kSumsBytes = 2 * kWarps * kKeys * sizeof(float);
constexpr size_t kScoresBytes =
    kIndexSharedBytes + size_t(kQueryHalves) * 2 +
    size_t(kScoreStages) * kKeys * sizeof(int) + kSumsBytes + 1024 +
    kScoreStages * size_t(SwizzledTile<kKeys>::kBytes);
static_assert(2 * kScoresBytes <= 227 * 1024, "two score blocks an SM");

// ---- launch 2: forward -----------------------------------------------------

// Which products a step of the forward issues (P·V, S).
template <bool kValuesIn, bool kLogitsIn>
struct Products {
  static constexpr bool kValues = kValuesIn;
  static constexpr bool kLogits = kLogitsIn;
};

// The two warpgroups run in opposite phases, so that one's softmax (FMA
// and SFU pipes) runs while the other's products hold the tensor cores
// (FlashAttention-3's "ping-pong"; here the tile barrier keeps the phases
// apart). In iteration i, warpgroup 0 issues P·V of tile i − 1 and S of
// tile i, then takes tile i's softmax; warpgroup 1 takes tile i − 1's
// softmax first, then issues the same two products. In lockstep (both
// softmaxes at once, then both products) the tensor cores idled for the
// softmax and the SFU for the products. Both warpgroups use tiles i − 1
// and i in iteration i, and tile i + 1 arrives meanwhile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    ChunkForwardWarpGroupKernel(const ChunkArgs a) {
  constexpr int kStages = kForwardStages;
  constexpr int kTileBytes = SwizzledTile<kForwardKeys>::kBytes;
  constexpr int kN = kForwardKeys / 8;  // S accumulator columns of 8
  int* vis = reinterpret_cast<int*>(shared_bytes + kForwardVisAt);
  unsigned char* k_tiles = AlignedTiles(vis + kStages * kForwardKeys);
  unsigned char* v_tiles = k_tiles + kStages * kTileBytes;
  const uint32_t k_base = SharedAddress(k_tiles);
  const uint32_t v_base = SharedAddress(v_tiles);

  const int b = blockIdx.y;
  const int r0 = blockIdx.x * kRows;
  const BlockRows my = RowsOf(a, r0);
  const int tile_count = (my.tiles + 1) / 2;  // of 128 keys (RowsOf: 64)
  TileStream<T, kForwardKeys, kStages, kForwardLead> tiles{
      a, b, tile_count, k_tiles, v_tiles, vis, VisibleToAll(a, r0)};
  uint32_t qf[kD / 16][4];
  tiles.template Start<true>(r0, reinterpret_cast<T*>(k_tiles), qf);

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float s[kN][4] = {};
  uint32_t pa[kForwardKeys / 16][4];  // P of the tile whose softmax was taken
  RunningSoftmax r;
  const bool softmax_first = threadIdx.x >= kThreads / 2;  // warpgroup 1

  // The softmax of `tile`'s logits in s, leaving its P fragments in pa. No
  // product is in flight: o may be rescaled.
  auto softmax = [&](int tile, bool unmasked) {
    if (unmasked) {
      SoftmaxTile<false>(a, my, nullptr, s, o, r);
    } else {
      SoftmaxTile<true>(a, my, vis + (tile % kStages) * kForwardKeys, s, o, r);
    }
#pragma unroll
    for (int kk = 0; kk < kForwardKeys / 16; ++kk) {
      ProbabilityFragment<T>(s, kk, pa[kk]);
    }
  };
  // O += P·V of tile `values` (pa), then S of tile `keys`, each if its
  // part is in `Which` (at compile time: ptxas serialises every wgmma of a
  // kernel that has one under a branch).
  auto products = [&](auto which, int values, int keys) {
    using Which = decltype(which);
    Pin(o);
    WgmmaFence();
    if constexpr (Which::kValues) {
      const uint32_t v_tile = v_base + (values % kStages) * kTileBytes;
#pragma unroll
      for (int kk = 0; kk < kForwardKeys / 16; ++kk) {
        WarpGroupMma<T>::Values(o, pa[kk],
                                ValueDescriptor<kForwardKeys>(v_tile, kk));
      }
    }
    if constexpr (Which::kLogits) {
      const uint32_t k_tile = k_base + (keys % kStages) * kTileBytes;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        WarpGroupMma<T>::KeysWide(
            s, qf[kk], KeyDescriptor<kForwardKeys>(k_tile, kk), kk > 0);
      }
    }
    WgmmaCommit();
    WgmmaWait();
    Pin(o);
    Pin(s);
    Pin(pa);
  };

  // Every block has a tile: its rows see at least their own token.
  bool last_unmasked = tiles.Next(0);  // of tile − 1 in the loop
  products(Products<false, true>(), -1, 0);
  if (!softmax_first) softmax(0, last_unmasked);
  for (int tile = 1; tile < tile_count; ++tile) {
    const bool unmasked = tiles.Next(tile);
    if (softmax_first) softmax(tile - 1, last_unmasked);
    products(Products<true, true>(), tile - 1, tile);
    if (!softmax_first) softmax(tile, unmasked);
    last_unmasked = unmasked;
  }
  if (softmax_first) softmax(tile_count - 1, last_unmasked);
  products(Products<true, false>(), tile_count - 1, -1);
  StoreForwardRows(a, b, my, o, r);
}

// ---- launch 3: per query block, Σ f·r per key ------------------------------

// The warpgroups in lockstep: in ping-pong (as the forward) this pass
// measured 2–4 % slower (bench/results/gpu-2026-12-07.md, ninth session);
// its two blocks an SM already overlap one's reductions with the other's
// products.
template <typename T, int kGroup>
__global__ void __launch_bounds__(kThreads, 2)
    ChunkScoresWarpGroupKernel(const ChunkArgs a) {
  constexpr int kStages = kScoreStages;
  T* q_tile = reinterpret_cast<T*>(shared_bytes + kIndexSharedBytes);
  int* vis = reinterpret_cast<int*>(q_tile + kQueryHalves);  // [kStages][64]
  // [2][warps][64]: two stages, so that one barrier a tile suffices.
  float* sums = reinterpret_cast<float*>(vis + kStages * kKeys);
  unsigned char* k_tiles = AlignedTiles(sums + 2 * kWarps * kKeys);
  const uint32_t k_base = SharedAddress(k_tiles);

  const int b = blockIdx.y;
  const int qb = blockIdx.x;
  const int r0 = qb * kRows;
  const BlockRows my = RowsOf(a, r0);
  const int warp = threadIdx.x / 32;
  const int64_t keys_total = a.slots + a.chunk;
  float* partial = BlockPartials(a, qb, b, keys_total);

  TileStream<T, kKeys, kStages, kScoreLead> tiles{
      a, b, my.tiles, k_tiles, nullptr, vis, VisibleToAll(a, r0)};
  uint32_t qf[kD / 16][4];
  tiles.template Start<false>(r0, q_tile, qf);
  const ScoreRows w = ScoreRowsOf<kGroup>(a, b, my);
  float s[8][4] = {};

  for (int tile = 0; tile < my.tiles; ++tile) {
    const int stage = tile % kStages;
    float* stage_sums = sums + (tile & 1) * kWarps * kKeys;
    const bool unmasked = tiles.Next(tile);
    KeyProducts<T>(qf, k_base + stage * SwizzledTile<kKeys>::kBytes, s);
    if (unmasked) {
      ReduceScoreTile<kGroup, false>(a, my, w, nullptr, s,
                                     stage_sums + warp * kKeys);
    } else {
      ReduceScoreTile<kGroup, true>(a, my, w, vis + stage * kKeys, s,
                                    stage_sums + warp * kKeys);
    }
    __syncthreads();
    StoreTilePartials(stage_sums, partial, tile, keys_total);
    // No barrier here: the sums of this stage are rewritten only after the
    // next iteration's barrier, which every thread reaches after it is done
    // with them.
  }
}

template <typename T>
PassKernels KernelsOf(int group) {
  PassKernels k;
  k.forward = reinterpret_cast<const void*>(&ChunkForwardWarpGroupKernel<T>);
  k.scores = reinterpret_cast<const void*>(
      group == 1   ? &ChunkScoresWarpGroupKernel<T, 1>
      : group == 2 ? &ChunkScoresWarpGroupKernel<T, 2>
      : group == 4 ? &ChunkScoresWarpGroupKernel<T, 4>
                   : &ChunkScoresWarpGroupKernel<T, 8>);
  k.forward_bytes = kForwardBytes;
  k.scores_bytes = kScoresBytes;
  return k;
}

}  // namespace

PassKernels WarpGroupKernelsFor(bool bf16, int group) {
  return bf16 ? KernelsOf<__nv_bfloat16>(group) : KernelsOf<__half>(group);
}

}  // namespace kvmem::cuda::chunk_tiles
