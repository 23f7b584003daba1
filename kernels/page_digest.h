// Quest page digests (specs/quest.md §1, selection.md § Pages): a small
// summary of a page's keys from which page_score.h bounds q·k over the page.
// Thread-safe (pure functions).
//
// Layout of one page's digest: [2, D] fp32. Row 0 is "low", row 1 "high".
// - ABSOLUTE (keys stored after rotary): low = per-channel min, high =
//   per-channel max of the page's occupied keys. Exact, since min and max
//   only pick stored values, all of which fp32 represents.
// - CACHE_RANK (keys stored before rotary, rotated later at positions not
//   known now): for both channels a, b of each rotary pair, high = the
//   largest pair norm ‖(k_a, k_b)‖ over the page, rounded up to fp32 so it
//   never understates a norm, and low = −high. Channels outside the pairs
//   keep min/max. Writing −high into low keeps Quest's formula valid on
//   this digest too (a looser bound), so no consumer can misread it.
// Digests are seeded from the page's first key, never from sentinels; a
// page with no occupied slot has no digest and is not a candidate.
#ifndef KVMEM_KERNELS_PAGE_DIGEST_H_
#define KVMEM_KERNELS_PAGE_DIGEST_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"
#include "kernels/rotary.h"

namespace kvmem {

inline constexpr int kDigestRows = 2;  // low row, then high row

// Which bound the digests serve (DESIGN.md § Positions mode).
struct DigestKind {
  bool rotation_invariant = false;  // false: ABSOLUTE; true: CACHE_RANK
  // Read only when rotation_invariant: the channels in rotary pairs (even,
  // ≤ D) and how they pair up, as RotaryParams gives them.
  int rotated_dims = 0;
  RotaryPairing pairing = RotaryPairing::kHalfSplit;

  // OK, or INVALID_ARGUMENT naming the bad field.
  absl::Status Validate(int head_dim) const;
};

// The CACHE_RANK digest kind for a model's rotary parameters.
// INVALID_ARGUMENT when `rotary` is invalid for `head_dim`.
absl::StatusOr<DigestKind> RotationInvariantDigestKind(
    const RotaryParams& rotary, int head_dim);

namespace cpu {

// Digest of one page from its key rows.
// - keys: [rows, D] little-endian in `dtype`, rows = keys.size() / (D·e).
// - occupied: [rows], nonzero = the slot holds a key; empty = all occupied.
// - digest: [2, D] fp32, written on success only.
// INVALID_ARGUMENT: a size mismatch (the message names it), an invalid
// `kind`, or no occupied row (an empty page has no digest).
absl::Status ComputePageDigest(absl::Span<const uint8_t> keys, DType dtype,
                               int head_dim, absl::Span<const uint8_t> occupied,
                               const DigestKind& kind,
                               absl::Span<float> digest);

// Digests of consecutive pages of `page_tokens` rows over keys [n, D]
// (dtype bytes); the last page may be partial. digests: [ceil(n/P), 2, D]
// fp32. INVALID_ARGUMENT as ComputePageDigest, or P < 1; on error nothing
// is written.
absl::Status ComputePageDigests(absl::Span<const uint8_t> keys, DType dtype,
                                int head_dim, int page_tokens,
                                const DigestKind& kind,
                                absl::Span<float> digests);

// Incremental maintenance while a page only gains keys (an open spill page,
// a page being appended to). `key`: [D] fp32. Seed overwrites `digest`
// ([2, D] fp32) with the digest of `key` alone; Extend folds `key` into an
// existing digest. The result equals ComputePageDigest over the same keys.
// INVALID_ARGUMENT on a size mismatch or an invalid `kind` (no change).
absl::Status SeedPageDigest(absl::Span<const float> key, const DigestKind& kind,
                            absl::Span<float> digest);
absl::Status ExtendPageDigest(absl::Span<const float> key,
                              const DigestKind& kind, absl::Span<float> digest);

}  // namespace cpu
}  // namespace kvmem

#endif  // KVMEM_KERNELS_PAGE_DIGEST_H_
