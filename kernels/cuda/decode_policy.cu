// A block per stream in every kernel. Page scores: 8 threads a page, thread
// k running QuestHeadBound's lane k (channels i ≡ k mod 8, in order), the
// lanes then added in the bound's fixed tree through shuffles (IEEE sums
// commute exactly, so every thread of the eight holds the same bits).
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_policy.h"
#include "kernels/cuda/row_access.cuh"
#include "kernels/policy_math.h"

namespace kvmem::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 8;  // QuestHeadBound's lanes: threads per page

struct PlanArgs {
  DecodePolicyShape shape;
  PlanCandidatesArgs a;
};

constexpr int kPagesPerBlock = kThreads / kLanes;  // 32
constexpr int kLaneElements = kMaxPolicyHeadDim / kLanes;

// The page's score for the group from lane k's digest values (channels
// i = 8e + k, held in registers): each head's lane k of QuestHeadBound,
// the eight lanes (the threads of `group_mask`) added as
// ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), then MAX over heads, head 0 first
// (StreamState::Select's reduction).
template <int kElements>
__device__ __forceinline__ float GroupScore(const float* s_query,
                                            const float (&low)[kElements],
                                            const float (&high)[kElements],
                                            int group, int head_dim, int k,
                                            unsigned group_mask) {
  float score = 0.0f;
  for (int g = 0; g < group; ++g) {
    const float* q = s_query + g * head_dim;
    float lane = 0.0f;
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      const int i = e * kLanes + k;
      if (i < head_dim) {
        const float up = MulF(q[i], high[e]);
        const float down = MulF(q[i], low[e]);
        lane = AddF(lane, up > down ? up : down);
      }
    }
    lane = AddF(lane, __shfl_xor_sync(group_mask, lane, 1));
    lane = AddF(lane, __shfl_xor_sync(group_mask, lane, 2));
    lane = AddF(lane, __shfl_xor_sync(group_mask, lane, 4));
    score = g == 0 ? lane : (lane > score ? lane : score);
  }
  return score;
}

