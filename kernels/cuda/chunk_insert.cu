// InsertChunks: a chunk of T ≤ W tokens inserted into the cascades of each
// stream with no sequential loop over tokens. Why that is possible:
// - occupancy (stored/head, and so which rule a token meets in each
//   cascade) never depends on scores (cascade.md §2); only the winner of a
//   rule-d duel does, and a duel ends its token's walk;
// - cascade i sees its items (the tokens whose walk reaches it) in token
//   order and at most T ≤ W of them, so its rule-b overwrites meet only
//   contents it held before the chunk, its oldest ones in ring order (a
//   content written in the chunk would need W more pushes behind it to
//   become the oldest). Hence the token carried into cascade i+1 by its
//   q-th rule-b item is the old content of ring slot head+q of cascade i,
//   and the item list of cascade i+1 is just the tokens of those items;
// - the duels of a cascade form runs after each push (or after the chunk's
//   start, against the old newest): the newest after a run is the
//   argmax of the scores, ties going to the later (CarryWinsDuel), which is
//   associative and so a scan.
// Launch 1 (one block per stream) walks the cascades in order; in each, one
// block-wide scan over the items gives every item's push count (its slot)
// and the newest it duels, and every content's fate is written to scratch:
// the slot it ends in or "evicted by token j". Launch 2 (32 chunk tokens
// a block, many blocks per stream) follows the chain of contents each
// chunk token starts (token → its slot → that slot's old content's new
// slot → … → an empty slot or an evicted row): chains are disjoint, so
// whoever moves a chain reads its old rows and metadata before writing
// them, with no barrier across blocks and no staging copy.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/chunk_insert.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/row_access.cuh"
#include "kernels/policy_math.h"

