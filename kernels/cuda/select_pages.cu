// A block per stream, of 256, 512 or 1024 threads as the largest stream
// needs. A stream with at most a block's candidates (SelectOneAThread):
// sort them (score descending, index ascending) with a bitonic network in
// registers and shuffles, take the prefix of the sorted order that fits (a
// scan of fresh tokens), then let one warp finish the greedy rule after
// the first page that did not fit (pages that fit what is left, in order;
// few, since what is left is under a page). Above: find that first miss
// by a radix search instead of a sort (RadixSelect), and sort only the
// tail.

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/grid_dependency.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/select_pages.h"

namespace kvmem::cuda {
namespace {

// Threads a block of SelectPagesKernel: 512 up to 512 candidates a stream
// (a candidate a thread), else 1024 (twice the keys a radix round; at 6148
// candidates and batch 1 the 512-thread block took 49 µs under ncu).
constexpr int kMidBlock = 512;
constexpr int kLargeBlock = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

int PowerOfTwoAtLeast(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Sort key, ascending = score descending, then candidate index ascending.
// −0 and +0 are one score, as in the CPU's float comparison; NaN last.
__device__ __forceinline__ uint64_t SortKey(float score, int index) {
  uint32_t bits = __float_as_uint(score);
  uint32_t order;
  if (score != score) {
    order = 0xffffffffu;
  } else {
    if (score == 0.0f) bits = 0;
    const uint32_t ascending =
        (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    order = ~ascending;
  }
  return (uint64_t{order} << 32) | uint32_t(index);
}

// Inclusive scan of one value a lane over its warp (all 32 lanes call it).
__device__ __forceinline__ int WarpInclusiveScan(int value) {
  const int lane = threadIdx.x % 32;
  for (int off = 1; off < 32; off <<= 1) {
    const int up = __shfl_up_sync(kFullMask, value, off);
    if (lane >= off) value += up;
  }
  return value;
}

// Inclusive scan of one value a thread over the block (every thread of
// the block calls it). `s_warp` holds a warp's int.
__device__ int BlockInclusiveScanOne(int value, int* s_warp) {
  const int warp = threadIdx.x / 32;
  int incl = WarpInclusiveScan(value);
  if (threadIdx.x % 32 == 31) s_warp[warp] = incl;
  __syncthreads();
  for (int w = 0; w < warp; ++w) incl += s_warp[w];
  __syncthreads();  // s_warp may be written again
  return incl;
}

// In-place inclusive scan of a[0..len) by the whole block: a run of
// elements a thread, the runs' sums scanned across the block.
template <int kBlock>
__device__ void BlockInclusiveScan(int* a, int len, int* s_warp) {
  const int per = (len + kBlock - 1) / kBlock;
  const int first = int(threadIdx.x) * per;
  const int last = min(len, first + per);
  int sum = 0;
  for (int i = first; i < last; ++i) sum += a[i];
  int running = BlockInclusiveScanOne(sum, s_warp) - sum;
  for (int i = first; i < last; ++i) {
    running += a[i];
    a[i] = running;
  }
  __syncthreads();
}

// Sorts s_keys[0..capacity) ascending (capacity a power of two, padded
// with ~0) by a bitonic network in shared memory, the whole block.
template <int kBlock>
__device__ void BlockBitonicSort(uint64_t* s_keys, int capacity) {
  const int tid = threadIdx.x;
  for (int k = 2; k <= capacity; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < capacity; i += kBlock) {
        const int partner = i ^ j;
        if (partner > i) {
          const uint64_t a = s_keys[i];
          const uint64_t b = s_keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > b) == ascending) {
            s_keys[i] = b;
            s_keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The greedy rule after the first page that did not fit, by warp 0 (the
// caller's condition): over sorted[from..count) in order, take each page
// with fresh tokens that fit in `left`. Returns what is left (lane 0's).
__device__ int WarpGreedyTail(const uint64_t* sorted, int from, int count,
                              const int* fresh, uint8_t* s_taken, int left) {
  const int lane = threadIdx.x % 32;
  for (int base = from; base < count && left > 0; base += 32) {
    const int i = base + lane;
    const int index = i < count ? int(uint32_t(sorted[i])) : 0;
    const int tokens = i < count ? fresh[index] : 0;
    bool fits = i < count && tokens > 0 && tokens <= left;
    unsigned ballot = __ballot_sync(kFullMask, fits);
    while (ballot != 0) {
      const int first = __ffs(ballot) - 1;
      const int taken_tokens = __shfl_sync(kFullMask, tokens, first);
      if (lane == first) s_taken[index] = 1;
      left -= taken_tokens;
      fits = fits && lane > first && tokens <= left;
      ballot = __ballot_sync(kFullMask, fits);
    }
  }
  return left;
}

// Above kBlock candidates the block does not sort them all: it finds the
// first page that does not fit (the miss) by a radix search over the sort
// keys, 8 bits a pass, weighting each key by its fresh tokens: the miss is
// the smallest key whose tokens, with those of every smaller key, pass
// `avail`. Pages before it with tokens are taken; only the pages after it
// that could still fit (0 < tokens ≤ what is left, a page's worth at
// most) are sorted, for the greedy tail. At 4095 candidates a stream this
// replaced a full sort of 78 barrier stages. `s_keys[0..n)` hold the keys
// (unsorted) and `s_fresh[0..n)` their tokens; `s_tail` has room for n.
// Returns what is left of `avail`.
template <int kBlock>
__device__ int RadixSelect(const uint64_t* s_keys, const int* s_fresh, int n,
                           int avail, uint8_t* s_taken, uint64_t* s_tail) {
  __shared__ int s_hist_count[256];
  __shared__ int s_hist_tokens[256];
  __shared__ uint64_t s_prefix;
  __shared__ int s_below, s_bin_count, s_tail_count;
  __shared__ uint64_t s_miss;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  uint64_t prefix = 0;  // the miss's bits above `shift + 8`
  int below = 0;        // tokens of the keys below those bits
  int shift = 56;
  for (;; shift -= 8) {
    for (int b = tid; b < 256; b += kBlock) {
      s_hist_count[b] = 0;
      s_hist_tokens[b] = 0;
    }
    __syncthreads();
    for (int first = 0; first < n; first += kBlock) {
      const int i = first + tid;
      const uint64_t key = i < n ? s_keys[i] : 0;
      const bool in = i < n && (shift == 56 || (key >> (shift + 8)) == prefix);
      const int digit = in ? int((key >> shift) & 0xff) : -1;
      const int tokens = in ? s_fresh[i] : 0;
      // The first pass finds a stream's keys mostly in one bin (they share
      // their top bits): a warp whose lanes all hold one digit adds up
      // first and touches the histogram once. Otherwise a lane adds its
      // own (a __match_any_sync + __reduce_add_sync per group had compiled
      // to a loop over the warp's groups, 10 % of the kernel's samples).
      const int digit0 = __shfl_sync(kFullMask, digit, 0);
      if (__all_sync(kFullMask, digit == digit0)) {
        const unsigned sum = __reduce_add_sync(kFullMask, unsigned(tokens));
        if (lane == 0 && digit0 >= 0) {
          atomicAdd(&s_hist_count[digit0], 32);
          atomicAdd(&s_hist_tokens[digit0], int(sum));
        }
      } else if (in) {
        atomicAdd(&s_hist_count[digit], 1);
        atomicAdd(&s_hist_tokens[digit], tokens);
      }
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l holds bins 8l..8l+7; the bin where the running tokens pass
      // `avail` holds the miss.
      int sums[8];
      int lane_sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        sums[j] = s_hist_tokens[tid * 8 + j];
        lane_sum += sums[j];
      }
      int run = below + WarpInclusiveScan(lane_sum) - lane_sum;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (run <= avail && run + sums[j] > avail) {
          s_prefix = (prefix << 8) | uint64_t(tid * 8 + j);
          s_below = run;
          s_bin_count = s_hist_count[tid * 8 + j];
        }
        run += sums[j];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    below = s_below;
    // Warp 0 writes these again only after two more barriers, which every
    // thread reaches after reading them.
    if (shift == 0 || s_bin_count == 1) break;
  }
  if (shift == 0) {
    if (tid == 0) s_miss = prefix;
  } else {
    for (int i = tid; i < n; i += kBlock) {
      if ((s_keys[i] >> shift) == prefix) s_miss = s_keys[i];
    }
  }
  if (tid == 0) s_tail_count = 0;
  __syncthreads();
  const uint64_t miss = s_miss;
  const int left = avail - below;
  for (int i = tid; i < n; i += kBlock) {
    const uint64_t key = s_keys[i];
    const int tokens = s_fresh[i];
    s_taken[i] = key < miss && tokens > 0 ? 1 : 0;
    if (key > miss && tokens > 0 && tokens <= left) {
      s_tail[atomicAdd(&s_tail_count, 1)] = key;
    }
  }
  __syncthreads();
  const int tail = s_tail_count;
  int capacity = 1;
  while (capacity < tail) capacity <<= 1;
  for (int i = tail + tid; i < capacity; i += kBlock) s_tail[i] = ~uint64_t{0};
  __syncthreads();
  if (tail > 1) BlockBitonicSort<kBlock>(s_tail, capacity);
  __shared__ int s_rest;
  if (tid < 32) {
    const int rest = WarpGreedyTail(s_tail, 0, tail, s_fresh, s_taken, left);
    if (tid == 0) s_rest = rest;
  }
  __syncthreads();
  return s_rest;
}

// Writes the fresh rows of the warp's 32 pages: lane l holds a page's
// fresh-row mask (0: none), first row and first place in `out`. The
// half-warps take the pages in turn, a lane a row of each 16-row chunk, so
// that the rows leave in 64-byte stores. (ncu: a thread a page, writing
// its rows one by one, had made 77 % of the kernel's sectors excess ones.)
__device__ void WarpWriteRows(int32_t* out, uint64_t mask, int first_row,
                              int at) {
  const int lane = threadIdx.x % 32;
  const int half_lane = lane & 15;
#pragma unroll 4
  for (int step = 0; step < 16; ++step) {
    const int src = 2 * step + (lane >> 4);
    const uint64_t m = __shfl_sync(kFullMask, mask, src);
    const int row0 = __shfl_sync(kFullMask, first_row, src);
    int place = __shfl_sync(kFullMask, at, src);
    for (int chunk = 0; chunk < 64 && (m >> chunk) != 0; chunk += 16) {
      const uint32_t bits = uint32_t(m >> chunk) & 0xffffu;
      if ((bits >> half_lane) & 1u) {
        out[place + __popc(bits & ((1u << half_lane) - 1u))] =
            row0 + chunk + half_lane;
      }
      place += __popc(bits);
    }
  }
}

struct SelectArgs {
  int sort_capacity;  // power of two ≥ every candidate count
  SelectPagesInputs in;
  SelectPagesOutputs out;
  SelectPagesRows rows;
  bool compact;
};

// Up to kBlock candidates (the block's threads): a candidate a thread,
// everything it needs (score, fresh tokens, fresh-row mask, first row) loaded
// at once and kept in registers; the sort in registers and shuffles, the prefix
// and the rows' places by block scans of one value a thread. At 255 candidates
// a stream this replaced a chain of eight dependent trips to memory. `s_keys`,
// `s_fresh` and `s_taken` have room for kBlock.
template <int kBlock>
__device__ void SelectOneAThread(const SelectArgs& args, int n,
                                 uint64_t* s_keys, int* s_fresh,
                                 uint8_t* s_taken) {
  __shared__ int s_warp[kBlock / 32];
  __shared__ int s_miss, s_miss_before, s_left;
  const int stream = blockIdx.x;
  const int tid = threadIdx.x;
  const int begin = args.in.candidate_begin[stream];
  const int always_in = args.in.always_in_tokens[stream];
  const int budget = args.in.budget_tokens[stream];
  const bool mine = tid < n;
  float score = 0.0f;
  int tokens = 0;
  uint64_t mask = 0;
  int first_row = 0;
  if (mine) {
    score = args.in.scores[begin + tid];
    tokens = args.in.fresh_tokens[begin + tid];
    if (args.compact) {
      mask = args.rows.candidate_fresh_mask[begin + tid];
      first_row = args.rows.candidate_first_row[begin + tid];
    }
  }
  int32_t* out = nullptr;
  if (args.compact) {
    out = args.rows.rows + args.rows.rows_begin[stream];
    const int32_t* always =
        args.rows.always_in_rows + args.rows.always_in_begin[stream];
    for (int i = tid; i < always_in; i += kBlock) out[i] = always[i];
  }
  if (mine) {
    s_fresh[tid] = tokens;
    s_taken[tid] = 0;
  }
  if (tid == 0) {  // no miss when nothing is a candidate
    s_miss = n;
    s_miss_before = 0;
  }
  // Block sum of the tokens (the last thread's inclusive scan).
  __shared__ int s_total;
  const int running = BlockInclusiveScanOne(tokens, s_warp);
  if (tid == kBlock - 1) s_total = running;
  __syncthreads();
  const int total = s_total;
  const bool dense = always_in + total <= budget;
  int selected_tokens = always_in + total;
  bool taken = mine;  // dense: every page
  if (!dense) {
    // Sort (score descending, index ascending): partners within a warp by
    // shuffles, across warps through shared memory (2 barriers a stage).
    int capacity = 1;
    while (capacity < n) capacity <<= 1;
    uint64_t key = mine ? SortKey(score, tid) : ~uint64_t{0};
    // Warps past the capacity hold no keys and only keep the barriers;
    // the shuffle stages are unrolled (ncu: the sort had been 61 % of the
    // kernel's instructions at 255 candidates).
    const bool sorting = tid - tid % 32 < capacity;
    for (int k = 2; k <= capacity; k <<= 1) {
      for (int j = k >> 1; j >= 32; j >>= 1) {
        if (tid < capacity) s_keys[tid] = key;
        __syncthreads();
        const uint64_t partner = tid < capacity ? s_keys[tid ^ j] : key;
        __syncthreads();
        const bool lower = (tid & j) == 0;
        const bool ascending = (tid & k) == 0;
        key = lower == ascending ? min(key, partner) : max(key, partner);
      }
      if (sorting) {
        const bool ascending = (tid & k) == 0;
#pragma unroll
        for (int j = 16; j > 0; j >>= 1) {
          if (j < k) {
            const uint64_t partner = __shfl_xor_sync(kFullMask, key, j);
            const bool lower = (tid & j) == 0;
            key = lower == ascending ? min(key, partner) : max(key, partner);
          }
        }
      }
    }
    if (tid < capacity) s_keys[tid] = key;
    // Thread j now holds the j-th page of the order: the greedy takes
    // every page whose prefix of tokens fits, up to the first that does
    // not (the miss).
    const int index = int(uint32_t(key));
    const int sorted_tokens = mine ? s_fresh[index] : 0;
    const int incl = BlockInclusiveScanOne(sorted_tokens, s_warp);
    const int avail = budget - always_in;
    if (mine && incl <= avail && sorted_tokens > 0) s_taken[index] = 1;
    if (mine && incl > avail && incl - sorted_tokens <= avail) {
      s_miss = tid;
      s_miss_before = incl - sorted_tokens;
    }
    __syncthreads();
    if (tid < 32) {
      const int left = WarpGreedyTail(s_keys, s_miss, n, s_fresh, s_taken,
                                      avail - s_miss_before);
      if (tid == 0) s_left = left;
    }
    __syncthreads();
    selected_tokens = budget - s_left;
    taken = mine && s_taken[tid] != 0;
  }
  if (mine) args.out.selected[begin + tid] = taken ? 1 : 0;
  if (tid == 0) {
    args.out.selected_tokens[stream] = selected_tokens;
    if (args.out.dense != nullptr) args.out.dense[stream] = dense ? 1 : 0;
  }
  if (!args.compact) return;
  // Rows: always-in first, then taken pages' fresh rows in page order.
  const int rows = taken ? __popcll(mask) : 0;
  const int rows_incl = BlockInclusiveScanOne(rows, s_warp);
  WarpWriteRows(out, taken ? mask : 0, first_row, always_in + rows_incl - rows);
  if (tid == kBlock - 1) args.rows.rows_count[stream] = always_in + rows_incl;
}

template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    SelectPagesKernel(const SelectArgs args) {
  WaitForPriorGrids();  // the scores
  LetDependentsLaunch();
  // [sort_capacity] keys, then (radix path) as many tail keys, tokens and
  // taken flags.
  extern __shared__ uint64_t s_keys[];
  uint64_t* s_tail = s_keys + args.sort_capacity;
  int* s_tokens = reinterpret_cast<int*>(
      s_tail + (args.sort_capacity > kBlock ? args.sort_capacity : 0));
  uint8_t* s_taken = reinterpret_cast<uint8_t*>(s_tokens + args.sort_capacity);
  __shared__ int s_warp[kBlock / 32];
  __shared__ int s_total;
  __shared__ int s_left;

  const int stream = blockIdx.x;
  const int tid = threadIdx.x;
  const int n = args.in.candidate_count[stream];
  if (n <= kBlock) {
    SelectOneAThread<kBlock>(args, n, s_keys, s_tokens, s_taken);
    return;
  }
  const int begin = args.in.candidate_begin[stream];
  const int always_in = args.in.always_in_tokens[stream];
  const int budget = args.in.budget_tokens[stream];
  const int* fresh = args.in.fresh_tokens + begin;

  // Dense: everything fits, every page taken, no score read.
  if (tid == 0) s_total = 0;
  __syncthreads();
  int local = 0;
  for (int i = tid; i < n; i += kBlock) local += fresh[i];
  for (int off = 16; off > 0; off >>= 1) {
    local += __shfl_xor_sync(kFullMask, local, off);
  }
  if (tid % 32 == 0) atomicAdd(&s_total, local);
  __syncthreads();
  const bool dense = always_in + s_total <= budget;
  int selected_tokens = 0;
  if (dense) {
    for (int i = tid; i < n; i += kBlock) s_taken[i] = 1;
    selected_tokens = always_in + s_total;
  } else {
    for (int i = tid; i < n; i += kBlock) {
      s_keys[i] = SortKey(args.in.scores[begin + i], i);
      s_tokens[i] = fresh[i];
    }
    __syncthreads();
    const int left = RadixSelect<kBlock>(s_keys, s_tokens, n,
                                         budget - always_in, s_taken, s_tail);
    if (tid == 0) s_left = left;
    __syncthreads();
    selected_tokens = budget - s_left;
  }
  __syncthreads();
  for (int i = tid; i < n; i += kBlock) {
    args.out.selected[begin + i] = s_taken[i];
  }
  if (tid == 0) {
    args.out.selected_tokens[stream] = selected_tokens;
    if (args.out.dense != nullptr) args.out.dense[stream] = dense ? 1 : 0;
  }
  if (!args.compact) return;

  // Rows: always-in first, then taken candidates' fresh rows in order.
  const SelectPagesRows& rows = args.rows;
  int32_t* out = rows.rows + rows.rows_begin[stream];
  const int32_t* always = rows.always_in_rows + rows.always_in_begin[stream];
  for (int i = tid; i < always_in; i += kBlock) out[i] = always[i];
  // The taken candidates, listed (in any order) over the keys, which are
  // no longer needed.
  int* s_list = reinterpret_cast<int*>(s_keys);
  __shared__ int s_listed;
  if (tid == 0) s_listed = 0;
  __syncthreads();
  for (int i = tid; i < n; i += kBlock) {
    int tokens = 0;
    if (s_taken[i]) {
      tokens = __popcll(rows.candidate_fresh_mask[begin + i]);
      s_list[atomicAdd(&s_listed, 1)] = i;
    }
    s_tokens[i] = tokens;
  }
  __syncthreads();
  BlockInclusiveScan<kBlock>(s_tokens, n, s_warp);
  // Each thread loads one listed page's mask, first row and place at once,
  // and its warp writes the rows of its 32.
  const int listed = s_listed;
  for (int first = 0; first < listed; first += kBlock) {
    const int j = first + tid;
    uint64_t mask = 0;
    int first_row = 0;
    int at = 0;
    if (j < listed) {
      const int i = s_list[j];
      mask = rows.candidate_fresh_mask[begin + i];
      first_row = rows.candidate_first_row[begin + i];
      at = always_in + (i == 0 ? 0 : s_tokens[i - 1]);
    }
    WarpWriteRows(out, mask, first_row, at);
  }
  if (tid == 0)
    rows.rows_count[stream] = always_in + (n == 0 ? 0 : s_tokens[n - 1]);
}

// Streams of at most kSmallBlock candidates (a 4K-token cascade has 255):
// half the threads, so half the warps that idle through the sort's
// barriers and the scans.
constexpr int kSmallBlock = 256;

__global__ void __launch_bounds__(kSmallBlock)
    SelectPagesSmallKernel(const SelectArgs args) {
  WaitForPriorGrids();  // the scores
  LetDependentsLaunch();
  __shared__ uint64_t s_keys[kSmallBlock];
  __shared__ int s_fresh[kSmallBlock];
  __shared__ uint8_t s_taken[kSmallBlock];
  SelectOneAThread<kSmallBlock>(args, args.in.candidate_count[blockIdx.x],
                                s_keys, s_fresh, s_taken);
}

}  // namespace

absl::Status SelectPages(const SelectPagesShape& shape,
                         const SelectPagesInputs& inputs,
                         const SelectPagesOutputs& outputs,
                         const SelectPagesRows& rows, cudaStream_t stream) {
  if (shape.streams < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams: ", shape.streams, ", want >= 1"));
  }
  if (shape.max_candidates_per_stream < 1 ||
      shape.max_candidates_per_stream > kMaxSelectCandidates) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_candidates_per_stream: ", shape.max_candidates_per_stream,
        ", want 1..", kMaxSelectCandidates));
  }
  if (inputs.scores == nullptr || inputs.fresh_tokens == nullptr ||
      inputs.candidate_begin == nullptr || inputs.candidate_count == nullptr ||
      inputs.always_in_tokens == nullptr || inputs.budget_tokens == nullptr) {
    return absl::InvalidArgumentError(
        "inputs: scores, fresh_tokens, candidate_begin, candidate_count, "
        "always_in_tokens and budget_tokens must all be set");
  }
  if (outputs.selected == nullptr || outputs.selected_tokens == nullptr) {
    return absl::InvalidArgumentError(
        "outputs: selected and selected_tokens must be set");
  }
  if (shape.compact_rows &&
      (rows.always_in_rows == nullptr || rows.always_in_begin == nullptr ||
       rows.candidate_first_row == nullptr ||
       rows.candidate_fresh_mask == nullptr || rows.rows_begin == nullptr ||
       rows.rows == nullptr || rows.rows_count == nullptr)) {
    return absl::InvalidArgumentError(
        "rows: every field must be set when shape.compact_rows");
  }
  SelectArgs args;
  args.in = inputs;
  args.out = outputs;
  args.rows = rows;
  args.compact = shape.compact_rows;
  if (shape.max_candidates_per_stream <= kSmallBlock) {
    args.sort_capacity = kSmallBlock;
    void* kernel_args[] = {&args};
    if (absl::Status launched = LaunchAfterPrior(
            reinterpret_cast<const void*>(&SelectPagesSmallKernel),
            dim3(shape.streams), dim3(kSmallBlock), 0, stream, kernel_args);
        !launched.ok()) {
      return launched;
    }
    KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("SelectPagesSmallKernel");
    return absl::OkStatus();
  }
  args.sort_capacity = PowerOfTwoAtLeast(shape.max_candidates_per_stream);
  const int block =
      shape.max_candidates_per_stream <= kMidBlock ? kMidBlock : kLargeBlock;
  const void* kernel =
      block == kMidBlock
          ? reinterpret_cast<const void*>(&SelectPagesKernel<kMidBlock>)
          : reinterpret_cast<const void*>(&SelectPagesKernel<kLargeBlock>);
  // Keys, tokens and taken flags; above a block's candidates also the
  // radix path's tail keys.
  const size_t smem = size_t(args.sort_capacity) *
                      (sizeof(uint64_t) * (args.sort_capacity > block ? 2 : 1) +
                       sizeof(int) + sizeof(uint8_t));
  if (absl::Status allowed = AllowDynamicSharedMemory(kernel, smem);
      !allowed.ok()) {
    return allowed;
  }
  void* kernel_args[] = {&args};
  if (absl::Status launched = LaunchAfterPrior(
          kernel, dim3(shape.streams), dim3(block), smem, stream, kernel_args);
      !launched.ok()) {
    return launched;
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("SelectPagesKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
