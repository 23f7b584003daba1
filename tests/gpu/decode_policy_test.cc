// The device-owned policy's own kernels (kernels/cuda/decode_policy.h)
// against the host policy they replace, on fresh random streams: cascades
// stepped by the CPU oracle (CascadeStream) for 3 to 400 tokens, so rings
// are empty, partly filled and wrapped. Checked:
// - PlanDecodeCandidates: the always-in ids (sinks, cascade 0's newest
//   `recent`, the new token), each cascade page's fresh mask, and every
//   candidate's score bit for bit against cpu::ScorePages (MAX over the
//   group, as StreamState::Select); sealed and open spilled pages likewise.
// - RefreshChangedDigests: the pages of the changed slots against
//   cpu::ComputePageDigest over their occupied rows, others untouched
//   (poisoned before).
// - MapSelectedRows and ScatterSlotProbs: ids to pool rows and slots, and
//   the probabilities back per slot (0 elsewhere), the new token's apart.
#include "kernels/cuda/decode_policy.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cascade_policy.h"
#include "kernels/page_digest.h"
#include "kernels/page_score.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Download;
using testing::Poisoned;
using testing::Upload;

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

constexpr int kS = 5, kC = 3, kW = 32, kP = 8, kRecent = 6, kG = 4;
const int kTokens[] = {3, 20, 60, 150, 400};

struct Fixture {
  DecodePolicyShape shape;
  int D = 0;
  DType dtype = DType::kBf16;
  std::vector<CascadeStream> streams;
  // Host copies of what the device holds, per stream.
  std::vector<std::vector<float>> digests;         // [pages, 2, D]
  std::vector<std::vector<float>> sealed_digests;  // [sealed, 2, D]
  std::vector<int> open_tokens;
  std::vector<std::vector<float>> open_digests;  // [2, D]
  std::vector<uint8_t> queries;                  // [B, G, D] dtype
  std::vector<uint8_t> pool_keys;                // [B·slots, D]: slot rows

  int B() const { return int(streams.size()); }
  int slots() const { return shape.slots(); }
};

// The digest of one page over its occupied slots (absent: none occupied).
bool HostDigest(const CascadeStream& c, int first, int count, int d,
                DType dtype, std::vector<float>* digest) {
  std::vector<uint8_t> occupied(size_t(count), 0);
  bool any = false;
  for (int s = 0; s < count; ++s) {
    occupied[s] = c.slot_position(first + s) >= 0;
    any = any || occupied[s];
  }
  digest->assign(size_t(2) * d, 0.0f);
  if (!any) return false;
  const size_t row = size_t(d) * DTypeBytes(dtype);
  absl::Span<const uint8_t> keys(c.key_row(first).data(), count * row);
  EXPECT_TRUE(cpu::ComputePageDigest(keys, dtype, d, occupied, DigestKind(),
                                     absl::MakeSpan(*digest))
                  .ok());
  return true;
}