// Grid (stream, chunk of 32 candidates): every block stages the stream's
// queries; 8 threads a candidate load its digest's lane values all at once
// (independent loads, one memory latency a block rather than one per
// channel and head) and score it. Block 0 of a stream also writes its
// always-in ids.
// kElements: each lane's digest values held in registers, D/8 rounded up
// to 16 or 32. Sized to D, so that D 128 leaves room for 3 blocks an SM
// (at the largest size one block's registers filled an SM: 12% occupancy).
template <DType kT, int kElements>
__global__ void __launch_bounds__(kThreads, kElements <= 16 ? 3 : 1)
    PlanKernel(const PlanArgs p) {
  __shared__ float s_query[kMaxPolicyGroup * kMaxPolicyHeadDim];
  const DecodePolicyShape& sh = p.shape;
  const PlanCandidatesArgs& a = p.a;
  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const PolicyStreamPointers st = a.streams[b];
  const int D = sh.head_dim, G = sh.group, S = sh.sinks, W = sh.window;
  const int P = sh.page_tokens;
  const char* query =
      static_cast<const char*>(a.queries) + size_t(b) * G * D * DTypeBytes(kT);
  for (int i = tid; i < G * D; i += kThreads) {
    s_query[i] = ElementToFloat<kT>(query, i);
  }
  // Cascade 0's newest `recent` tokens: ring offsets (head + k) % stored
  // for k in [stored − recent, stored) (CascadeStream::CascadeSlots).
  const int stored0 = st.stored[0];
  const int head0 = st.head[0];
  const int recent_from = max(0, stored0 - sh.recent_tokens);
  if (blockIdx.y == 0) {
    // Always in, in order: occupied sinks ascending, the recent tokens
    // oldest first, the new token. Sinks compacted 256 at a time by the
    // whole block (a ballot per warp, then the warps' counts).
    __shared__ int s_warp_count[kThreads / 32];
    int32_t* always = a.always_in_ids + size_t(b) * sh.always_capacity();
    const int64_t slot0 = int64_t(b) * sh.slots();
    const int lane = tid % 32, warp = tid / 32;
    int n = 0;  // the same in every thread
    for (int base = 0; base < S; base += kThreads) {
      const int slot = base + tid;
      const bool in = slot < S && st.positions[slot] >= 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, in);
      if (lane == 0) s_warp_count[warp] = __popc(ballot);
      __syncthreads();
      int before = n, total = n;
      for (int w = 0; w < kThreads / 32; ++w) {
        before += w < warp ? s_warp_count[w] : 0;
        total += s_warp_count[w];
      }
      if (in) {
        always[before + __popc(ballot & ((1u << lane) - 1))] =
            int32_t(slot0 + slot);
      }
      n = total;
      __syncthreads();  // s_warp_count is rewritten next round
    }
    const int recent = stored0 - recent_from;
    for (int r = tid; r < recent; r += kThreads) {
      always[n + r] = int32_t(slot0 + S + (head0 + recent_from + r) % stored0);
    }
    if (tid == 0) {
      always[n + recent] = kNewTokenId;
      a.always_in_count[b] = n + recent + 1;
    }
  }
  __syncthreads();  // s_query is written; no barrier below

  const int cascade_pages = sh.cascade_pages();
  const int sealed = a.sealed_count[b];
  const int open_tokens = a.open_tokens[b];
  const int total = cascade_pages + sealed + (open_tokens > 0 ? 1 : 0);
  const int c = blockIdx.y * kPagesPerBlock + tid / kLanes;
  if (c >= total) return;  // whole groups of 8 leave together
  const int k = tid % kLanes;
  const unsigned group_mask = 0xffu << ((tid % 32) / kLanes * kLanes);
  const float* digest;
  uint64_t mask = 0;
  int32_t first_id;
  if (c < cascade_pages) {
    const int first = S + c * P;  // slot of the page's first token
    for (int j = k; j < P; j += kLanes) {
      const int slot = first + j;
      if (st.positions[slot] < 0) continue;
      // Recent: cascade 0's offsets (head0 + k') % stored0, k' ≥ from.
      const int offset = slot - S;
      bool recent = false;
      if (offset < W && offset < stored0) {
        recent = (offset - head0 + stored0) % stored0 >= recent_from;
      }
      if (!recent) mask |= uint64_t{1} << j;
    }
    for (int off = 1; off < kLanes; off <<= 1) {
      mask |= __shfl_xor_sync(group_mask, mask, off);
    }
    digest = st.digests + size_t(sh.sink_pages() + c) * 2 * size_t(D);
    first_id = int32_t(int64_t(b) * sh.slots() + first);
  } else {
    // Spilled: the sealed pages (on the device), then the open one.
    const int i = c - cascade_pages;
    const int tokens = i < sealed ? P : open_tokens;
    mask = tokens >= 64 ? ~uint64_t{0} : (uint64_t{1} << tokens) - 1;
    digest = i < sealed ? st.sealed_digests + size_t(i) * 2 * size_t(D)
                        : a.open_digests + size_t(b) * 2 * size_t(D);
    first_id = kSpilledIdBase + (a.spilled_begin[b] + i) * kMaxPolicyPageTokens;
  }
  float low[kElements], high[kElements];
#pragma unroll
  for (int e = 0; e < kElements; ++e) {
    const int i = e * kLanes + k;
    low[e] = i < D ? __ldg(digest + i) : 0.0f;
    high[e] = i < D ? __ldg(digest + D + i) : 0.0f;
  }
  // Scored whether or not a page has fresh tokens (the fill skips those).
  const float score = GroupScore(s_query, low, high, G, D, k, group_mask);
  if (k == 0) {
    const int at = a.candidate_begin[b] + c;
    a.scores[at] = score;
    a.fresh_tokens[at] = __popcll(mask);
    a.first_id[at] = first_id;
    a.fresh_mask[at] = mask;
  }
}

struct MapArgs {
  DecodePolicyShape shape;
  MapRowsArgs a;
};