namespace kvmem::cuda {
namespace {

constexpr int kPlanThreads = 1024;  // items of a cascade per scan round
constexpr int kPlanWarps = kPlanThreads / 32;
constexpr int kMoveThreads = 256;
constexpr int kChainsPerBlock = 32;
constexpr int kMaxMoveBlocksPerStream = 65535;  // gridDim.y
constexpr int kRegisterChain = 8;  // chains of up to this many slots move in
                                   // registers
// A chain holds at most one slot per cascade (contents only move to later
// cascades), or one sink.
constexpr int kMaxChainSlots = kMaxUpdateCascades;
constexpr unsigned kFullMask = 0xffffffffu;

// Fates (next_of_slot, slot_of_token): ≥ 0 a slot of the stream;
// kChainEnd: the slot was empty before the chunk, so no old content moves
// on; kEvictedByFirst − j: evicted by chunk token j's insertion.
constexpr int32_t kChainEnd = -1;
constexpr int32_t kEvictedByFirst = -2;
// LevelScan::item of an absent element (the scan's identity).
constexpr int kNoItem = -2147483647 - 1;

// Per-stream scratch, batch-major (offsets from ChunkScratchLayout).
struct ChunkScratch {
  int64_t* first_positions;  // [B] tokens_seen before the chunk
  int32_t* next_of_slot;     // [B, slots] fate of the slot's old content
  int32_t* slot_of_token;    // [B, T] the slot chunk token j ends in
  int32_t* evict_rank;       // [B, T] 1 if token j evicts, then its rank
  int32_t* items;            // [B, 2, T] tokens reaching a cascade, in order
};

struct ChunkScratchLayout {
  size_t first_positions = 0, next_of_slot = 0, slot_of_token = 0,
         evict_rank = 0, items = 0, total = 0;
};

ChunkScratchLayout LayOutScratch(int64_t streams, int64_t slots,
                                 int64_t tokens) {
  auto round_up = [](size_t bytes) { return (bytes + 255) & ~size_t{255}; };
  ChunkScratchLayout l;
  size_t at = 0;
  l.first_positions = at;
  at = round_up(at + size_t(streams) * 8);
  l.next_of_slot = at;
  at = round_up(at + size_t(streams) * size_t(slots) * 4);
  l.slot_of_token = at;
  at = round_up(at + size_t(streams) * size_t(tokens) * 4);
  l.evict_rank = at;
  at = round_up(at + size_t(streams) * size_t(tokens) * 4);
  l.items = at;
  at = round_up(at + size_t(streams) * size_t(tokens) * 8);
  l.total = at;
  return l;
}

struct ChunkArgs {
  int sinks;
  int cascades;
  int window;
  bool eager_fill;
  int chunk_tokens;
  int64_t slots;
  int64_t row_bytes;
  int64_t element_bytes;
  CascadeDeviceState state;
  ChunkInsertInputs in;
  ChunkInsertOutputs out;
  ChunkScratch scratch;
};

// Stream b's state, from the batch arrays or its pointers.
__device__ __forceinline__ CascadeStreamPointers StreamState(const ChunkArgs& a,
                                                             int64_t b) {
  if (a.state.streams != nullptr) return a.state.streams[b];
  CascadeStreamPointers my;
  my.positions = a.state.positions + b * a.slots;
  my.scores = a.state.scores + b * a.slots;
  my.stored = a.state.stored + b * a.cascades;
  my.head = a.state.head + b * a.cascades;
  my.tokens_seen = a.state.tokens_seen + b;
  my.slot_rows = a.state.slot_rows + b * a.slots;
  return my;
}

// The chunk's first tokens that go to sinks (positions below S).
__device__ __forceinline__ int SinkTokens(int64_t first_position, int sinks,
                                          int chunk_tokens) {
  const int64_t count = int64_t{sinks} - first_position;
  return count <= 0 ? 0 : int(count < chunk_tokens ? count : chunk_tokens);
}

// One cascade's scan over its items in order: how many pushed (rules a, b,
// c) and the content now newest (the item index, −1 for the cascade's old
// newest) with its u. Pushes reset the newest; otherwise the later element
// takes it iff CarryWinsDuel, as a run of rule-d duels does.
struct LevelScan {
  int pushes;
  int item;
  float u;
};

__device__ __forceinline__ LevelScan NoElement() {
  return LevelScan{0, kNoItem, 0.0f};
}

// a before b.
__device__ __forceinline__ LevelScan Combine(const LevelScan& a,
                                             const LevelScan& b) {
  if (b.item == kNoItem) return a;
  if (a.item == kNoItem) return b;
  const bool later = b.pushes > 0 || CarryWinsDuel(b.u, a.u);
  return LevelScan{a.pushes + b.pushes, later ? b.item : a.item,
                   later ? b.u : a.u};
}

__device__ __forceinline__ LevelScan ShuffleUp(const LevelScan& v, int delta) {
  return LevelScan{__shfl_up_sync(kFullMask, v.pushes, delta),
                   __shfl_up_sync(kFullMask, v.item, delta),
                   __shfl_up_sync(kFullMask, v.u, delta)};
}

// Called by every thread of the block with its element of this round.
// Returns carry ⊕ the round's elements of lower threads, and advances
// `carry` (the same in every thread) past the whole round.
__device__ LevelScan ExclusiveScan(const LevelScan& mine, LevelScan& carry,
                                   LevelScan* warp_totals) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  LevelScan inclusive = mine;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const LevelScan up = ShuffleUp(inclusive, d);
    if (lane >= d) inclusive = Combine(up, inclusive);
  }
  LevelScan before = ShuffleUp(inclusive, 1);
  if (lane == 0) before = NoElement();
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    LevelScan total = lane < kPlanWarps ? warp_totals[lane] : NoElement();
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const LevelScan up = ShuffleUp(total, d);
      if (lane >= d) total = Combine(up, total);
    }
    if (lane < kPlanWarps) warp_totals[lane] = total;
  }
  __syncthreads();
  LevelScan prefix = carry;
  if (warp > 0) prefix = Combine(prefix, warp_totals[warp - 1]);
  const LevelScan result = Combine(prefix, before);
  carry = Combine(carry, warp_totals[kPlanWarps - 1]);
  __syncthreads();  // warp_totals is rewritten by the next round
  return result;
}