Fixture Make(int d, DType dtype, std::mt19937& rng) {
  Fixture f;
  f.D = d;
  f.dtype = dtype;
  f.shape.streams = int(std::size(kTokens));
  f.shape.sinks = kS;
  f.shape.cascades = kC;
  f.shape.window = kW;
  f.shape.page_tokens = kP;
  f.shape.recent_tokens = kRecent;
  f.shape.group = kG;
  f.shape.head_dim = d;
  f.shape.dtype = dtype;
  CascadeParams params;
  params.sinks = kS;
  params.cascades = kC;
  params.window = kW;
  params.beta = 0.99;
  const int row = d * DTypeBytes(dtype);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int tokens : kTokens) {
    CascadeStream c = *CascadeStream::Create(params, row);
    for (int t = 0; t < tokens; ++t) {
      std::vector<float> probs(size_t(c.num_slots()));
      for (float& p : probs) p = unit(rng) * 0.01f;
      std::vector<float> self = {unit(rng) * 0.01f}, initial(1);
      EXPECT_TRUE(c.UpdateScores(1, probs, self, absl::MakeSpan(initial)).ok());
      const std::vector<uint8_t> k = testing::RandomRows(size_t(d), dtype, rng);
      const std::vector<uint8_t> v = testing::RandomRows(size_t(d), dtype, rng);
      InsertResult result;
      EXPECT_TRUE(c.InsertTokens(t, 1, k, v, initial, &result).ok());
    }
    f.streams.push_back(std::move(c));
  }
  std::uniform_int_distribution<int> sealed(0, 3), open(0, kP - 1);
  for (const CascadeStream& c : f.streams) {
    std::vector<float> all;
    for (int p = 0; p < f.shape.pages(); ++p) {
      const int first = p < f.shape.sink_pages()
                            ? p * kP
                            : kS + (p - f.shape.sink_pages()) * kP;
      const int count =
          p < f.shape.sink_pages() ? std::min(kP, kS - first) : kP;
      std::vector<float> digest;
      if (!HostDigest(c, first, count, d, dtype, &digest)) {
        std::fill(digest.begin(), digest.end(), 1e30f);  // stale, unread
      }
      all.insert(all.end(), digest.begin(), digest.end());
    }
    f.digests.push_back(all);
    const std::vector<uint8_t> raw =
        testing::RandomRows(size_t(sealed(rng)) * 2 * d, DType::kFp32, rng);
    std::vector<float> s(raw.size() / 4);
    std::memcpy(s.data(), raw.data(), raw.size());
    f.sealed_digests.push_back(s);
    f.open_tokens.push_back(open(rng));
    const std::vector<uint8_t> o =
        testing::RandomRows(size_t(2) * d, DType::kFp32, rng);
    std::vector<float> od(size_t(2) * d);
    std::memcpy(od.data(), o.data(), o.size());
    f.open_digests.push_back(od);
    f.pool_keys.insert(f.pool_keys.end(), c.all_keys().begin(),
                       c.all_keys().end());
  }
  f.queries = testing::RandomRows(size_t(f.B()) * kG * d, dtype, rng);
  return f;
}

// The device side of a fixture: each stream's arrays, slot s of stream b at
// pool row b·slots + s.
struct DeviceSide {
  std::vector<DeviceBuffer> keep;
  std::vector<PolicyStreamPointers> pointers;
  DeviceBuffer pointer_array, pool;
};

DeviceSide Put(const Fixture& f, cudaStream_t stream) {
  DeviceSide d;
  d.pool = Upload(f.pool_keys, stream);
  for (int b = 0; b < f.B(); ++b) {
    const CascadeStream& c = f.streams[size_t(b)];
    CascadeStream::Snapshot snap = c.Export();
    std::vector<int32_t> stored(snap.stored.begin(), snap.stored.end());
    std::vector<int32_t> head(snap.head.begin(), snap.head.end());
    std::vector<int32_t> rows(size_t(f.slots()));
    for (int s = 0; s < f.slots(); ++s) rows[size_t(s)] = b * f.slots() + s;
    d.keep.push_back(Upload(snap.positions, stream));
    d.keep.push_back(Upload(stored, stream));
    d.keep.push_back(Upload(head, stream));
    d.keep.push_back(Upload(rows, stream));
    d.keep.push_back(Upload(f.digests[size_t(b)], stream));
    d.keep.push_back(Upload(f.sealed_digests[size_t(b)], stream));
    const size_t n = d.keep.size();
    PolicyStreamPointers p;
    p.positions = d.keep[n - 6].as<int64_t>();
    p.stored = d.keep[n - 5].as<int32_t>();
    p.head = d.keep[n - 4].as<int32_t>();
    p.slot_rows = d.keep[n - 3].as<int32_t>();
    p.digests = d.keep[n - 2].as<float>();
    p.sealed_digests = d.keep[n - 1].as<float>();
    d.pointers.push_back(p);
  }
  d.pointer_array = Upload(d.pointers, stream);
  return d;
}