__global__ void __launch_bounds__(kThreads) MapKernel(const MapArgs m) {
  const int b = blockIdx.x;
  const MapRowsArgs& a = m.a;
  const PolicyStreamPointers st = a.streams[b];
  const int64_t slot0 = int64_t(b) * m.shape.slots();
  const int n = a.counts[b];
  const size_t at = size_t(b) * a.capacity;
  // A block a kThreads rows of a stream, so that a thread's two dependent
  // loads (the id, then its row) are its only trip: a block walking a
  // stream's 2K rows had taken 12 µs at batch 1 under ncu, now 4.
  const int i = blockIdx.y * kThreads + threadIdx.x;
  if (i < n) {
    const int32_t id = a.ids[at + i];
    const bool positions = a.row_positions != nullptr;
    int32_t row, slot;
    int64_t position = -1;
    if (id == kNewTokenId) {
      row = a.new_token_rows[b];
      slot = -2;
      if (positions) position = a.new_token_positions[b];
    } else if (id >= kSpilledIdBase) {
      const int rel = id - kSpilledIdBase;
      const int candidate = rel / kMaxPolicyPageTokens;
      const int token = rel % kMaxPolicyPageTokens;
      slot = -1;
      if (a.ring_first != nullptr && st.ring_tokens > 0 &&
          candidate - a.spilled_begin[b] >= a.ring_first[b]) {
        const int64_t spilled =
            int64_t(candidate - a.spilled_begin[b]) * m.shape.page_tokens +
            token;
        const int index = int(spilled % st.ring_tokens);
        row = st.ring_rows[index];
        if (positions) position = st.ring_positions[index];
      } else {
        const int staged = a.spilled_stage[candidate] + token;
        row = a.staged_rows[staged];
        if (positions) position = a.staged_positions[staged];
      }
    } else {
      slot = int32_t(id - slot0);
      row = st.slot_rows[slot];
      if (positions) position = st.positions[slot];
    }
    a.pool_rows[at + i] = row;
    a.row_slots[at + i] = slot;
    if (positions) a.row_positions[at + i] = position;
  }
}

// A block per stream: its evicted tokens' key and value rows into its
// ring, a warp a token (CopyRow), and their positions. Only the last
// ring_tokens are written, so no two tokens of one launch share an index.
__global__ void __launch_bounds__(kThreads)
    KeepEvictedKernel(const KeepEvictedArgs a, int row_bytes) {
  const int b = blockIdx.x;
  const int start = a.ring_index[b];
  const PolicyStreamPointers st = a.streams[b];
  const int ring = st.ring_tokens;
  if (start < 0 || ring <= 0) return;
  const size_t first = size_t(b) * size_t(a.rows_per_stream);
  const int count = a.evicted_counts != nullptr
                        ? a.evicted_counts[b]
                        : (a.evicted_positions[first] >= 0 ? 1 : 0);
  const bool vector = row_bytes % 16 == 0;
  const int lane = threadIdx.x % 32;
  for (int e = (count > ring ? count - ring : 0) + int(threadIdx.x / 32);
       e < count; e += int(blockDim.x / 32)) {
    const int index = int((int64_t(start) + e) % ring);
    const size_t to = size_t(st.ring_rows[index]) * size_t(row_bytes);
    const size_t from = (first + size_t(e)) * size_t(row_bytes);
    CopyRow(static_cast<const char*>(a.evicted_keys) + from,
            static_cast<char*>(a.key_rows) + to, size_t(row_bytes), vector,
            lane);
    CopyRow(static_cast<const char*>(a.evicted_values) + from,
            static_cast<char*>(a.value_rows) + to, size_t(row_bytes), vector,
            lane);
    if (lane == 0) {
      st.ring_positions[index] = a.evicted_positions[first + size_t(e)];
    }
  }
}

// A bitonic sort of (position, row) pairs in shared memory, padded to a
// power of two with positions that sort last.
__global__ void __launch_bounds__(kThreads)
    SortKernel(const SortRowsArgs a, int padded) {
  extern __shared__ int64_t s_pos[];  // [padded], then the rows
  int32_t* s_row = reinterpret_cast<int32_t*>(s_pos + padded);
  const int b = blockIdx.x;
  const int n = a.counts[b];
  const size_t at = size_t(b) * a.capacity;
  for (int i = threadIdx.x; i < padded; i += kThreads) {
    s_pos[i] = i < n ? a.positions[at + i] : INT64_MAX;
    s_row[i] = i < n ? a.rows[at + i] : -1;
  }
  __syncthreads();
  for (int k = 2; k <= padded; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < padded; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool ascending = (i & k) == 0;
          if ((s_pos[i] > s_pos[partner]) == ascending) {
            const int64_t p = s_pos[i];
            s_pos[i] = s_pos[partner];
            s_pos[partner] = p;
            const int32_t r = s_row[i];
            s_row[i] = s_row[partner];
            s_row[partner] = r;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < n; i += kThreads) {
    a.sorted_positions[at + i] = s_pos[i];
    a.sorted_rows[at + i] = s_row[i];
  }
}

struct ScatterArgs {
  DecodePolicyShape shape;
  ScatterProbsArgs a;
};

__global__ void __launch_bounds__(kThreads) ScatterKernel(const ScatterArgs s) {
  const int b = blockIdx.x;
  const ScatterProbsArgs& a = s.a;
  const int slots = s.shape.slots();
  float* out = a.slot_probs + size_t(b) * slots;
  for (int i = threadIdx.x; i < slots; i += kThreads) out[i] = 0.0f;
  __syncthreads();
  const int n = a.counts[b];
  const size_t at = size_t(b) * a.capacity;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int slot = a.row_slots[at + i];
    if (slot >= 0) {
      out[slot] = a.reduced_probs[at + i];
    } else if (slot == -2) {
      a.self_probs[b] = a.reduced_probs[at + i];
    }
  }
}

