// ScorePages against cpu::ScorePages (bit for bit: the per-head bound is
// shared), SelectPages against cpu::FillSelection (identical selections:
// the scores are identical, so there is no near-tie to forgive), and the
// compaction of the selected rows. Sweeps D 64/128, P 1/3/16, stream
// lengths 1/7/65/4099, G 1/4, both digest kinds and the digest dtypes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/page_scores.h"
#include "kernels/cuda/select_pages.h"
#include "kernels/page_digest.h"
#include "kernels/page_score.h"
#include "kernels/selection.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Download;
using testing::Poisoned;
using testing::Upload;

const std::vector<int> kLengths = {1, 7, 65, 4099};

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct ScoreCase {
  int head_dim;
  int page_tokens;
  int group;
  DType dtype;
  bool rotation_invariant;
  DType digest_dtype;
  GroupReduction reduction = GroupReduction::kMax;
};

// Scores every page of one stream per length on both backends; returns the
// CPU scores per stream through `cpu_scores` for the selection test.
void RunScoreCase(const ScoreCase& c, std::mt19937& rng,
                  std::vector<std::vector<float>>* cpu_scores) {
  SCOPED_TRACE(::testing::Message()
               << "D=" << c.head_dim << " P=" << c.page_tokens
               << " G=" << c.group << " " << testing::DTypeName(c.dtype)
               << (c.rotation_invariant ? " pair-norm" : " quest")
               << " digests " << testing::DTypeName(c.digest_dtype)
               << (c.reduction == GroupReduction::kMax ? " max" : " sum"));
  const int d = c.head_dim;
  const int streams = static_cast<int>(kLengths.size());
  DigestKind kind;
  if (c.rotation_invariant) {
    kind.rotation_invariant = true;
    kind.rotated_dims = d - 2 * (d / 8);  // some channels left unrotated
    kind.rotated_dims -= kind.rotated_dims % 2;
    kind.pairing =
        d == 64 ? RotaryPairing::kInterleaved : RotaryPairing::kHalfSplit;
  }
  const size_t digest_floats = size_t(2) * d;
  std::vector<float> all_digests;  // [pages, 2, D] fp32, all streams
  std::vector<int32_t> candidate_pages;
  std::vector<int32_t> begin(streams);
  std::vector<int32_t> count(streams);
  std::vector<std::vector<uint8_t>> stream_queries;
  std::vector<uint8_t> queries;
  cpu_scores->assign(streams, {});
  std::vector<std::vector<float>> stream_digests(streams);
  for (int s = 0; s < streams; ++s) {
    const int n = kLengths[s];
    const int pages = (n + c.page_tokens - 1) / c.page_tokens;
    const std::vector<uint8_t> keys =
        testing::RandomRows(size_t(n) * d, c.dtype, rng);
    stream_digests[s].resize(pages * digest_floats);
    ASSERT_TRUE(cpu::ComputePageDigests(keys, c.dtype, d, c.page_tokens, kind,
                                        absl::MakeSpan(stream_digests[s]))
                    .ok());
    // Candidates in shuffled digest order, so the index map is exercised.
    const int first_page = static_cast<int>(all_digests.size() / digest_floats);
    all_digests.insert(all_digests.end(), stream_digests[s].begin(),
                       stream_digests[s].end());
    begin[s] = static_cast<int32_t>(candidate_pages.size()) + 1;
    candidate_pages.push_back(-1);  // a gap entry, never scored
    for (int p = 0; p < pages; ++p) candidate_pages.push_back(first_page + p);
    count[s] = pages;
    const std::vector<uint8_t> q =
        testing::RandomRows(size_t(c.group) * d, c.dtype, rng, -2.0f, 2.0f);
    queries.insert(queries.end(), q.begin(), q.end());
    std::vector<float> q32(size_t(c.group) * d);
    for (size_t i = 0; i < q32.size(); ++i)
      q32[i] = LoadElement(q.data(), c.dtype, int64_t(i));
    (*cpu_scores)[s].resize(pages);
    ASSERT_TRUE(cpu::ScorePages(q32, d, stream_digests[s], kind, c.reduction,
                                absl::MakeSpan((*cpu_scores)[s]))
                    .ok());
  }
  // Digests in the chosen dtype (exact for ABSOLUTE: min/max are keys).
  std::vector<uint8_t> digest_bytes(all_digests.size() *
                                    DTypeBytes(c.digest_dtype));
  for (size_t i = 0; i < all_digests.size(); ++i) {
    StoreElement(digest_bytes.data(), c.digest_dtype, int64_t(i),
                 all_digests[i]);
  }
  Stream stream = testing::MakeStream();
  DeviceBuffer d_queries = Upload(queries, stream.get());
  DeviceBuffer d_digests = Upload(digest_bytes, stream.get());
  DeviceBuffer d_pages = Upload(candidate_pages, stream.get());
  DeviceBuffer d_begin = Upload(begin, stream.get());
  DeviceBuffer d_count = Upload(count, stream.get());
  DeviceBuffer d_scores = Poisoned<float>(candidate_pages.size(), stream.get());
  PageScoreShape shape;
  shape.streams = streams;
  shape.group = c.group;
  shape.head_dim = d;
  shape.query_dtype = c.dtype;
  shape.digest_dtype = c.digest_dtype;
  shape.kind = kind;
  shape.reduction = c.reduction;
  shape.max_candidates_per_stream =
      *std::max_element(count.begin(), count.end());
  PageScoreInputs in;
  in.queries = d_queries.get();
  in.digests = d_digests.get();
  in.candidate_pages = d_pages.as<int32_t>();
  in.candidate_begin = d_begin.as<int32_t>();
  in.candidate_count = d_count.as<int32_t>();
  ASSERT_TRUE(ScorePages(shape, in, d_scores.as<float>(), stream.get()).ok());
  const std::vector<float> scores =
      Download<float>(d_scores, candidate_pages.size(), stream);
  for (int s = 0; s < streams; ++s) {
    int bad = 0;
    for (int p = 0; p < count[s]; ++p) {
      const float got = scores[begin[s] + p];
      const float want = (*cpu_scores)[s][p];
      if (Bits(got) != Bits(want) && ++bad <= 5) {
        ADD_FAILURE() << "stream " << s << " page " << p << ": " << got
                      << " vs " << want;
      }
    }
    EXPECT_EQ(bad, 0);
    EXPECT_TRUE(std::isnan(scores[begin[s] - 1])) << "gap before stream " << s;
  }
}