TEST(DecodePolicyTest, CandidatesAndScoresMatchTheHostPolicy) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = testing::FreshSeed();
  std::mt19937 rng(seed);
  for (int d : {128, 100}) {
    SCOPED_TRACE(::testing::Message() << "D=" << d);
    const Fixture f = Make(d, DType::kBf16, rng);
    Stream stream = testing::MakeStream();
    DeviceSide dev = Put(f, stream.get());
    const int B = f.B(), Rc = f.shape.cascade_pages();
    std::vector<int32_t> spilled_begin, sealed_count, candidate_begin;
    std::vector<float> open_digests;
    int spilled = 0;
    for (int b = 0; b < B; ++b) {
      spilled_begin.push_back(spilled);
      candidate_begin.push_back(b * Rc + spilled);
      sealed_count.push_back(int(f.sealed_digests[size_t(b)].size()) / (2 * d));
      spilled += sealed_count.back() + (f.open_tokens[size_t(b)] > 0 ? 1 : 0);
      open_digests.insert(open_digests.end(), f.open_digests[size_t(b)].begin(),
                          f.open_digests[size_t(b)].end());
    }
    const size_t candidates = size_t(B) * Rc + spilled;
    DeviceBuffer d_sbegin = Upload(spilled_begin, stream.get());
    DeviceBuffer d_sealed = Upload(sealed_count, stream.get());
    DeviceBuffer d_open = Upload(f.open_tokens, stream.get());
    DeviceBuffer d_odig = Upload(open_digests, stream.get());
    DeviceBuffer d_cbegin = Upload(candidate_begin, stream.get());
    DeviceBuffer d_queries = Upload(f.queries, stream.get());
    DeviceBuffer scores = Poisoned<float>(candidates, stream.get());
    DeviceBuffer fresh = Poisoned<int32_t>(candidates, stream.get());
    DeviceBuffer first = Poisoned<int32_t>(candidates, stream.get());
    DeviceBuffer mask = Poisoned<uint64_t>(candidates, stream.get());
    const int A = f.shape.always_capacity();
    DeviceBuffer always = Poisoned<int32_t>(size_t(B) * A, stream.get());
    DeviceBuffer always_count = Poisoned<int32_t>(size_t(B), stream.get());
    PlanCandidatesArgs args;
    args.streams = dev.pointer_array.as<PolicyStreamPointers>();
    args.queries = d_queries.get();
    args.spilled_begin = d_sbegin.as<int32_t>();
    args.sealed_count = d_sealed.as<int32_t>();
    args.open_tokens = d_open.as<int32_t>();
    args.open_digests = d_odig.as<float>();
    args.candidate_begin = d_cbegin.as<int32_t>();
    args.scores = scores.as<float>();
    args.fresh_tokens = fresh.as<int32_t>();
    args.first_id = first.as<int32_t>();
    args.fresh_mask = mask.as<uint64_t>();
    args.always_in_ids = always.as<int32_t>();
    args.always_in_count = always_count.as<int32_t>();
    for (int b = 0; b < B; ++b) {
      args.max_candidates = std::max(
          args.max_candidates, Rc + sealed_count[size_t(b)] +
                                   (f.open_tokens[size_t(b)] > 0 ? 1 : 0));
    }
    ASSERT_TRUE(PlanDecodeCandidates(f.shape, args, stream.get()).ok());
    const auto got_scores = Download<float>(scores, candidates, stream);
    const auto got_fresh = Download<int32_t>(fresh, candidates, stream);
    const auto got_first = Download<int32_t>(first, candidates, stream);
    const auto got_mask = Download<uint64_t>(mask, candidates, stream);
    const auto got_always = Download<int32_t>(always, size_t(B) * A, stream);
    const auto got_count = Download<int32_t>(always_count, size_t(B), stream);

    for (int b = 0; b < B; ++b) {
      SCOPED_TRACE(::testing::Message()
                   << "stream " << b << " (" << kTokens[b] << " tokens)");
      const CascadeStream& c = f.streams[size_t(b)];
      const int64_t base = int64_t(b) * f.slots();
      // Always in, in the kernel's order: sinks, recent oldest first, new.
      std::vector<int32_t> want_always;
      std::vector<uint8_t> is_always(size_t(f.slots()), 0);
      for (int s = 0; s < kS; ++s) {
        if (c.slot_position(s) >= 0) want_always.push_back(int32_t(base + s));
      }
      const std::vector<int> c0 = c.CascadeSlots(0);
      for (int i = std::max(0, int(c0.size()) - kRecent); i < int(c0.size());
           ++i) {
        want_always.push_back(int32_t(base + c0[size_t(i)]));
        is_always[size_t(c0[size_t(i)])] = 1;
      }
      want_always.push_back(kNewTokenId);
      ASSERT_EQ(got_count[size_t(b)], int(want_always.size()));
      EXPECT_TRUE(std::equal(want_always.begin(), want_always.end(),
                             got_always.begin() + size_t(b) * A));
      // Queries as the host holds them (fp32), the group's bound by MAX.
      std::vector<float> q(size_t(kG) * d);
      for (int i = 0; i < kG * d; ++i) {
        q[size_t(i)] =
            LoadElement(f.queries.data(), f.dtype, int64_t(b) * kG * d + i);
      }
      auto host_score = [&](const float* digest) {
        float out = 0.0f;
        EXPECT_TRUE(cpu::ScorePages(q, d,
                                    absl::MakeConstSpan(digest, size_t(2) * d),
                                    DigestKind(), GroupReduction::kMax,
                                    absl::MakeSpan(&out, 1))
                        .ok());
        return out;
      };
      for (int k = 0; k < Rc; ++k) {
        const size_t at = size_t(candidate_begin[size_t(b)] + k);
        const int first_slot = kS + k * kP;
        uint64_t want_mask = 0;
        for (int j = 0; j < kP; ++j) {
          const int s = first_slot + j;
          if (c.slot_position(s) >= 0 && !is_always[size_t(s)]) {
            want_mask |= uint64_t{1} << j;
          }
        }
        EXPECT_EQ(got_mask[at], want_mask) << "page " << k;
        EXPECT_EQ(got_fresh[at], __builtin_popcountll(want_mask));
        EXPECT_EQ(got_first[at], int32_t(base + first_slot));
        const float want = host_score(&f.digests[size_t(
            b)][size_t(f.shape.sink_pages() + k) * 2 * size_t(d)]);
        if (want_mask != 0) {  // pages without tokens: any score
          EXPECT_EQ(Bits(got_scores[at]), Bits(want))
              << "page " << k << ": " << got_scores[at] << " vs " << want;
        }
      }
      const int sealed = sealed_count[size_t(b)];
      for (int i = 0; i < sealed + (f.open_tokens[size_t(b)] > 0 ? 1 : 0);
           ++i) {
        const size_t at = size_t(candidate_begin[size_t(b)] + Rc + i);
        const float* digest =
            i < sealed ? &f.sealed_digests[size_t(b)][size_t(i) * 2 * d]
                       : f.open_digests[size_t(b)].data();
        const int tokens = i < sealed ? kP : f.open_tokens[size_t(b)];
        EXPECT_EQ(Bits(got_scores[at]), Bits(host_score(digest)))
            << "spilled " << i;
        EXPECT_EQ(got_fresh[at], tokens);
        EXPECT_EQ(got_first[at],
                  kSpilledIdBase + (spilled_begin[size_t(b)] + i) * 64);
        EXPECT_EQ(got_mask[at], (uint64_t{1} << tokens) - 1);
      }
    }
  }
}