struct RefreshArgs {
  DecodePolicyShape shape;
  RefreshDigestsArgs a;
};

// Changed-slot entries a block of RefreshKernel walks: a decode step's C
// fit one block; a chunk's T·C spread over many.
// Changed entries a block refreshes: one when a stream has few (a decode
// step changes at most C + 1 slots: its pages are refreshed side by side,
// not one after another: 18 → 7 µs at batch 1 under ncu), else 16.
constexpr int kRefreshEntries = 16;
constexpr int kRefreshAlone = 64;  // capacities up to this: one a block

// The page holding `slot`, its first slot and how many slots it has.
__device__ __forceinline__ void PageOfSlot(const DecodePolicyShape& sh,
                                           int slot, int* page, int* first,
                                           int* count) {
  const int S = sh.sinks, P = sh.page_tokens;
  if (slot < S) {
    *page = slot / P;
    *first = *page * P;
    *count = min(P, S - *first);
  } else {
    const int k = (slot - S) / P;
    *page = sh.sink_pages() + k;
    *first = S + k * P;
    *count = P;
  }
}

// Block (b, y) takes stream b's changed-slot entries [y·16, y·16 + 16), a
// thread per channel. The entries are ascending, so a page's slots are
// adjacent: the page is refreshed once, by the entry that starts it.
template <DType kT>
__global__ void __launch_bounds__(kThreads) RefreshKernel(const RefreshArgs r) {
  const int b = blockIdx.x;
  const RefreshDigestsArgs& a = r.a;
  const DecodePolicyShape& sh = r.shape;
  const PolicyStreamPointers st = a.streams[b];
  const int D = sh.head_dim;
  const size_t row_bytes = size_t(D) * DTypeBytes(kT);
  const char* keys = static_cast<const char*>(a.key_rows);
  const int changed = a.changed_counts[b];
  const int capacity =
      a.changed_capacity > 0 ? a.changed_capacity : sh.cascades;
  const int32_t* slots = a.changed_slots + size_t(b) * capacity;
  const int per_block = capacity <= kRefreshAlone ? 1 : kRefreshEntries;
  const int begin = blockIdx.y * per_block;
  const int end = min(changed, begin + per_block);
  __shared__ int32_t page_rows[kMaxPolicyPageTokens];
  for (int c = begin; c < end; ++c) {
    const int slot = slots[c];
    if (slot < 0) break;
    int page, first, count;
    PageOfSlot(sh, slot, &page, &first, &count);
    if (c > 0) {
      int before, unused_first, unused_count;
      PageOfSlot(sh, slots[c - 1], &before, &unused_first, &unused_count);
      if (before == page) continue;  // refreshed by an earlier entry
    }
    // The page's rows (−1: empty slot) first, side by side, so that the
    // key loads below depend on nothing but shared memory.
    __syncthreads();  // the previous page's rows are read
    for (int j = threadIdx.x; j < count; j += kThreads) {
      page_rows[j] =
          st.positions[first + j] >= 0 ? st.slot_rows[first + j] : -1;
    }
    __syncthreads();
    float* low = st.digests + size_t(page) * 2 * size_t(D);
    float* high = low + D;
    for (int ch = threadIdx.x; ch < D; ch += kThreads) {
      bool seeded = false;
      float lo = 0.0f, hi = 0.0f;
#pragma unroll 8
      for (int j = 0; j < count; ++j) {
        const int32_t row = page_rows[j];
        if (row < 0) continue;
        const float key =
            ElementToFloat<kT>(keys + size_t(row) * row_bytes, ch);
        // std::min(lo, key) and std::max(hi, key), as the CPU folds.
        lo = !seeded ? key : (key < lo ? key : lo);
        hi = !seeded ? key : (hi < key ? key : hi);
        seeded = true;
      }
      if (seeded) {
        low[ch] = lo;
        high[ch] = hi;
      }
    }
  }
}

}  // namespace