// A cascade's changed ring slots [lo, hi), at most four ranges.
struct RingRange {
  int lo;
  int hi;
};

// The ring slots cascade (stored0, head0) changed with `pushes` pushes:
// rule a/c appends, rule-b overwrites from the head (wrapping), and the
// old newest when a duel before the first push replaced it. Disjoint
// (T ≤ W), sorted ascending. Returns how many ranges.
__device__ int ChangedRanges(int stored0, int head0, int pushes,
                             bool newest_replaced, int window,
                             RingRange (&ranges)[4]) {
  int count = 0;
  const int fill = stored0 + pushes;
  const int overwrites = fill > window ? fill - window : 0;
  auto add = [&](int lo, int hi) {
    if (lo < hi) ranges[count++] = RingRange{lo, hi};
  };
  add(stored0, fill < window ? fill : window);
  add(head0, head0 + overwrites < window ? head0 + overwrites : window);
  add(0, head0 + overwrites - window);
  if (newest_replaced) {
    const int newest = (head0 + stored0 - 1) % stored0;
    add(newest, newest + 1);
  }
  for (int i = 1; i < count; ++i) {  // insertion sort by lo
    for (int k = i; k > 0 && ranges[k - 1].lo > ranges[k].lo; --k) {
      const RingRange r = ranges[k];
      ranges[k] = ranges[k - 1];
      ranges[k - 1] = r;
    }
  }
  return count;
}

