// A block per stream. Occupancy (stored/head) never depends on scores
// (cascade.md §2), so the insertion is planned before any score is read:
// 1. every thread updates the u of its share of the occupied cascade slots
//    (slot offsets below stored[i]: rings fill from their first slot), with
//    the mid-step and end-of-step renormalisations of UpdateScores folded
//    per slot (each u goes through the same rounded operations in the same
//    order as on the CPU, which also works slot by slot); all of a round's
//    loads are issued before its stores. Given the attended rows instead
//    of per-slot probabilities, only those slots change (an unattended
//    slot adds r = 0, which leaves u as it is), unless the step
//    renormalises;
// 2. thread 0 plans the insertion from stored/head alone: the chain of
//    slots the carry passes through (rules a, b, c) and the slot a rule-d
//    duel is against; threads then load those slots' positions, scores and
//    pool rows in parallel, and thread 0 swaps the carry along the chain
//    and decides the duel (CarryWinsDuel on the updated u);
// 3. the rows move: the new row to chain[0], the old row of chain[i] to
//    chain[i+1], the old row of chain[evict_from] out. A thread owns a few
//    16-byte (or 2-byte) columns and loads all of its old pieces before it
//    stores any, so no barrier is needed.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cascade_update.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/row_access.cuh"
#include "kernels/policy_math.h"