absl::Status DecodePolicyShape::Validate() const {
  auto bad = [](const char* field, int64_t v, const char* want) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", v, ", want ", want));
  };
  if (streams < 1) return bad("streams", streams, ">= 1");
  if (sinks < 0) return bad("sinks", sinks, ">= 0");
  if (cascades < 1) return bad("cascades", cascades, ">= 1");
  if (page_tokens < 1 || page_tokens > kMaxPolicyPageTokens) {
    return bad("page_tokens", page_tokens, "in [1, 64]");
  }
  if (window < 1 || window % page_tokens != 0) {
    return bad("window", window, "a positive multiple of page_tokens");
  }
  if (recent_tokens < 0) return bad("recent_tokens", recent_tokens, ">= 0");
  if (group < 1 || group > kMaxPolicyGroup) {
    return bad("group", group, "in [1, 8]");
  }
  if (head_dim < 1 || head_dim > kMaxPolicyHeadDim) {
    return bad("head_dim", head_dim, "in [1, 256]");
  }
  if (dtype != DType::kBf16 && dtype != DType::kFp16 && dtype != DType::kFp32) {
    return bad("dtype", int(dtype), "bf16/fp16/fp32");
  }
  if (int64_t(streams) * slots() >= kSpilledIdBase) {
    return bad("streams × slots", int64_t(streams) * slots(), "< 2^30");
  }
  return absl::OkStatus();
}

absl::Status PlanDecodeCandidates(const DecodePolicyShape& shape,
                                  const PlanCandidatesArgs& args,
                                  cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.streams == nullptr || args.queries == nullptr ||
      args.spilled_begin == nullptr || args.sealed_count == nullptr ||
      args.open_tokens == nullptr || args.open_digests == nullptr ||
      args.candidate_begin == nullptr || args.scores == nullptr ||
      args.fresh_tokens == nullptr || args.first_id == nullptr ||
      args.fresh_mask == nullptr || args.always_in_ids == nullptr ||
      args.always_in_count == nullptr) {
    return absl::InvalidArgumentError(
        "PlanCandidatesArgs: every array must be set");
  }
  if (args.max_candidates < 1 ||
      args.max_candidates > shape.cascade_pages() + (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("PlanCandidatesArgs: max_candidates ", args.max_candidates,
                     ", want at least 1 (the most candidates a stream has)"));
  }
  PlanArgs p{shape, args};
  const dim3 grid(
      unsigned(shape.streams),
      unsigned((args.max_candidates + kPagesPerBlock - 1) / kPagesPerBlock));
  const bool narrow = shape.head_dim <= 16 * kLanes;
  switch (shape.dtype) {
    case DType::kBf16:
      if (narrow) {
        PlanKernel<DType::kBf16, 16><<<grid, kThreads, 0, stream>>>(p);
      } else {
        PlanKernel<DType::kBf16, kLaneElements>
            <<<grid, kThreads, 0, stream>>>(p);
      }
      break;
    case DType::kFp16:
      if (narrow) {
        PlanKernel<DType::kFp16, 16><<<grid, kThreads, 0, stream>>>(p);
      } else {
        PlanKernel<DType::kFp16, kLaneElements>
            <<<grid, kThreads, 0, stream>>>(p);
      }
      break;
    default:
      if (narrow) {
        PlanKernel<DType::kFp32, 16><<<grid, kThreads, 0, stream>>>(p);
      } else {
        PlanKernel<DType::kFp32, kLaneElements>
            <<<grid, kThreads, 0, stream>>>(p);
      }
      break;
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("PlanKernel");
  return absl::OkStatus();
}