// Launch 1: the fates of every content of stream blockIdx.x, its new
// stored/head/tokens_seen, the evicted counts and ranks, the changed slots.
__global__ void __launch_bounds__(kPlanThreads)
    PlanChunkKernel(const ChunkArgs a) {
  __shared__ LevelScan warp_totals[kPlanWarps];
  __shared__ int32_t old_stored[kMaxUpdateCascades];
  __shared__ int32_t old_head[kMaxUpdateCascades];
  __shared__ int32_t level_pushes[kMaxUpdateCascades];
  __shared__ bool newest_replaced[kMaxUpdateCascades];
  __shared__ int level_items;  // items reaching the cascade being walked

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int sinks = a.sinks;
  const int cascades = a.cascades;
  const int window = a.window;
  const int tokens = a.chunk_tokens;
  const CascadeStreamPointers my = StreamState(a, b);
  const float* u_of_slot = my.scores;
  const int64_t t0 = *my.tokens_seen;
  const int first = SinkTokens(t0, sinks, tokens);
  int32_t* next_of_slot = a.scratch.next_of_slot + b * a.slots;
  int32_t* slot_of_token = a.scratch.slot_of_token + b * tokens;
  int32_t* evict_rank = a.scratch.evict_rank + b * tokens;
  int32_t* items[2] = {a.scratch.items + b * 2 * tokens,
                       a.scratch.items + b * 2 * tokens + tokens};
  const float* initial = a.in.initial_scores + b * tokens;

  if (tid < cascades) {
    old_stored[tid] = my.stored[tid];
    old_head[tid] = my.head[tid];
    level_pushes[tid] = 0;
    newest_replaced[tid] = false;
  }
  if (tid == 0) level_items = tokens - first;
  for (int j = tid; j < tokens; j += kPlanThreads) {
    evict_rank[j] = 0;
    if (j < first) {  // rule 1: sink slot t, empty until now
      const int s = int(t0) + j;
      slot_of_token[j] = s;
      next_of_slot[s] = kChainEnd;
    }
  }
  __syncthreads();

  for (int level = 0; level < cascades; ++level) {
    // Read by all before thread 0 rewrites it (the scans' barriers order
    // this read before that write).
    const int n = level_items;
    if (n == 0) break;
    const int base = sinks + level * window;
    const int stored0 = old_stored[level];
    const int head0 = old_head[level];
    const int newest =
        stored0 > 0 ? base + (head0 + stored0 - 1) % stored0 : -1;
    const int prev_base = base - window;
    const int prev_head = level > 0 ? old_head[level - 1] : 0;
    const bool last = level == cascades - 1;
    const int32_t* in = items[(level + 1) & 1];  // cascade 0's are implicit
    int32_t* out = items[level & 1];
    // Item m (level ≥ 1) carries the old content of the previous cascade's
    // m-th oldest slot; item −1 is this cascade's old newest.
    auto content_slot = [&](int m) {
      return m < 0 ? newest : prev_base + (prev_head + m) % window;
    };
    auto settle = [&](int m, int32_t fate) {
      if (level == 0 && m >= 0) {
        slot_of_token[first + m] = fate;
      } else {
        next_of_slot[content_slot(m)] = fate;
      }
    };
    // The slot of the push that has `pushes_before` pushes before it.
    auto push_slot = [&](int pushes_before) {
      const int fill = stored0 + pushes_before;
      return base + (fill < window ? fill : (head0 + fill - window) % window);
    };
    // The run of duels before a push (or the end) is over: its newest
    // content stays in the run's slot.
    auto settle_run = [&](const LevelScan& run) {
      if (run.pushes > 0) {
        settle(run.item, push_slot(run.pushes - 1));
      } else if (run.item >= 0) {  // a duel replaced the old newest
        settle(run.item, newest);
        newest_replaced[level] = true;
      }
    };

    LevelScan carry{0, -1, newest >= 0 ? u_of_slot[newest] : 0.0f};
    for (int round = 0; round < n; round += kPlanThreads) {
      const int m = round + tid;
      const bool valid = m < n;
      int j = 0;
      bool push = false;
      LevelScan mine = NoElement();
      if (valid) {
        j = level == 0 ? first + m : in[m];
        const float u = level == 0 ? initial[j] : u_of_slot[content_slot(m)];
        const bool accepting =
            level <
            AcceptingCascades(t0 + j, sinks, cascades, window, a.eager_fill);
        // Rule c: not accepting, but the cascade is still empty.
        push = accepting || (m == 0 && stored0 == 0);
        mine = LevelScan{push ? 1 : 0, m, u};
      }
      const LevelScan before = ExclusiveScan(mine, carry, warp_totals);
      if (valid && push) {
        const int fill = stored0 + before.pushes;
        const int slot = push_slot(before.pushes);
        if (fill < window) {  // a or c: the slot was empty
          next_of_slot[slot] = kChainEnd;
        } else if (!last) {  // b: the old content is the next cascade's item
          out[fill - window] = j;
        } else {  // b at cascade C−1: the old content falls off
          next_of_slot[slot] = kEvictedByFirst - j;
          evict_rank[j] = 1;
        }
        settle_run(before);
      } else if (valid) {  // d: the loser of the duel against the newest
        evict_rank[j] = 1;
        settle(CarryWinsDuel(mine.u, before.u) ? before.item : m,
               kEvictedByFirst - j);
      }
    }
    if (tid == 0) {
      settle_run(carry);
      level_pushes[level] = carry.pushes;
      const int overwrites = stored0 + carry.pushes - window;
      level_items = last || overwrites < 0 ? 0 : overwrites;
    }
    __syncthreads();
  }

  if (tid < cascades) {
    const int fill = old_stored[tid] + level_pushes[tid];
    my.stored[tid] = fill < window ? fill : window;
    my.head[tid] =
        (old_head[tid] + (fill > window ? fill - window : 0)) % window;
  }
  // Evicted tokens leave in token order.
  LevelScan rank_carry{0, 0, 0.0f};
  for (int round = 0; round < tokens; round += kPlanThreads) {
    const int j = round + tid;
    const LevelScan mine =
        j < tokens ? LevelScan{evict_rank[j], 0, 0.0f} : NoElement();
    const LevelScan before = ExclusiveScan(mine, rank_carry, warp_totals);
    if (j < tokens) evict_rank[j] = before.pushes;
  }
  // Changed slots, ascending: sinks, then cascade by cascade.
  int32_t* changed = a.out.changed_slots + b * tokens * cascades;
  const int max_changed = tokens * cascades;
  for (int k = tid; k < first; k += kPlanThreads) changed[k] = int(t0) + k;
  int offset = first;
  for (int level = 0; level < cascades; ++level) {
    RingRange ranges[4];
    const int count =
        ChangedRanges(old_stored[level], old_head[level], level_pushes[level],
                      newest_replaced[level], window, ranges);
    const int base = sinks + level * window;
    for (int r = 0; r < count; ++r) {
      for (int k = ranges[r].lo + tid; k < ranges[r].hi; k += kPlanThreads) {
        changed[offset + k - ranges[r].lo] = base + k;
      }
      offset += ranges[r].hi - ranges[r].lo;
    }
  }
  for (int k = offset + tid; k < max_changed; k += kPlanThreads) {
    changed[k] = -1;
  }
  if (tid == 0) {
    a.out.changed_counts[b] = offset;
    a.out.evicted_counts[b] = rank_carry.pushes;
    a.scratch.first_positions[b] = t0;
    *my.tokens_seen = t0 + tokens;
  }
}