TEST(PageScoresTest, BitsMatchCpu) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  std::vector<std::vector<float>> unused;
  for (int d : {64, 128}) {
    for (int p : {1, 3, 16}) {
      for (int g : {1, 4}) {
        for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
          RunScoreCase({d, p, g, t, false, DType::kFp32}, rng, &unused);
          RunScoreCase({d, p, g, t, false, t}, rng, &unused);  // narrow digests
          RunScoreCase({d, p, g, t, true, DType::kFp32}, rng, &unused);
        }
      }
    }
  }
}

// Groups of 2, 3 and 8 (8 lanes a head, so a page spans one or two warps),
// the SUM reduction (added in head order), D with a tail past the last 8
// channels, D 128 (compiled for its G), the largest D, and a row that does
// not split into 16-byte pieces (the one-thread-a-page kernel).
TEST(PageScoresTest, BitsMatchCpuOtherGroupsAndWidths) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  std::vector<std::vector<float>> unused;
  for (int d : {100, 128, 256, 6}) {
    for (int g : {2, 3, 8}) {
      for (GroupReduction r : {GroupReduction::kMax, GroupReduction::kSum}) {
        for (DType t : {DType::kBf16, DType::kFp32}) {
          RunScoreCase({d, 16, g, t, false, t, r}, rng, &unused);
          RunScoreCase({d, 3, g, t, false, DType::kFp32, r}, rng, &unused);
        }
      }
    }
  }
}