absl::Status MapSelectedRows(const DecodePolicyShape& shape,
                             const MapRowsArgs& args, cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.streams == nullptr || args.ids == nullptr ||
      args.counts == nullptr || args.new_token_rows == nullptr ||
      args.pool_rows == nullptr || args.row_slots == nullptr ||
      args.capacity < 1) {
    return absl::InvalidArgumentError(
        "MapRowsArgs: streams, ids, counts, new_token_rows, pool_rows and "
        "row_slots must be set and capacity >= 1");
  }
  if ((args.ring_first != nullptr) != (args.spilled_begin != nullptr)) {
    return absl::InvalidArgumentError(
        "MapRowsArgs: ring_first and spilled_begin go together");
  }
  const dim3 grid(shape.streams, (args.capacity + kThreads - 1) / kThreads);
  MapKernel<<<grid, kThreads, 0, stream>>>(MapArgs{shape, args});
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("MapKernel");
  return absl::OkStatus();
}

absl::Status KeepEvictedInRings(const DecodePolicyShape& shape,
                                const KeepEvictedArgs& args,
                                cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.streams == nullptr || args.evicted_positions == nullptr ||
      args.evicted_keys == nullptr || args.evicted_values == nullptr ||
      args.ring_index == nullptr || args.key_rows == nullptr ||
      args.value_rows == nullptr || args.rows_per_stream < 1) {
    return absl::InvalidArgumentError(
        "KeepEvictedArgs: every array but evicted_counts must be set and "
        "rows_per_stream >= 1");
  }
  const int row_bytes = shape.head_dim * DTypeBytes(shape.dtype);
  KeepEvictedKernel<<<shape.streams, kThreads, 0, stream>>>(args, row_bytes);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("KeepEvictedKernel");
  return absl::OkStatus();
}

absl::Status SortRowsByPosition(const DecodePolicyShape& shape,
                                const SortRowsArgs& args, cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.rows == nullptr || args.positions == nullptr ||
      args.counts == nullptr || args.sorted_rows == nullptr ||
      args.sorted_positions == nullptr || args.capacity < 1 ||
      args.capacity > kMaxSortRows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SortRowsArgs: every array must be set and capacity in [1, ",
        kMaxSortRows, "], got ", args.capacity));
  }
  int padded = 1;
  while (padded < args.capacity) padded <<= 1;
  const size_t smem = size_t(padded) * (8 + 4);
  SortKernel<<<shape.streams, kThreads, smem, stream>>>(args, padded);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("SortKernel");
  return absl::OkStatus();
}

absl::Status ScatterSlotProbs(const DecodePolicyShape& shape,
                              const ScatterProbsArgs& args,
                              cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.row_slots == nullptr || args.counts == nullptr ||
      args.reduced_probs == nullptr || args.slot_probs == nullptr ||
      args.self_probs == nullptr || args.capacity < 1) {
    return absl::InvalidArgumentError(
        "ScatterProbsArgs: every array must be set and capacity >= 1");
  }
  ScatterKernel<<<shape.streams, kThreads, 0, stream>>>(
      ScatterArgs{shape, args});
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScatterKernel");
  return absl::OkStatus();
}

absl::Status RefreshChangedDigests(const DecodePolicyShape& shape,
                                   const RefreshDigestsArgs& args,
                                   cudaStream_t stream) {
  absl::Status valid = shape.Validate();
  if (!valid.ok()) return valid;
  if (args.streams == nullptr || args.key_rows == nullptr ||
      args.changed_slots == nullptr || args.changed_counts == nullptr) {
    return absl::InvalidArgumentError(
        "RefreshDigestsArgs: every array must be set");
  }
  const int capacity =
      args.changed_capacity > 0 ? args.changed_capacity : shape.cascades;
  const dim3 grid(shape.streams,
                  capacity <= kRefreshAlone
                      ? capacity
                      : (capacity + kRefreshEntries - 1) / kRefreshEntries);
  RefreshArgs r{shape, args};
  switch (shape.dtype) {
    case DType::kBf16:
      RefreshKernel<DType::kBf16><<<grid, kThreads, 0, stream>>>(r);
      break;
    case DType::kFp16:
      RefreshKernel<DType::kFp16><<<grid, kThreads, 0, stream>>>(r);
      break;
    default:
      RefreshKernel<DType::kFp32><<<grid, kThreads, 0, stream>>>(r);
      break;
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("RefreshKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