// Launch 2: the chains of chunk tokens chain0 … chain0 + 31 of stream
// blockIdx.x, for chain0 = 32·blockIdx.y, then gridDim.y·32 further.
// Phase A, a thread per chain: follows the fates (one round trip a hop:
// the slot's old position, u, pool row and fate are independent loads),
// writing each slot's new position and u as it passes (its old ones are
// already read) and keeping the pool rows in shared memory. Phase B, the
// whole block: every (chain, 16- or 2-byte column) item reads the column's
// old pieces along its chain before it writes any, and pads evicted row j
// with zeros when j ≥ E.
template <typename Unit>
__global__ void __launch_bounds__(kMoveThreads)
    MoveChainsKernel(const ChunkArgs a) {
  __shared__ int32_t chain_rows[kMaxChainSlots][kChainsPerBlock];
  __shared__ int chain_length[kChainsPerBlock];
  __shared__ int chain_end[kChainsPerBlock];  // evicted row, −1 when none

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int tokens = a.chunk_tokens;
  const CascadeStreamPointers my = StreamState(a, b);
  const int64_t t0 = a.scratch.first_positions[b];
  const int first = SinkTokens(t0, a.sinks, tokens);
  const int evicted_count = a.out.evicted_counts[b];
  const int32_t* next_of_slot = a.scratch.next_of_slot + b * a.slots;
  const int32_t* slot_of_token = a.scratch.slot_of_token + b * tokens;
  const int32_t* evict_rank = a.scratch.evict_rank + b * tokens;
  int64_t* evicted_positions = a.out.evicted_positions + b * tokens;
  const int units = int(a.row_bytes / int64_t(sizeof(Unit)));
  const int per_chain = 2 * units;  // key columns, then value columns

  for (int chain0 = blockIdx.y * kChainsPerBlock; chain0 < tokens;
       chain0 += gridDim.y * kChainsPerBlock) {
    const int chains =
        tokens - chain0 < kChainsPerBlock ? tokens - chain0 : kChainsPerBlock;
    if (tid < chains) {  // phase A
      const int j = chain0 + tid;
      const bool sink = j < first;
      int64_t carried_position = t0 + j;
      float carried_u = sink ? 0.0f : a.in.initial_scores[b * tokens + j];
      int32_t slot = slot_of_token[j];
      int length = 0;
      int end = -1;
      while (length < kMaxChainSlots) {
        const int64_t old_position = my.positions[slot];
        const float old_u = my.scores[slot];
        const int32_t fate = next_of_slot[slot];
        chain_rows[length][tid] = my.slot_rows[slot];
        ++length;
        my.positions[slot] = carried_position;
        my.scores[slot] = carried_u;  // 0 for a sink: sinks keep no score
        carried_position = old_position;
        carried_u = old_u;
        if (fate == kChainEnd) break;
        if (fate <= kEvictedByFirst) {
          end = evict_rank[kEvictedByFirst - fate];
          evicted_positions[end] = old_position;
          break;
        }
        slot = fate;
      }
      if (j >= evicted_count) evicted_positions[j] = -1;  // padding
      chain_length[tid] = length;
      chain_end[tid] = end;
    }
    __syncthreads();

    for (int item = tid; item < chains * per_chain; item += kMoveThreads) {
      const int c = item / per_chain;
      const int w = item - c * per_chain;
      const int j = chain0 + c;
      const bool value = w >= units;
      const int64_t column = value ? w - units : w;
      const int length = chain_length[c];
      const int end = chain_end[c];
      char* pool =
          static_cast<char*>(value ? a.state.value_rows : a.state.key_rows);
      char* evicted_rows =
          static_cast<char*>(value ? a.out.evicted_values : a.out.evicted_keys);
      auto at = [&](int k) {
        return reinterpret_cast<Unit*>(pool + int64_t(chain_rows[k][c]) *
                                                  a.row_bytes) +
               column;
      };
      auto evicted_at = [&](int row) {
        return reinterpret_cast<Unit*>(evicted_rows +
                                       (b * tokens + row) * a.row_bytes) +
               column;
      };
      const Unit fresh =
          *(reinterpret_cast<const Unit*>(
                static_cast<const char*>(value ? a.in.values : a.in.keys) +
                (b * a.in.stream_stride + int64_t{j} * a.in.token_stride) *
                    a.element_bytes) +
            column);
      if (length <= kRegisterChain) {
        Unit old[kRegisterChain];
#pragma unroll
        for (int k = 0; k < kRegisterChain; ++k) {
          if (k < length - 1 || (k == length - 1 && end >= 0)) old[k] = *at(k);
        }
        if (end >= 0) {
          Unit out{};
#pragma unroll
          for (int k = 0; k < kRegisterChain; ++k) {
            if (k == length - 1) out = old[k];
          }
          *evicted_at(end) = out;
        }
#pragma unroll
        for (int k = 1; k < kRegisterChain; ++k) {
          if (k < length) *at(k) = old[k - 1];
        }
      } else {  // backwards, so each read precedes the write over it
        if (end >= 0) *evicted_at(end) = *at(length - 1);
        for (int k = length - 1; k >= 1; --k) *at(k) = *at(k - 1);
      }
      *at(0) = fresh;
      if (j >= evicted_count) *evicted_at(j) = Unit{};  // padding
    }
    __syncthreads();  // chain_* are rewritten by the next round
  }
}

}  // namespace