namespace kvmem::cuda {
namespace {

constexpr int kThreads = 256;
// Attended rows a thread keeps in registers in a sparse step.
constexpr int kSparseRowsPerThread = kMaxSparseStepRows / kThreads;
constexpr int kBatch = 16;         // cascade slots per thread per load round
constexpr int kRegisterChain = 8;  // chains up to this long move in registers
constexpr int kMaxRowBytes = 1 << 20;
// evict_from values besides a chain index.
constexpr int kEvictNone = -2;
constexpr int kEvictNewToken = -1;

struct UpdateArgs {
  int sinks;
  int cascades;
  int window;
  bool eager_fill;
  double beta;
  int64_t slots;
  int64_t row_bytes;
  CascadeDeviceState state;
  CascadeStepInputs in;
  CascadeStepOutputs out;
};

// What phase 2 leaves for phase 3, in shared memory.
struct Plan {
  int chain[kMaxUpdateCascades + 1];     // slots, in carry order
  int32_t rows[kMaxUpdateCascades + 1];  // their pool rows
  int64_t old_position[kMaxUpdateCascades + 1];
  float old_score[kMaxUpdateCascades + 1];
  // Before the step (read by phase 1 while thread 0 plans) and after it.
  int32_t stored[kMaxUpdateCascades];
  int32_t head[kMaxUpdateCascades];
  int32_t next_stored[kMaxUpdateCascades];
  int32_t next_head[kMaxUpdateCascades];
  int planned;    // chain slots of rules a, b and c (or the sink)
  int duel_slot;  // the newest slot of a rule-d duel, −1 when none
  bool dropped;   // rule b at cascade C−1: the last carry leaves
  int length;     // final chain length (the duel's winner included)
  int evict_from;
};

// Phase 3 for the keys and values of one stream, in `Unit` columns.
template <typename Unit>
__device__ __forceinline__ void MoveRows(const UpdateArgs& a, int64_t b,
                                         const Plan& plan) {
  const int64_t units = a.row_bytes / int64_t(sizeof(Unit));
  const int length = plan.length;
  const int evict_from = plan.evict_from;
  for (int64_t w = threadIdx.x; w < 2 * units; w += kThreads) {
    const bool value = w >= units;
    const int64_t c = value ? w - units : w;
    char* pool =
        static_cast<char*>(value ? a.state.value_rows : a.state.key_rows);
    const Unit* incoming =
        reinterpret_cast<const Unit*>(
            static_cast<const char*>(value ? a.in.values : a.in.keys) +
            b * a.row_bytes) +
        c;
    Unit* evicted =
        reinterpret_cast<Unit*>(static_cast<char*>(value ? a.out.evicted_values
                                                         : a.out.evicted_keys) +
                                b * a.row_bytes) +
        c;
    auto at = [&](int i) {
      return reinterpret_cast<Unit*>(pool +
                                     int64_t(plan.rows[i]) * a.row_bytes) +
             c;
    };
    const Unit fresh = *incoming;
    if (length <= kRegisterChain) {
      Unit old[kRegisterChain];
#pragma unroll
      for (int i = 0; i < kRegisterChain; ++i) {
        if (i < length) old[i] = *at(i);
      }
      Unit out = evict_from == kEvictNewToken ? fresh : Unit{};
#pragma unroll
      for (int i = 0; i < kRegisterChain; ++i) {
        if (i == evict_from) out = old[i];
      }
      *evicted = out;
#pragma unroll
      for (int i = 0; i + 1 < kRegisterChain; ++i) {
        if (i + 1 < length) *at(i + 1) = old[i];
      }
    } else {  // backwards, so each read precedes the write over it
      *evicted = evict_from == kEvictNone       ? Unit{}
                 : evict_from == kEvictNewToken ? fresh
                                                : *at(evict_from);
      for (int i = length - 1; i >= 1; --i) *at(i) = *at(i - 1);
    }
    if (length > 0) *at(0) = fresh;
  }
}

template <typename Unit>
__global__ void __launch_bounds__(kThreads)
    CascadeUpdateKernel(const UpdateArgs a) {
  __shared__ Plan plan;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t slot0 = b * a.slots;
  const int64_t c0 = b * a.cascades;
  // The stream's state: in the batch arrays, or where its pointers say.
  CascadeStreamPointers my;
  if (a.state.streams != nullptr) {
    my = a.state.streams[b];
  } else {
    my.positions = a.state.positions + slot0;
    my.scores = a.state.scores + slot0;
    my.stored = a.state.stored + c0;
    my.head = a.state.head + c0;
    my.score_exponent = a.state.score_exponent + b;
    my.tokens_seen = a.state.tokens_seen + b;
    my.slot_rows = a.state.slot_rows + slot0;
  }
  float* u = my.scores;
  int64_t* positions = my.positions;

  if (tid < a.cascades) {
    plan.stored[tid] = plan.next_stored[tid] = my.stored[tid];
    plan.head[tid] = plan.next_head[tid] = my.head[tid];
  }
  // Every thread derives the same factors (same address: one load a warp).
  const int64_t n = *my.score_exponent;
  const int64_t t = *my.tokens_seen;
  const bool sparse = a.in.row_slots != nullptr;
  const bool attended = a.in.probs != nullptr || sparse;
  __shared__ float s_self_prob;  // a sparse step's r of the new token
  if (tid == 0) s_self_prob = 0.0f;
  const bool mid = n > 0 && NeedsMidStepRenormalisation(a.beta, n + 1);
  const double mid_scale = mid ? ScoreScale(a.beta, n) : 1.0;
  const int64_t k = (mid ? 0 : n) + 1;  // n after the step
  const float factor = IncrementFactor(a.beta, k);
  const bool end = NeedsRenormalisation(a.beta, k);
  const double end_scale = end ? ScoreScale(a.beta, k) : 1.0;
  __syncthreads();

  // Phase 1: UpdateScores(1, ...). Cascade slot j (from the first
  // cascade's first slot) holds a token when its offset in its ring is
  // below the ring's count (rings fill from their first slot).
  const int cascade_slots = a.cascades * a.window;
  float* cu = u + a.sinks;
  auto held_slot = [&](int j) {
    return j >= 0 && j < cascade_slots &&
           j % a.window < plan.stored[j / a.window];
  };
  // One u through UpdateScores' rounded operations, in its order: the
  // mid-step renormalisation, r (when attended; r = 0 adds +0, so a slot
  // not attended may skip it), the end-of-step renormalisation.
  auto step_u = [&](float x, bool with_r, float r) {
    if (mid) x = RescaleScore(x, mid_scale);
    if (with_r) x = AccumulateScore(x, factor, r);
    if (end) x = RescaleScore(x, end_scale);
    return x;
  };
  if (sparse) {
    // The attended slots' old u, kept while a renormalisation rescales
    // every held slot (the others as if r = 0: AccumulateScore adds +0),
    // then written with their r folded in, in UpdateScores' order.
    // At most row_capacity (≤ kMaxSparseStepRows, what the registers hold).
    const int rows = min(a.in.row_counts[b], a.in.row_capacity);
    const size_t at = size_t(b) * a.in.row_capacity;
    int js[kSparseRowsPerThread];
    float x0[kSparseRowsPerThread];
    float rs[kSparseRowsPerThread];
#pragma unroll
    for (int i = 0; i < kSparseRowsPerThread; ++i) {
      const int r = tid + i * kThreads;
      js[i] = -1;
      if (r < rows) {
        const int slot = a.in.row_slots[at + r];
        rs[i] = a.in.row_probs[at + r];
        if (slot == -2) s_self_prob = rs[i];
        const int j = slot - a.sinks;
        if (slot >= a.sinks && held_slot(j)) {
          js[i] = j;
          x0[i] = cu[j];
        }
      }
    }
    if (mid || end) {
      __syncthreads();  // every attended u read before the rescale below
      for (int j = tid; j < cascade_slots; j += kThreads) {
        if (held_slot(j)) cu[j] = step_u(cu[j], false, 0.0f);
      }
      __syncthreads();  // before the attended slots are written again
    }
#pragma unroll
    for (int i = 0; i < kSparseRowsPerThread; ++i) {
      if (js[i] >= 0) cu[js[i]] = step_u(x0[i], true, rs[i]);
    }
  } else if (attended || mid || end) {
    const float* cr = attended ? a.in.probs + slot0 + a.sinks : nullptr;
    for (int j0 = tid; j0 < cascade_slots; j0 += kThreads * kBatch) {
      bool held[kBatch];
      float v[kBatch];
      float p[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int j = j0 + q * kThreads;
        held[q] = held_slot(j);
        v[q] = held[q] ? cu[j] : 0.0f;
        p[q] = held[q] && attended ? cr[j] : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        if (held[q]) cu[j0 + q * kThreads] = step_u(v[q], attended, p[q]);
      }
    }
  }

  // Phase 2a: plan InsertTokens(t, 1, ...) from occupancy alone.
  if (tid == 0) {
    int length = 0;
    int duel = -1;
    bool dropped = false;
    if (t < a.sinks) {  // rule 1: sink slot t
      plan.chain[length++] = int(t);
    } else {
      const int accepting =
          AcceptingCascades(t, a.sinks, a.cascades, a.window, a.eager_fill);
      bool placed = false;
      for (int i = 0; i < a.cascades && !placed; ++i) {
        const int base = a.sinks + i * a.window;
        const int held = plan.stored[i];
        if (i < accepting) {
          if (held < a.window) {  // a: append as newest
            plan.chain[length++] = base + held;
            plan.next_stored[i] = held + 1;
            placed = true;
          } else {  // b: overwrite the oldest, which carries on
            plan.chain[length++] = base + plan.head[i];
            plan.next_head[i] = (plan.head[i] + 1) % a.window;
          }
        } else if (held == 0) {  // c: empty, not accepting
          plan.chain[length++] = base;
          plan.next_stored[i] = 1;
          placed = true;
        } else {  // d: duel the newest
          duel = base + (plan.head[i] + held - 1) % held;
          placed = true;
        }
      }
      dropped = !placed;
    }
    plan.planned = length;
    plan.duel_slot = duel;
    plan.dropped = dropped;
  }
  // Also orders phase 1's score writes before phase 2b's reads.
  __syncthreads();

  // Phase 2b: the old contents of the chain and the duel slot, in parallel.
  const int planned = plan.planned;
  if (tid < a.cascades) {
    my.stored[tid] = plan.next_stored[tid];
    my.head[tid] = plan.next_head[tid];
  }
  if (tid < planned + (plan.duel_slot >= 0 ? 1 : 0)) {
    const int s = tid < planned ? plan.chain[tid] : plan.duel_slot;
    plan.old_position[tid] = positions[s];
    plan.old_score[tid] = u[s];
    plan.rows[tid] = my.slot_rows[s];
  }
  __syncthreads();

  // Phase 2c: swap the carry along the chain; the duel.
  if (tid == 0) {
    const float self_prob = !attended ? 0.0f
                            : sparse  ? s_self_prob
                                      : a.in.self_probs[b];
    const float initial = step_u(0.0f, attended, self_prob);
    *my.score_exponent = end ? 0 : k;
    *my.tokens_seen = t + 1;

    int64_t carry_position = t;
    float carry_score = initial;
    for (int i = 0; i < planned; ++i) {
      const int s = plan.chain[i];
      positions[s] = carry_position;
      u[s] = carry_score;
      carry_position = plan.old_position[i];
      carry_score = plan.old_score[i];
    }
    int length = planned;
    int leaves = kEvictNone;
    if (t < a.sinks) {
      u[t] = 0.0f;  // sinks keep no score
    } else if (plan.duel_slot >= 0) {
      // The carry's row is the old row of the last chain slot (cascade 0
      // always accepts, so length ≥ 1; length 0 would mean the new row).
      leaves = length - 1;
      if (CarryWinsDuel(carry_score, plan.old_score[planned])) {
        const int s = plan.duel_slot;
        positions[s] = carry_position;
        u[s] = carry_score;
        carry_position = plan.old_position[planned];
        plan.chain[length++] = s;  // rows[planned] is already its row
        leaves = length - 1;
      }
    } else if (plan.dropped) {
      leaves = length - 1;
    }
    a.out.evicted_positions[b] = leaves == kEvictNone ? -1 : carry_position;
    int32_t* changed = a.out.changed_slots + c0;
    for (int i = 0; i < a.cascades; ++i) {
      changed[i] = i < length ? plan.chain[i] : -1;
    }
    a.out.changed_counts[b] = length;
    plan.length = length;
    plan.evict_from = leaves;
  }
  __syncthreads();

  // Phase 3: the rows.
  MoveRows<Unit>(a, b, plan);
}

bool KnownDType(DType t) {
  return t == DType::kBf16 || t == DType::kFp16 || t == DType::kFp32;
}

}  // namespace

absl::Status CheckCascadeBatchShape(const CascadeBatchShape& shape) {
  if (shape.streams < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams: ", shape.streams, ", want >= 1"));
  }
  absl::Status valid = shape.params.Validate();
  if (!valid.ok()) return valid;
  if (shape.params.cascades > kMaxUpdateCascades) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cascades: ", shape.params.cascades, ", want <= ", kMaxUpdateCascades));
  }
  if (!KnownDType(shape.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dtype: ", static_cast<int>(shape.dtype), ", want bf16/fp16/fp32"));
  }
  const int64_t max_head_dim = kMaxRowBytes / DTypeBytes(shape.dtype);
  if (shape.head_dim < 1 || shape.head_dim > max_head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim: ", shape.head_dim, ", want in [1, ", max_head_dim, "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckCascadeDeviceState(const CascadeDeviceState& state,
                                     bool with_exponent) {
  if (state.key_rows == nullptr || state.value_rows == nullptr) {
    return absl::InvalidArgumentError(
        "state: key_rows and value_rows must be set");
  }
  if (state.streams == nullptr &&
      (state.positions == nullptr || state.scores == nullptr ||
       state.stored == nullptr || state.head == nullptr ||
       (with_exponent && state.score_exponent == nullptr) ||
       state.tokens_seen == nullptr || state.slot_rows == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("state: positions, scores, stored, head, ",
                     with_exponent ? "score_exponent, " : "",
                     "tokens_seen and slot_rows must all be set (or streams)"));
  }
  return absl::OkStatus();
}

absl::Status UpdateCascades(const CascadeBatchShape& shape,
                            const CascadeDeviceState& state,
                            const CascadeStepInputs& inputs,
                            const CascadeStepOutputs& outputs,
                            cudaStream_t stream) {
  absl::Status valid = CheckCascadeBatchShape(shape);
  if (!valid.ok()) return valid;
  if (absl::Status set = CheckCascadeDeviceState(state, /*with_exponent=*/true);
      !set.ok()) {
    return set;
  }
  if ((inputs.probs == nullptr) != (inputs.self_probs == nullptr)) {
    return absl::InvalidArgumentError(
        "inputs: set both probs and self_probs (a step with attention) or "
        "neither (without)");
  }
  if (inputs.row_slots != nullptr) {
    if (inputs.probs != nullptr || inputs.row_probs == nullptr ||
        inputs.row_counts == nullptr) {
      return absl::InvalidArgumentError(
          "inputs: row_slots need row_probs and row_counts, and exclude "
          "probs and self_probs");
    }
    if (inputs.row_capacity < 1 || inputs.row_capacity > kMaxSparseStepRows) {
      return absl::InvalidArgumentError(
          absl::StrCat("inputs.row_capacity: ", inputs.row_capacity,
                       ", want 1..", kMaxSparseStepRows));
    }
  }
  if (inputs.keys == nullptr || inputs.values == nullptr) {
    return absl::InvalidArgumentError("inputs: keys and values must be set");
  }
  if (outputs.evicted_positions == nullptr || outputs.evicted_keys == nullptr ||
      outputs.evicted_values == nullptr || outputs.changed_slots == nullptr ||
      outputs.changed_counts == nullptr) {
    return absl::InvalidArgumentError(
        "outputs: evicted_positions, evicted_keys, evicted_values, "
        "changed_slots and changed_counts must all be set");
  }
  UpdateArgs args;
  args.sinks = shape.params.sinks;
  args.cascades = shape.params.cascades;
  args.window = shape.params.window;
  args.eager_fill = shape.params.eager_fill;
  args.beta = shape.params.beta;
  args.slots = int64_t{shape.params.sinks} +
               int64_t{shape.params.cascades} * shape.params.window;
  args.row_bytes = int64_t{shape.head_dim} * DTypeBytes(shape.dtype);
  args.state = state;
  args.in = inputs;
  args.out = outputs;
  const bool vector = args.row_bytes % 16 == 0 && Aligned16(state.key_rows) &&
                      Aligned16(state.value_rows) && Aligned16(inputs.keys) &&
                      Aligned16(inputs.values) &&
                      Aligned16(outputs.evicted_keys) &&
                      Aligned16(outputs.evicted_values);
  // Rows are whole elements of 2 or 4 bytes, so 2-byte units always fit.
  if (vector) {
    CascadeUpdateKernel<uint4>
        <<<dim3(shape.streams), kThreads, 0, stream>>>(args);
  } else {
    CascadeUpdateKernel<uint16_t>
        <<<dim3(shape.streams), kThreads, 0, stream>>>(args);
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("CascadeUpdateKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
