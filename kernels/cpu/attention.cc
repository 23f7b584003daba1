// CPU attention: keys and values converted to fp32 once, then two plain
// passes per query row (logits and max, then weights and sums).
#include "kernels/attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/dtype.h"

namespace kvmem::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows of `view` for head dim D, or INVALID_ARGUMENT naming `name`.
absl::StatusOr<int64_t> RowsOf(const HeadRowsView& view, int head_dim,
                               const char* name) {
  const size_t row_bytes =
      static_cast<size_t>(head_dim) * DTypeBytes(view.dtype);
  if (view.bytes.size() % row_bytes != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ", view.bytes.size(),
                     " bytes, want a multiple of ", row_bytes));
  }
  return static_cast<int64_t>(view.bytes.size() / row_bytes);
}

absl::Status WantSize(const char* name, size_t got, size_t want) {
  if (got == want) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(name, ": ", got, " floats, want ", want));
}

// `view` as fp32: [rows, D].
std::vector<float> ToFloats(const HeadRowsView& view, int64_t rows,
                            int head_dim) {
  std::vector<float> floats(static_cast<size_t>(rows) * head_dim);
  LoadFloats(view.bytes.data(), view.dtype, absl::MakeSpan(floats));
  return floats;
}

// Attention of one query row `q` [D] over key/value rows [0, n) of `keys`
// and `values` ([≥ n, D] fp32). Writes out [D], *lse, and probs [n] unless
// null. `logits` is scratch with room for n.
void AttendRow(const float* q, const float* keys, const float* values,
               int64_t n, int head_dim, float scale, float* logits, float* out,
               float* lse, float* probs) {
  for (int i = 0; i < head_dim; ++i) out[i] = 0.0f;
  if (n == 0) {
    *lse = kNegInf;
    return;
  }
  float max_logit = kNegInf;
  for (int64_t t = 0; t < n; ++t) {
    const float* k = keys + t * head_dim;
    // Eight partial sums in a fixed order, then a fixed pairwise fold: the
    // same bits every run, and a loop the compiler can vectorise (a single
    // running sum cannot be reordered without -ffast-math).
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= head_dim; i += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += q[i + l] * k[i + l];
    }
    float dot = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < head_dim; ++i) dot += q[i] * k[i];
    logits[t] = scale * dot;
    if (logits[t] > max_logit) max_logit = logits[t];
  }
  // Subtracting the max keeps every exp in (0, 1]: no overflow, and the
  // largest weight is exactly 1.
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float weight = std::exp(logits[t] - max_logit);
    logits[t] = weight;
    sum += weight;
    const float* v = values + t * head_dim;
    for (int i = 0; i < head_dim; ++i) out[i] += weight * v[i];
  }
  for (int i = 0; i < head_dim; ++i) out[i] /= sum;
  *lse = max_logit + std::log(sum);
  if (probs != nullptr) {
    for (int64_t t = 0; t < n; ++t) probs[t] = logits[t] / sum;
  }
}

// Checks shared by both entry points; on success sets the row counts.
absl::Status CheckInputs(const HeadRowsView& queries, const HeadRowsView& keys,
                         const HeadRowsView& values, int head_dim,
                         float softmax_scale, int64_t* query_rows,
                         int64_t* key_rows) {
  if (head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim: ", head_dim, ", want >= 1"));
  }
  if (!std::isfinite(softmax_scale) || softmax_scale <= 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax_scale: ", softmax_scale, ", want > 0"));
  }
  absl::StatusOr<int64_t> q_rows = RowsOf(queries, head_dim, "queries");
  if (!q_rows.ok()) return q_rows.status();
  absl::StatusOr<int64_t> k_rows = RowsOf(keys, head_dim, "keys");
  if (!k_rows.ok()) return k_rows.status();
  absl::StatusOr<int64_t> v_rows = RowsOf(values, head_dim, "values");
  if (!v_rows.ok()) return v_rows.status();
  if (*q_rows == 0) return absl::InvalidArgumentError("queries: no rows");
  if (*k_rows != *v_rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "values: ", *v_rows, " rows, want ", *k_rows, " (as keys)"));
  }
  *query_rows = *q_rows;
  *key_rows = *k_rows;
  return absl::OkStatus();
}

}  // namespace

absl::Status Attend(const HeadRowsView& queries, const HeadRowsView& keys,
                    const HeadRowsView& values, int head_dim,
                    float softmax_scale, absl::Span<float> out,
                    absl::Span<float> lse, absl::Span<float> probs) {
  int64_t group = 0;
  int64_t n = 0;
  absl::Status valid =
      CheckInputs(queries, keys, values, head_dim, softmax_scale, &group, &n);
  if (!valid.ok()) return valid;
  valid = WantSize("out", out.size(), group * head_dim);
  if (valid.ok()) valid = WantSize("lse", lse.size(), group);
  if (valid.ok() && !probs.empty()) {
    valid = WantSize("probs", probs.size(), group * n);
  }
  if (!valid.ok()) return valid;
  const std::vector<float> q = ToFloats(queries, group, head_dim);
  const std::vector<float> k = ToFloats(keys, n, head_dim);
  const std::vector<float> v = ToFloats(values, n, head_dim);
  std::vector<float> logits(n);
  for (int64_t g = 0; g < group; ++g) {
    AttendRow(q.data() + g * head_dim, k.data(), v.data(), n, head_dim,
              softmax_scale, logits.data(), out.data() + g * head_dim, &lse[g],
              probs.empty() ? nullptr : probs.data() + g * n);
  }
  return absl::OkStatus();
}