size_t ChunkInsertScratchBytes(const ChunkInsertShape& shape) {
  const CascadeParams& p = shape.batch.params;
  if (shape.batch.streams < 1 || shape.chunk_tokens < 1 || p.sinks < 0 ||
      p.cascades < 1 || p.window < 1) {
    return 0;
  }
  const int64_t slots = int64_t{p.sinks} + int64_t{p.cascades} * p.window;
  return LayOutScratch(shape.batch.streams, slots, shape.chunk_tokens).total;
}

absl::Status InsertChunks(const ChunkInsertShape& shape,
                          const CascadeDeviceState& state,
                          const ChunkInsertInputs& inputs,
                          const ChunkInsertOutputs& outputs, void* scratch,
                          size_t scratch_bytes, cudaStream_t stream) {
  const CascadeBatchShape& batch = shape.batch;
  const CascadeParams& p = batch.params;
  absl::Status valid = CheckCascadeBatchShape(batch);
  if (!valid.ok()) return valid;
  // T ≤ W is what lets each cascade's overwrites meet only old contents.
  if (shape.chunk_tokens < 1 || shape.chunk_tokens > p.window) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_tokens: ", shape.chunk_tokens, ", want in [1, ",
                     p.window, "] (the window)"));
  }
  if (absl::Status set =
          CheckCascadeDeviceState(state, /*with_exponent=*/false);
      !set.ok()) {
    return set;
  }
  if (inputs.keys == nullptr || inputs.values == nullptr ||
      inputs.initial_scores == nullptr) {
    return absl::InvalidArgumentError(
        "inputs: keys, values and initial_scores must be set");
  }
  if (inputs.stream_stride < 0 || inputs.token_stride < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs: stream_stride ", inputs.stream_stride,
                     ", token_stride ", inputs.token_stride, ", want >= 0"));
  }
  if (outputs.evicted_positions == nullptr ||
      outputs.evicted_counts == nullptr || outputs.evicted_keys == nullptr ||
      outputs.evicted_values == nullptr || outputs.changed_slots == nullptr ||
      outputs.changed_counts == nullptr) {
    return absl::InvalidArgumentError(
        "outputs: evicted_positions, evicted_counts, evicted_keys, "
        "evicted_values, changed_slots and changed_counts must all be set");
  }
  const size_t scratch_needed = ChunkInsertScratchBytes(shape);
  if (scratch == nullptr || !Aligned16(scratch) ||
      scratch_bytes < scratch_needed) {
    return absl::InvalidArgumentError(
        absl::StrCat("scratch: ", scratch_bytes, " bytes",
                     scratch == nullptr ? " (null)" : "",
                     Aligned16(scratch) ? "" : " (not 16-byte aligned)",
                     ", want ", scratch_needed, " bytes, 16-byte aligned"));
  }

  ChunkArgs args;
  args.sinks = p.sinks;
  args.cascades = p.cascades;
  args.window = p.window;
  args.eager_fill = p.eager_fill;
  args.chunk_tokens = shape.chunk_tokens;
  args.slots = int64_t{p.sinks} + int64_t{p.cascades} * p.window;
  args.element_bytes = DTypeBytes(batch.dtype);
  args.row_bytes = int64_t{batch.head_dim} * args.element_bytes;
  args.state = state;
  args.in = inputs;
  args.out = outputs;
  const ChunkScratchLayout layout =
      LayOutScratch(batch.streams, args.slots, shape.chunk_tokens);
  char* base = static_cast<char*>(scratch);
  args.scratch.first_positions =
      reinterpret_cast<int64_t*>(base + layout.first_positions);
  args.scratch.next_of_slot =
      reinterpret_cast<int32_t*>(base + layout.next_of_slot);
  args.scratch.slot_of_token =
      reinterpret_cast<int32_t*>(base + layout.slot_of_token);
  args.scratch.evict_rank =
      reinterpret_cast<int32_t*>(base + layout.evict_rank);
  args.scratch.items = reinterpret_cast<int32_t*>(base + layout.items);

  const bool vector = args.row_bytes % 16 == 0 && Aligned16(state.key_rows) &&
                      Aligned16(state.value_rows) && Aligned16(inputs.keys) &&
                      Aligned16(inputs.values) &&
                      Aligned16(outputs.evicted_keys) &&
                      Aligned16(outputs.evicted_values) &&
                      (inputs.stream_stride * args.element_bytes) % 16 == 0 &&
                      (inputs.token_stride * args.element_bytes) % 16 == 0;
  const int chain_blocks =
      (shape.chunk_tokens + kChainsPerBlock - 1) / kChainsPerBlock;
  const dim3 move_grid(batch.streams, chain_blocks < kMaxMoveBlocksPerStream
                                          ? chain_blocks
                                          : kMaxMoveBlocksPerStream);

  PlanChunkKernel<<<dim3(batch.streams), kPlanThreads, 0, stream>>>(args);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("PlanChunkKernel");
  // Rows are whole elements of 2 or 4 bytes, so 2-byte units always fit.
  if (vector) {
    MoveChainsKernel<uint4><<<move_grid, kMoveThreads, 0, stream>>>(args);
  } else {
    MoveChainsKernel<uint16_t><<<move_grid, kMoveThreads, 0, stream>>>(args);
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("MoveChainsKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