TEST(DecodePolicyTest, RefreshedDigestsMatchTheHostDigests) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = testing::FreshSeed();
  std::mt19937 rng(seed);
  const int d = 128;
  const Fixture f = Make(d, DType::kBf16, rng);
  Stream stream = testing::MakeStream();
  DeviceSide dev = Put(f, stream.get());
  const int B = f.B(), pages = f.shape.pages();
  // Digests poisoned; each stream names up to C changed slots, ascending.
  std::vector<DeviceBuffer> poisoned;
  for (int b = 0; b < B; ++b) {
    poisoned.push_back(Poisoned<float>(size_t(pages) * 2 * d, stream.get()));
    dev.pointers[size_t(b)].digests = poisoned.back().as<float>();
  }
  DeviceBuffer pointers = Upload(dev.pointers, stream.get());
  std::vector<int32_t> changed(size_t(B) * kC, -1);
  std::vector<int32_t> counts(static_cast<size_t>(B));
  std::uniform_int_distribution<int> slot(0, f.slots() - 1);
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> s;
    for (int i = 0; i < kC; ++i) s.push_back(slot(rng));
    s.push_back(0);  // a sink page too
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    s.resize(std::min<size_t>(s.size(), kC));
    counts[size_t(b)] = int(s.size());
    std::copy(s.begin(), s.end(), changed.begin() + size_t(b) * kC);
  }
  DeviceBuffer d_changed = Upload(changed, stream.get());
  DeviceBuffer d_counts = Upload(counts, stream.get());
  RefreshDigestsArgs args;
  args.streams = pointers.as<PolicyStreamPointers>();
  args.key_rows = dev.pool.get();
  args.changed_slots = d_changed.as<int32_t>();
  args.changed_counts = d_counts.as<int32_t>();
  ASSERT_TRUE(RefreshChangedDigests(f.shape, args, stream.get()).ok());
  for (int b = 0; b < B; ++b) {
    const auto got =
        Download<float>(poisoned[size_t(b)], size_t(pages) * 2 * d, stream);
    std::vector<uint8_t> refreshed(size_t(pages), 0);
    for (int c = 0; c < counts[size_t(b)]; ++c) {
      const int s = changed[size_t(b) * kC + c];
      refreshed[size_t(s < kS ? s / kP
                              : f.shape.sink_pages() + (s - kS) / kP)] = 1;
    }
    for (int p = 0; p < pages; ++p) {
      const int first = p < f.shape.sink_pages()
                            ? p * kP
                            : kS + (p - f.shape.sink_pages()) * kP;
      const int count =
          p < f.shape.sink_pages() ? std::min(kP, kS - first) : kP;
      std::vector<float> want;
      const bool any =
          HostDigest(f.streams[size_t(b)], first, count, d, f.dtype, &want);
      for (int i = 0; i < 2 * d; ++i) {
        const float g = got[size_t(p) * 2 * d + size_t(i)];
        if (refreshed[size_t(p)] && any) {
          ASSERT_EQ(Bits(g), Bits(want[size_t(i)]))
              << "stream " << b << " page " << p << " element " << i;
        } else {
          ASSERT_EQ(Bits(g), 0xffffffffu)  // untouched
              << "stream " << b << " page " << p << " element " << i;
        }
      }
    }
  }
}