absl::Status AttendCausalChunk(const HeadRowsView& queries,
                               const HeadRowsView& keys,
                               const HeadRowsView& values, int head_dim,
                               int group_size, int64_t cache_rows,
                               float softmax_scale, absl::Span<float> out,
                               absl::Span<float> lse, absl::Span<float> probs) {
  int64_t query_rows = 0;
  int64_t n = 0;
  absl::Status valid = CheckInputs(queries, keys, values, head_dim,
                                   softmax_scale, &query_rows, &n);
  if (!valid.ok()) return valid;
  if (group_size < 1 || cache_rows < 0 || query_rows % group_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group_size: ", group_size, ", cache_rows: ", cache_rows,
                     ", ", query_rows,
                     " query rows; want group_size >= 1 dividing the query "
                     "rows and cache_rows >= 0"));
  }
  const int64_t chunk = query_rows / group_size;
  if (n != cache_rows + chunk) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys: ", n, " rows, want cache_rows + T = ", cache_rows,
                     " + ", chunk));
  }
  valid = WantSize("out", out.size(), query_rows * head_dim);
  if (valid.ok()) valid = WantSize("lse", lse.size(), query_rows);
  if (valid.ok() && !probs.empty()) {
    valid = WantSize("probs", probs.size(), query_rows * n);
  }
  if (!valid.ok()) return valid;
  const std::vector<float> q = ToFloats(queries, query_rows, head_dim);
  const std::vector<float> k = ToFloats(keys, n, head_dim);
  const std::vector<float> v = ToFloats(values, n, head_dim);
  std::vector<float> logits(n);
  for (int64_t t = 0; t < chunk; ++t) {
    const int64_t visible = cache_rows + t + 1;  // the prefix and 0..t
    for (int64_t g = 0; g < group_size; ++g) {
      const int64_t row = t * group_size + g;
      float* row_probs = probs.empty() ? nullptr : probs.data() + row * n;
      AttendRow(q.data() + row * head_dim, k.data(), v.data(), visible,
                head_dim, softmax_scale, logits.data(),
                out.data() + row * head_dim, &lse[row], row_probs);
      if (row_probs != nullptr) {
        for (int64_t u = visible; u < n; ++u) row_probs[u] = 0.0f;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status MergeAttention(absl::Span<const float> out1,
                            absl::Span<const float> lse1,
                            absl::Span<const float> out2,
                            absl::Span<const float> lse2, absl::Span<float> out,
                            absl::Span<float> lse) {
  const size_t rows = lse1.size();
  if (lse2.size() != rows || lse.size() != rows ||
      (rows == 0 && !out1.empty()) ||
      (rows != 0 && (out1.empty() || out1.size() % rows != 0)) ||
      out2.size() != out1.size() || out.size() != out1.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("merge: lse sizes ", lse1.size(), ", ", lse2.size(), ", ",
                     lse.size(), "; out sizes ", out1.size(), ", ", out2.size(),
                     ", ", out.size(), "; want R lse and R*D out each"));
  }
  const size_t head_dim = rows == 0 ? 0 : out1.size() / rows;
  for (size_t r = 0; r < rows; ++r) {
    const float l1 = lse1[r];
    const float l2 = lse2[r];
    const size_t row = r * head_dim;
    if (l1 == kNegInf || l2 == kNegInf) {
      // An empty side is the identity: copy the other side exactly (its
      // 0 · o would turn a NaN-filled unused buffer into NaN). Two empty
      // sides give the empty result, o = 0 and lse = −∞.
      const bool take_second = l1 == kNegInf && l2 != kNegInf;
      const bool both_empty = l1 == kNegInf && l2 == kNegInf;
      for (size_t i = 0; i < head_dim; ++i) {
        out[row + i] = both_empty    ? 0.0f
                       : take_second ? out2[row + i]
                                     : out1[row + i];
      }
      lse[r] = take_second ? l2 : l1;
      continue;
    }
    const float top = l1 > l2 ? l1 : l2;
    const float merged =
        top + std::log(std::exp(l1 - top) + std::exp(l2 - top));
    const float w1 = std::exp(l1 - merged);
    const float w2 = std::exp(l2 - merged);
    for (size_t i = 0; i < head_dim; ++i) {
      out[row + i] = w1 * out1[row + i] + w2 * out2[row + i];
    }
    lse[r] = merged;
  }
  return absl::OkStatus();
}

}  // namespace kvmem::cpu
