// A block per stream: sort (score descending, index ascending) with a
// bitonic network (in registers and shuffles up to 512 candidates, else in
// shared memory), take the prefix of the sorted order
// that fits (an inclusive scan of fresh tokens), then let one warp finish
// the greedy rule after the first page that did not fit (pages that fit
// what is left, in order; few, since what is left is under a page).

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/select_pages.h"

namespace kvmem::cuda {
namespace {

constexpr int kThreads = 512;
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

// In-place inclusive scan of a[0..len) by the whole block.
__device__ void BlockInclusiveScan(int* a, int len, int* s_warp) {
  const int tid = threadIdx.x;
  const int per = (len + kThreads - 1) / kThreads;
  const int first = tid * per;
  const int last = min(len, first + per);
  int sum = 0;
  for (int i = first; i < last; ++i) sum += a[i];
  const int lane = tid % 32;
  const int warp = tid / 32;
  int incl = sum;
  for (int off = 1; off < 32; off <<= 1) {
    const int up = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += up;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kThreads / 32 ? s_warp[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int up = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += up;
    }
    if (lane < kThreads / 32) s_warp[lane] = w;
  }
  __syncthreads();
  int running = incl - sum + (warp > 0 ? s_warp[warp - 1] : 0);
  for (int i = first; i < last; ++i) {
    running += a[i];
    a[i] = running;
  }
  __syncthreads();
}

struct SelectArgs {
  int sort_capacity;  // power of two ≥ every candidate count
  SelectPagesInputs in;
  SelectPagesOutputs out;
  SelectPagesRows rows;
  bool compact;
};

__global__ void __launch_bounds__(kThreads)
    SelectPagesKernel(const SelectArgs args) {
  extern __shared__ uint64_t s_keys[];  // [sort_capacity]
  int* s_tokens = reinterpret_cast<int*>(s_keys + args.sort_capacity);
  uint8_t* s_taken = reinterpret_cast<uint8_t*>(s_tokens + args.sort_capacity);
  __shared__ int s_warp[kThreads / 32];
  __shared__ int s_total;
  __shared__ int s_first_miss;
  __shared__ int s_left;

  const int stream = blockIdx.x;
  const int tid = threadIdx.x;
  const int n = args.in.candidate_count[stream];
  const int begin = args.in.candidate_begin[stream];
  const int always_in = args.in.always_in_tokens[stream];
  const int budget = args.in.budget_tokens[stream];
  const int* fresh = args.in.fresh_tokens + begin;

  // Dense: everything fits, every page taken, no score read.
  if (tid == 0) s_total = 0;
  __syncthreads();
  int local = 0;
  for (int i = tid; i < n; i += kThreads) local += fresh[i];
  for (int off = 16; off > 0; off >>= 1) {
    local += __shfl_xor_sync(kFullMask, local, off);
  }
  if (tid % 32 == 0) atomicAdd(&s_total, local);
  __syncthreads();
  const bool dense = always_in + s_total <= budget;
  int selected_tokens = 0;
  if (dense) {
    for (int i = tid; i < n; i += kThreads) s_taken[i] = 1;
    selected_tokens = always_in + s_total;
  } else {
    int capacity = 1;
    while (capacity < n) capacity <<= 1;
    if (capacity <= kThreads) {
      // A key a thread, in registers: partners within a warp by shuffles,
      // across warps through shared memory (2 barriers a stage, 12 stages
      // of 36 at 256 candidates). The same network as below.
      uint64_t key =
          tid < n ? SortKey(args.in.scores[begin + tid], tid) : ~uint64_t{0};
      for (int k = 2; k <= capacity; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
          uint64_t partner;
          if (j >= 32) {  // threads past the capacity hold no key
            if (tid < capacity) s_keys[tid] = key;
            __syncthreads();
            partner = tid < capacity ? s_keys[tid ^ j] : key;
            __syncthreads();
          } else {
            partner = __shfl_xor_sync(kFullMask, key, j);
          }
          const bool lower = (tid & j) == 0;
          const bool ascending = (tid & k) == 0;
          key = lower == ascending ? min(key, partner) : max(key, partner);
        }
      }
      if (tid < capacity) s_keys[tid] = key;
      __syncthreads();
    } else {
      for (int i = tid; i < capacity; i += kThreads) {
        s_keys[i] =
            i < n ? SortKey(args.in.scores[begin + i], i) : ~uint64_t{0};
      }
      __syncthreads();
      for (int k = 2; k <= capacity; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
          for (int i = tid; i < capacity; i += kThreads) {
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
    for (int i = tid; i < n; i += kThreads) {
      s_tokens[i] = fresh[uint32_t(s_keys[i])];
      s_taken[i] = 0;
    }
    if (tid == 0) s_first_miss = n;
    __syncthreads();
    BlockInclusiveScan(s_tokens, n, s_warp);
    const int avail = budget - always_in;
    // The greedy takes every page up to the first prefix over the budget.
    for (int i = tid; i < n; i += kThreads) {
      const int incl = s_tokens[i];
      const int before = i == 0 ? 0 : s_tokens[i - 1];
      if (incl > avail && before <= avail) s_first_miss = i;
    }
    __syncthreads();
    const int miss = s_first_miss;
    for (int i = tid; i < miss; i += kThreads) {
      const int before = i == 0 ? 0 : s_tokens[i - 1];
      s_taken[uint32_t(s_keys[i])] = s_tokens[i] > before ? 1 : 0;
    }
    // s_taken is indexed by candidate; pages from `miss` on start untaken.
    __syncthreads();
    if (tid < 32) {
      int left = avail - (miss == 0 ? 0 : s_tokens[miss - 1]);
      for (int base = miss; base < n && left > 0; base += 32) {
        const int i = base + tid;
        const int index = i < n ? int(uint32_t(s_keys[i])) : 0;
        const int tokens = i < n ? fresh[index] : 0;
        bool fits = i < n && tokens > 0 && tokens <= left;
        unsigned ballot = __ballot_sync(kFullMask, fits);
        while (ballot != 0) {
          const int lane = __ffs(ballot) - 1;
          const int taken_tokens = __shfl_sync(kFullMask, tokens, lane);
          if (tid == lane) s_taken[index] = 1;
          left -= taken_tokens;
          fits = fits && tid > lane && tokens <= left;
          ballot = __ballot_sync(kFullMask, fits);
        }
      }
      if (tid == 0) s_left = left;
    }
    __syncthreads();
    selected_tokens = budget - s_left;
  }
  __syncthreads();
  for (int i = tid; i < n; i += kThreads) {
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
  for (int i = tid; i < always_in; i += kThreads) out[i] = always[i];
  for (int i = tid; i < n; i += kThreads) {
    s_tokens[i] =
        s_taken[i] ? __popcll(rows.candidate_fresh_mask[begin + i]) : 0;
  }
  __syncthreads();
  BlockInclusiveScan(s_tokens, n, s_warp);
  for (int i = tid; i < n; i += kThreads) {
    if (!s_taken[i]) continue;
    uint64_t mask = rows.candidate_fresh_mask[begin + i];
    const int first_row = rows.candidate_first_row[begin + i];
    int at = always_in + (i == 0 ? 0 : s_tokens[i - 1]);
    while (mask != 0) {
      const int j = __ffsll(static_cast<long long>(mask)) - 1;
      out[at++] = first_row + j;
      mask &= mask - 1;
    }
  }
  if (tid == 0)
    rows.rows_count[stream] = always_in + (n == 0 ? 0 : s_tokens[n - 1]);
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
  args.sort_capacity = PowerOfTwoAtLeast(shape.max_candidates_per_stream);
  args.in = inputs;
  args.out = outputs;
  args.rows = rows;
  args.compact = shape.compact_rows;
  const size_t smem = size_t(args.sort_capacity) *
                      (sizeof(uint64_t) + sizeof(int) + sizeof(uint8_t));
  if (absl::Status allowed = AllowDynamicSharedMemory(
          reinterpret_cast<const void*>(&SelectPagesKernel), smem);
      !allowed.ok()) {
    return allowed;
  }
  SelectPagesKernel<<<shape.streams, kThreads, smem, stream>>>(args);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("SelectPagesKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