TEST(DecodePolicyTest, SelectedIdsMapToRowsAndProbsGoBackToSlots) {
  KVMEM_REQUIRE_DEVICE();
  const uint32_t seed = testing::FreshSeed();
  std::mt19937 rng(seed);
  const Fixture f = Make(64, DType::kBf16, rng);
  Stream stream = testing::MakeStream();
  DeviceSide dev = Put(f, stream.get());
  const int B = f.B(), N = f.slots(), capacity = 40;
  // Per stream: some resident slots, spilled tokens of candidate b, the new
  // token; rows of spilled ids and new tokens made up.
  std::vector<int32_t> ids(size_t(B) * capacity, -7);
  std::vector<int32_t> counts(static_cast<size_t>(B));
  // Spilled candidate b (3 tokens taken) is staged from index 3b on; the
  // staging rows are made up.
  std::vector<int32_t> spilled_stage(static_cast<size_t>(B));
  std::vector<int32_t> staged_rows(size_t(B) * 3);
  std::vector<int32_t> new_rows(static_cast<size_t>(B));
  std::uniform_int_distribution<int> slot(0, N - 1);
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> list;
    std::vector<int> slots;
    for (int i = 0; i < 12; ++i) slots.push_back(slot(rng));
    std::sort(slots.begin(), slots.end());
    slots.erase(std::unique(slots.begin(), slots.end()), slots.end());
    for (int s : slots) list.push_back(b * N + s);
    for (int j = 0; j < 3; ++j) {
      list.push_back(kSpilledIdBase + b * 64 + j);
      spilled_stage[size_t(b)] = 3 * b;
      staged_rows[size_t(3 * b + j)] = 100000 + b * 10 + j;
    }
    list.push_back(kNewTokenId);
    new_rows[size_t(b)] = 200000 + b;
    std::shuffle(list.begin(), list.end(), rng);
    counts[size_t(b)] = int(list.size());
    std::copy(list.begin(), list.end(), ids.begin() + size_t(b) * capacity);
  }
  DeviceBuffer d_ids = Upload(ids, stream.get());
  DeviceBuffer d_counts = Upload(counts, stream.get());
  DeviceBuffer d_stage = Upload(spilled_stage, stream.get());
  DeviceBuffer d_staged = Upload(staged_rows, stream.get());
  DeviceBuffer d_new = Upload(new_rows, stream.get());
  DeviceBuffer pool_rows = Poisoned<int32_t>(ids.size(), stream.get());
  DeviceBuffer row_slots = Poisoned<int32_t>(ids.size(), stream.get());
  MapRowsArgs map;
  map.streams = dev.pointer_array.as<PolicyStreamPointers>();
  map.ids = d_ids.as<int32_t>();
  map.counts = d_counts.as<int32_t>();
  map.capacity = capacity;
  map.spilled_stage = d_stage.as<int32_t>();
  map.staged_rows = d_staged.as<int32_t>();
  map.new_token_rows = d_new.as<int32_t>();
  map.pool_rows = pool_rows.as<int32_t>();
  map.row_slots = row_slots.as<int32_t>();
  ASSERT_TRUE(MapSelectedRows(f.shape, map, stream.get()).ok());
  // Probabilities per row, then back per slot.
  std::vector<float> probs(ids.size());
  std::uniform_real_distribution<float> unit(0.01f, 1.0f);
  for (float& p : probs) p = unit(rng);
  DeviceBuffer d_probs = Upload(probs, stream.get());
  DeviceBuffer slot_probs = Poisoned<float>(size_t(B) * N, stream.get());
  DeviceBuffer self_probs = Poisoned<float>(size_t(B), stream.get());
  ScatterProbsArgs scatter;
  scatter.row_slots = row_slots.as<int32_t>();
  scatter.counts = d_counts.as<int32_t>();
  scatter.capacity = capacity;
  scatter.reduced_probs = d_probs.as<float>();
  scatter.slot_probs = slot_probs.as<float>();
  scatter.self_probs = self_probs.as<float>();
  ASSERT_TRUE(ScatterSlotProbs(f.shape, scatter, stream.get()).ok());
  const auto got_rows = Download<int32_t>(pool_rows, ids.size(), stream);
  const auto got_slots = Download<int32_t>(row_slots, ids.size(), stream);
  const auto got_probs = Download<float>(slot_probs, size_t(B) * N, stream);
  const auto got_self = Download<float>(self_probs, size_t(B), stream);
  for (int b = 0; b < B; ++b) {
    std::vector<float> want(size_t(N), 0.0f);
    for (int i = 0; i < counts[size_t(b)]; ++i) {
      const size_t at = size_t(b) * capacity + i;
      const int32_t id = ids[at];
      if (id == kNewTokenId) {
        EXPECT_EQ(got_rows[at], new_rows[size_t(b)]);
        EXPECT_EQ(got_slots[at], -2);
        EXPECT_EQ(Bits(got_self[size_t(b)]), Bits(probs[at]));
      } else if (id >= kSpilledIdBase) {
        const int rel = id - kSpilledIdBase;
        EXPECT_EQ(
            got_rows[at],
            staged_rows[size_t(spilled_stage[size_t(rel / 64)] + rel % 64)]);
        EXPECT_EQ(got_slots[at], -1);
      } else {
        const int s = id - b * N;
        EXPECT_EQ(got_rows[at], b * N + s);  // the fixture's slot rows
        EXPECT_EQ(got_slots[at], s);
        want[size_t(s)] = probs[at];
      }
    }
    for (int s = 0; s < N; ++s) {
      ASSERT_EQ(Bits(got_probs[size_t(b) * N + s]), Bits(want[size_t(s)]))
          << "stream " << b << " slot " << s;
    }
  }
}

}  // namespace
}  // namespace kvmem::cuda
