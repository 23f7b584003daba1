// CPU digests: plain loops over the page's occupied key rows.
#include "kernels/page_digest.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/dtype.h"

namespace kvmem {
namespace {

// ‖(a, b)‖ rounded up to fp32: the digest must never understate a norm,
// or the page bound could fall below a true q·k.
float PairNormRoundedUp(float a, float b) {
  const double norm =
      std::sqrt(static_cast<double>(a) * a + static_cast<double>(b) * b);
  float f = static_cast<float>(norm);
  if (static_cast<double>(f) < norm) f = std::nextafter(f, INFINITY);
  return f;
}

absl::Status CheckDigestSize(int head_dim, size_t digest_size) {
  if (digest_size != static_cast<size_t>(kDigestRows) * head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "digest: ", digest_size, " floats, want ", kDigestRows * head_dim));
  }
  return absl::OkStatus();
}

// Folds `key` [D] into `digest` [2, D]; `seed` starts from `key` alone.
void FoldKey(const float* key, int head_dim, const DigestKind& kind, bool seed,
             float* digest) {
  float* low = digest;
  float* high = digest + head_dim;
  int first_plain = 0;  // channels below this are in rotary pairs
  if (kind.rotation_invariant) {
    first_plain = kind.rotated_dims;
    for (int i = 0; i < kind.rotated_dims / 2; ++i) {
      int a = 0;
      int b = 0;
      RotaryPairChannels(kind.pairing, kind.rotated_dims, i, &a, &b);
      const float norm = PairNormRoundedUp(key[a], key[b]);
      const float largest = seed ? norm : std::max(high[a], norm);
      high[a] = high[b] = largest;
      low[a] = low[b] = -largest;
    }
  }
  for (int c = first_plain; c < head_dim; ++c) {
    low[c] = seed ? key[c] : std::min(low[c], key[c]);
    high[c] = seed ? key[c] : std::max(high[c], key[c]);
  }
}

}  // namespace

absl::Status DigestKind::Validate(int head_dim) const {
  if (head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim: ", head_dim, ", want >= 1"));
  }
  if (!rotation_invariant) return absl::OkStatus();
  if (rotated_dims < 2 || rotated_dims > head_dim || rotated_dims % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("digest.rotated_dims: ", rotated_dims,
                     ", want even, >= 2 and <= head dim ", head_dim));
  }
  if (pairing != RotaryPairing::kHalfSplit &&
      pairing != RotaryPairing::kInterleaved) {
    return absl::InvalidArgumentError(absl::StrCat(
        "digest.pairing: ", static_cast<int>(pairing), ", want 0 or 1"));
  }
  return absl::OkStatus();
}

absl::StatusOr<DigestKind> RotationInvariantDigestKind(
    const RotaryParams& rotary, int head_dim) {
  absl::Status valid = rotary.Validate(head_dim);
  if (!valid.ok()) return valid;
  DigestKind kind;
  kind.rotation_invariant = true;
  kind.rotated_dims = rotary.RotatedDims(head_dim);
  kind.pairing = rotary.pairing;
  return kind;
}

namespace cpu {
namespace {

// Checks shared by both digest entry points: a valid `kind`, and key bytes
// that are whole rows. The number of rows.
absl::StatusOr<size_t> CheckKeys(absl::Span<const uint8_t> keys, DType dtype,
                                 int head_dim, const DigestKind& kind) {
  absl::Status valid = kind.Validate(head_dim);
  if (!valid.ok()) return valid;
  const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeBytes(dtype);
  if (keys.size() % row_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "keys: ", keys.size(), " bytes, want a multiple of ", row_bytes));
  }
  return keys.size() / row_bytes;
}

}  // namespace

absl::Status ComputePageDigest(absl::Span<const uint8_t> keys, DType dtype,
                               int head_dim, absl::Span<const uint8_t> occupied,
                               const DigestKind& kind,
                               absl::Span<float> digest) {
  absl::StatusOr<size_t> key_rows = CheckKeys(keys, dtype, head_dim, kind);
  if (!key_rows.ok()) return key_rows.status();
  const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeBytes(dtype);
  const size_t rows = *key_rows;
  if (!occupied.empty() && occupied.size() != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("occupied: ", occupied.size(), " entries, want ", rows));
  }
  absl::Status valid = CheckDigestSize(head_dim, digest.size());
  if (!valid.ok()) return valid;
  std::vector<float> key(head_dim);
  std::vector<float> result(digest.size());
  bool seeded = false;
  for (size_t r = 0; r < rows; ++r) {
    if (!occupied.empty() && occupied[r] == 0) continue;
    LoadFloats(keys.data() + r * row_bytes, dtype, absl::MakeSpan(key));
    FoldKey(key.data(), head_dim, kind, !seeded, result.data());
    seeded = true;
  }
  if (!seeded) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page of ", rows, " slots has no occupied slot: no digest"));
  }
  std::copy(result.begin(), result.end(), digest.begin());
  return absl::OkStatus();
}

absl::Status ComputePageDigests(absl::Span<const uint8_t> keys, DType dtype,
                                int head_dim, int page_tokens,
                                const DigestKind& kind,
                                absl::Span<float> digests) {
  if (page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_tokens: ", page_tokens, ", want >= 1"));
  }
  absl::StatusOr<size_t> key_rows = CheckKeys(keys, dtype, head_dim, kind);
  if (!key_rows.ok()) return key_rows.status();
  const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeBytes(dtype);
  const size_t rows = *key_rows;
  const size_t pages = (rows + page_tokens - 1) / page_tokens;
  const size_t digest_floats = static_cast<size_t>(kDigestRows) * head_dim;
  if (digests.size() != pages * digest_floats) {
    return absl::InvalidArgumentError(
        absl::StrCat("digests: ", digests.size(), " floats, want ",
                     pages * digest_floats, " (", pages, " pages)"));
  }
  for (size_t p = 0; p < pages; ++p) {
    const size_t first = p * page_tokens;
    const size_t count = std::min<size_t>(page_tokens, rows - first);
    // Cannot fail: sizes and kind were checked above and count >= 1.
    absl::Status page = ComputePageDigest(
        keys.subspan(first * row_bytes, count * row_bytes), dtype, head_dim, {},
        kind, digests.subspan(p * digest_floats, digest_floats));
    if (!page.ok()) return page;
  }
  return absl::OkStatus();
}

absl::Status SeedPageDigest(absl::Span<const float> key, const DigestKind& kind,
                            absl::Span<float> digest) {
  const int head_dim = static_cast<int>(key.size());
  absl::Status valid = kind.Validate(head_dim);
  if (!valid.ok()) return valid;
  valid = CheckDigestSize(head_dim, digest.size());
  if (!valid.ok()) return valid;
  FoldKey(key.data(), head_dim, kind, /*seed=*/true, digest.data());
  return absl::OkStatus();
}

absl::Status ExtendPageDigest(absl::Span<const float> key,
                              const DigestKind& kind,
                              absl::Span<float> digest) {
  const int head_dim = static_cast<int>(key.size());
  absl::Status valid = kind.Validate(head_dim);
  if (!valid.ok()) return valid;
  valid = CheckDigestSize(head_dim, digest.size());
  if (!valid.ok()) return valid;
  FoldKey(key.data(), head_dim, kind, /*seed=*/false, digest.data());
  return absl::OkStatus();
}

}  // namespace cpu
}  // namespace kvmem