// One batch: a stream per (length, P) with random fresh counts, always-in
// counts and budgets (dense, tight, and everything in between), scores as
// the CPU computes them, some rounded to create exact ties.
TEST(SelectPagesTest, SameSelectionAsCpuAndCompactRows) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  // Rounds 0..3 take the 1024-thread kernel (a stream of 1000 one-row
  // pages sorts in registers there), 4..5 keep to streams of at most 256
  // candidates (the 256-thread kernel), 6..7 to 512 (the 512-thread one).
  for (int round = 0; round < 8; ++round) {
    const int most_pages = round < 4   ? kMaxSelectCandidates
                           : round < 6 ? 256
                                       : 512;
    std::vector<float> scores;
    std::vector<int32_t> fresh;
    std::vector<int32_t> begin, count, always, budget;
    std::vector<int32_t> always_rows, always_begin, first_row, rows_begin;
    std::vector<uint64_t> masks;
    int rows_total = 0;
    // Pages of 40 rows take two 16-row chunks and a part of a third when
    // the rows are written; 8192 one-row pages is the largest stream.
    for (int page_tokens : {1, 3, 16, 40}) {
      for (int n : {1, 7, 65, 1000, 4099, 8192}) {
        if (n == 8192 && page_tokens != 1) continue;
        const int pages = (n + page_tokens - 1) / page_tokens;
        if (pages > most_pages) continue;
        std::uniform_real_distribution<float> uniform(-50.0f, 50.0f);
        begin.push_back(static_cast<int32_t>(scores.size()));
        count.push_back(pages);
        int total = 0;
        for (int p = 0; p < pages; ++p) {
          float score = uniform(rng);
          if (round % 2 == 1) score = std::round(score / 8.0f);  // ties
          scores.push_back(score);
          const int f = std::uniform_int_distribution<int>(0, page_tokens)(rng);
          // Fresh rows: a random subset of the page's slots of size f.
          std::vector<int> slots(page_tokens);
          std::iota(slots.begin(), slots.end(), 0);
          std::shuffle(slots.begin(), slots.end(), rng);
          uint64_t mask = 0;
          for (int j = 0; j < f; ++j) mask |= uint64_t{1} << slots[j];
          fresh.push_back(f);
          masks.push_back(mask);
          first_row.push_back(p * page_tokens +
                              100000 * static_cast<int>(begin.size()));
          total += f;
        }
        const int in = std::uniform_int_distribution<int>(0, 20)(rng);
        always.push_back(in);
        always_begin.push_back(static_cast<int32_t>(always_rows.size()));
        for (int i = 0; i < in; ++i) always_rows.push_back(-1000 - i);
        const int kinds = std::uniform_int_distribution<int>(0, 3)(rng);
        const int b = kinds == 0   ? in + total  // exactly dense
                      : kinds == 1 ? in          // nothing but the always-in
                                   : in + std::uniform_int_distribution<int>(
                                              0, std::max(0, total))(rng);
        budget.push_back(b);
        rows_begin.push_back(rows_total);
        rows_total += b + 5;
      }
    }
    const int streams = static_cast<int>(begin.size());
    Stream stream = testing::MakeStream();
    DeviceBuffer d_scores = Upload(scores, stream.get());
    DeviceBuffer d_fresh = Upload(fresh, stream.get());
    DeviceBuffer d_begin = Upload(begin, stream.get());
    DeviceBuffer d_count = Upload(count, stream.get());
    DeviceBuffer d_always = Upload(always, stream.get());
    DeviceBuffer d_budget = Upload(budget, stream.get());
    DeviceBuffer d_always_rows = Upload(always_rows, stream.get());
    DeviceBuffer d_always_begin = Upload(always_begin, stream.get());
    DeviceBuffer d_first_row = Upload(first_row, stream.get());
    DeviceBuffer d_masks = Upload(masks, stream.get());
    DeviceBuffer d_rows_begin = Upload(rows_begin, stream.get());
    DeviceBuffer d_selected = Poisoned<uint8_t>(scores.size(), stream.get());
    DeviceBuffer d_tokens = Poisoned<int32_t>(streams, stream.get());
    DeviceBuffer d_dense = Poisoned<uint8_t>(streams, stream.get());
    DeviceBuffer d_rows = Poisoned<int32_t>(rows_total, stream.get());
    DeviceBuffer d_rows_count = Poisoned<int32_t>(streams, stream.get());
    SelectPagesShape shape;
    shape.streams = streams;
    shape.max_candidates_per_stream =
        *std::max_element(count.begin(), count.end());
    shape.compact_rows = true;
    SelectPagesInputs in;
    in.scores = d_scores.as<float>();
    in.fresh_tokens = d_fresh.as<int32_t>();
    in.candidate_begin = d_begin.as<int32_t>();
    in.candidate_count = d_count.as<int32_t>();
    in.always_in_tokens = d_always.as<int32_t>();
    in.budget_tokens = d_budget.as<int32_t>();
    SelectPagesOutputs out;
    out.selected = d_selected.as<uint8_t>();
    out.selected_tokens = d_tokens.as<int32_t>();
    out.dense = d_dense.as<uint8_t>();
    SelectPagesRows rows;
    rows.always_in_rows = d_always_rows.as<int32_t>();
    rows.always_in_begin = d_always_begin.as<int32_t>();
    rows.candidate_first_row = d_first_row.as<int32_t>();
    rows.candidate_fresh_mask = d_masks.as<uint64_t>();
    rows.rows_begin = d_rows_begin.as<int32_t>();
    rows.rows = d_rows.as<int32_t>();
    rows.rows_count = d_rows_count.as<int32_t>();
    ASSERT_TRUE(SelectPages(shape, in, out, rows, stream.get()).ok());
    const std::vector<uint8_t> selected =
        Download<uint8_t>(d_selected, scores.size(), stream);
    const std::vector<int32_t> tokens =
        Download<int32_t>(d_tokens, streams, stream);
    const std::vector<uint8_t> dense =
        Download<uint8_t>(d_dense, streams, stream);
    const std::vector<int32_t> got_rows =
        Download<int32_t>(d_rows, rows_total, stream);
    const std::vector<int32_t> rows_count =
        Download<int32_t>(d_rows_count, streams, stream);
    for (int s = 0; s < streams; ++s) {
      SCOPED_TRACE(::testing::Message()
                   << "round " << round << " stream " << s << " pages "
                   << count[s] << " budget " << budget[s]);
      const size_t n = count[s];
      std::vector<int64_t> fresh64(fresh.begin() + begin[s],
                                   fresh.begin() + begin[s] + n);
      std::vector<int64_t> keys(n);
      std::iota(keys.begin(), keys.end(), int64_t{0});
      PageCandidates candidates{
          absl::MakeConstSpan(scores.data() + begin[s], n), fresh64, keys};
      std::vector<uint8_t> want(n);
      absl::StatusOr<SelectionFill> fill = cpu::FillSelection(
          always[s], candidates, budget[s], absl::MakeSpan(want));
      ASSERT_TRUE(fill.ok()) << fill.status();
      EXPECT_EQ(tokens[s], fill->selected_tokens);
      EXPECT_EQ(dense[s], fill->dense ? 1 : 0);
      int diff = 0;
      for (size_t p = 0; p < n; ++p) diff += selected[begin[s] + p] != want[p];
      EXPECT_EQ(diff, 0);
      // Rows: always-in, then the taken pages' fresh slots in page order.
      std::vector<int32_t> want_rows(
          always_rows.begin() + always_begin[s],
          always_rows.begin() + always_begin[s] + always[s]);
      for (size_t p = 0; p < n; ++p) {
        if (!want[p]) continue;
        for (int j = 0; j < 64; ++j) {
          if (masks[begin[s] + p] >> j & 1)
            want_rows.push_back(first_row[begin[s] + p] + j);
        }
      }
      ASSERT_EQ(rows_count[s], static_cast<int32_t>(want_rows.size()));
      EXPECT_TRUE(std::equal(want_rows.begin(), want_rows.end(),
                             got_rows.begin() + rows_begin[s]));
    }
  }
}

}  // namespace
}  // namespace kvmem::cuda
