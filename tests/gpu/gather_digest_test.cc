// GatherRows (FETCH) byte for byte, and ComputePageDigests against
// cpu::ComputePageDigest bit for bit, for both digest kinds, every dtype,
// D 64/128, P 1/3/16 and occupied prefixes from 1 to P.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/page_digests.h"
#include "kernels/page_digest.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::cuda {
namespace {

using testing::Download;
using testing::Poisoned;
using testing::Upload;

// ScatterRows writes each staged row to its pool row, byte for byte, and
// touches nothing else: the pool is poisoned first and every other row
// must still be poison.
TEST(ScatterRowsTest, WritesEachStagedRowToItsPoolRowOnly) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  for (int d : {64, 128, 5}) {
    for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
      SCOPED_TRACE(::testing::Message()
                   << "D=" << d << " " << testing::DTypeName(t));
      const int pool_rows = 3000;
      const size_t row_bytes = size_t(d) * DTypeBytes(t);
      for (int count : {0, 1, 9, 2500}) {
        std::vector<int32_t> targets(pool_rows);
        std::iota(targets.begin(), targets.end(), 0);
        std::shuffle(targets.begin(), targets.end(), rng);
        targets.resize(size_t(count));  // distinct, in random order
        const std::vector<uint8_t> keys =
            testing::RandomRows(size_t(count) * d, t, rng);
        const std::vector<uint8_t> values =
            testing::RandomRows(size_t(count) * d, t, rng);
        Stream stream = testing::MakeStream();
        DeviceBuffer pool_k =
            Poisoned<uint8_t>(size_t(pool_rows) * row_bytes, stream.get());
        DeviceBuffer pool_v =
            Poisoned<uint8_t>(size_t(pool_rows) * row_bytes, stream.get());
        DeviceBuffer d_rows = Upload(targets, stream.get());
        DeviceBuffer d_keys = Upload(keys, stream.get());
        DeviceBuffer d_values = Upload(values, stream.get());
        ScatterRowsArgs args;
        args.count = count;
        args.head_dim = d;
        args.dtype = t;
        args.rows = d_rows.as<int32_t>();
        args.keys = d_keys.get();
        args.values = d_values.get();
        args.key_rows = pool_k.get();
        args.value_rows = pool_v.get();
        ASSERT_TRUE(ScatterRows(args, stream.get()).ok());
        const std::vector<uint8_t> got_k =
            Download<uint8_t>(pool_k, size_t(pool_rows) * row_bytes, stream);
        const std::vector<uint8_t> got_v =
            Download<uint8_t>(pool_v, size_t(pool_rows) * row_bytes, stream);
        std::vector<int> source(pool_rows, -1);
        for (int i = 0; i < count; ++i) source[targets[i]] = i;
        int bad = 0;
        for (int r = 0; r < pool_rows; ++r) {
          for (size_t b = 0; b < row_bytes; ++b) {
            const size_t at = size_t(r) * row_bytes + b;
            const uint8_t want_k =
                source[r] < 0 ? 0xff : keys[size_t(source[r]) * row_bytes + b];
            const uint8_t want_v =
                source[r] < 0 ? 0xff
                              : values[size_t(source[r]) * row_bytes + b];
            bad += got_k[at] != want_k || got_v[at] != want_v;
          }
        }
        EXPECT_EQ(bad, 0) << count << " rows";
      }
    }
  }
  ScatterRowsArgs missing;
  missing.count = 1;
  missing.head_dim = 64;
  EXPECT_EQ(ScatterRows(missing, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GatherRowsTest, CopiesSelectedRowsAndPositions) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  for (int d : {64, 128, 5}) {
    for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
      SCOPED_TRACE(::testing::Message()
                   << "D=" << d << " " << testing::DTypeName(t));
      const std::vector<int> lengths = {1, 7, 0, 65, 4099};
      const int pool_rows = 5000;
      const size_t row_bytes = size_t(d) * DTypeBytes(t);
      const std::vector<uint8_t> keys =
          testing::RandomRows(size_t(pool_rows) * d, t, rng);
      const std::vector<uint8_t> values =
          testing::RandomRows(size_t(pool_rows) * d, t, rng);
      std::vector<int64_t> positions(pool_rows);
      for (int i = 0; i < pool_rows; ++i) positions[i] = int64_t{3} * i + 7;
      std::vector<int32_t> rows, begin, count;
      std::uniform_int_distribution<int> pick(0, pool_rows - 1);
      for (int n : lengths) {
        rows.push_back(-1);  // gap
        begin.push_back(static_cast<int32_t>(rows.size()));
        count.push_back(n);
        for (int i = 0; i < n; ++i) rows.push_back(pick(rng));
      }
      Stream stream = testing::MakeStream();
      DeviceBuffer d_keys = Upload(keys, stream.get());
      DeviceBuffer d_values = Upload(values, stream.get());
      DeviceBuffer d_positions = Upload(positions, stream.get());
      DeviceBuffer d_rows = Upload(rows, stream.get());
      DeviceBuffer d_begin = Upload(begin, stream.get());
      DeviceBuffer d_count = Upload(count, stream.get());
      DeviceBuffer o_keys =
          Poisoned<uint8_t>(rows.size() * row_bytes, stream.get());
      DeviceBuffer o_values =
          Poisoned<uint8_t>(rows.size() * row_bytes, stream.get());
      DeviceBuffer o_positions = Poisoned<int64_t>(rows.size(), stream.get());
      GatherRowsShape shape;
      shape.streams = static_cast<int>(lengths.size());
      shape.head_dim = d;
      shape.dtype = t;
      shape.max_rows_per_stream = 4099;
      GatherRowsInputs in{d_keys.get(),
                          d_values.get(),
                          d_positions.as<int64_t>(),
                          d_rows.as<int32_t>(),
                          d_begin.as<int32_t>(),
                          d_count.as<int32_t>()};
      GatherRowsOutputs out{o_keys.get(), o_values.get(),
                            o_positions.as<int64_t>()};
      ASSERT_TRUE(GatherRows(shape, in, out, stream.get()).ok());
      const std::vector<uint8_t> got_k =
          Download<uint8_t>(o_keys, rows.size() * row_bytes, stream);
      const std::vector<uint8_t> got_v =
          Download<uint8_t>(o_values, rows.size() * row_bytes, stream);
      const std::vector<int64_t> got_p =
          Download<int64_t>(o_positions, rows.size(), stream);
      int bad = 0;
      for (size_t s = 0; s < lengths.size(); ++s) {
        for (int i = 0; i < count[s]; ++i) {
          const size_t at = size_t(begin[s]) + i;
          const size_t row = size_t(rows[at]);
          bad += std::memcmp(got_k.data() + at * row_bytes,
                             keys.data() + row * row_bytes, row_bytes) != 0;
          bad += std::memcmp(got_v.data() + at * row_bytes,
                             values.data() + row * row_bytes, row_bytes) != 0;
          bad += got_p[at] != positions[row];
        }
        EXPECT_EQ(got_p[begin[s] - 1], -1) << "gap written";  // 0xff.. = -1
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

TEST(PageDigestsTest, BitsMatchCpu) {
  KVMEM_REQUIRE_DEVICE();
  std::mt19937 rng(testing::FreshSeed());
  for (int d : {64, 128}) {
    for (int p : {1, 3, 16}) {
      for (DType t : {DType::kBf16, DType::kFp16, DType::kFp32}) {
        for (int kind_index = 0; kind_index < 3; ++kind_index) {
          DigestKind kind;
          if (kind_index > 0) {
            kind.rotation_invariant = true;
            kind.rotated_dims = kind_index == 1 ? d : d / 2;
            kind.pairing = kind_index == 1 ? RotaryPairing::kHalfSplit
                                           : RotaryPairing::kInterleaved;
          }
          const DType digest_dtype =
              kind_index == 0 && p == 3 ? t : DType::kFp32;
          SCOPED_TRACE(::testing::Message()
                       << "D=" << d << " P=" << p << " "
                       << testing::DTypeName(t) << " kind " << kind_index);
          const int pages = 300;
          const int pool_rows = pages * p + 7;
          const size_t row_bytes = size_t(d) * DTypeBytes(t);
          const std::vector<uint8_t> keys =
              testing::RandomRows(size_t(pool_rows) * d, t, rng, -4.0f, 4.0f);
          std::vector<int32_t> first_row(pages), occupied(pages), index(pages);
          std::iota(index.begin(), index.end(), 0);
          std::shuffle(index.begin(), index.end(), rng);
          for (int i = 0; i < pages; ++i) {
            first_row[i] =
                std::uniform_int_distribution<int>(0, pool_rows - p)(rng);
            occupied[i] = std::uniform_int_distribution<int>(1, p)(rng);
          }
          Stream stream = testing::MakeStream();
          DeviceBuffer d_keys = Upload(keys, stream.get());
          DeviceBuffer d_first = Upload(first_row, stream.get());
          DeviceBuffer d_occupied = Upload(occupied, stream.get());
          DeviceBuffer d_index = Upload(index, stream.get());
          const size_t digest_elems = size_t(pages) * 2 * d;
          DeviceBuffer d_digests = Poisoned<uint8_t>(
              digest_elems * DTypeBytes(digest_dtype), stream.get());
          PageDigestShape shape;
          shape.pages = pages;
          shape.head_dim = d;
          shape.key_dtype = t;
          shape.digest_dtype = digest_dtype;
          shape.kind = kind;
          PageDigestInputs in{d_keys.get(), d_first.as<int32_t>(),
                              d_occupied.as<int32_t>(), d_index.as<int32_t>()};
          ASSERT_TRUE(
              ComputePageDigests(shape, in, d_digests.get(), stream.get())
                  .ok());
          const std::vector<uint8_t> got = Download<uint8_t>(
              d_digests, digest_elems * DTypeBytes(digest_dtype), stream);
          int bad = 0;
          for (int i = 0; i < pages; ++i) {
            std::vector<float> want(size_t(2) * d);
            ASSERT_TRUE(cpu::ComputePageDigest(
                            absl::MakeConstSpan(
                                keys.data() + size_t(first_row[i]) * row_bytes,
                                size_t(occupied[i]) * row_bytes),
                            t, d, {}, kind, absl::MakeSpan(want))
                            .ok());
            for (int e = 0; e < 2 * d; ++e) {
              const float g = LoadElement(got.data(), digest_dtype,
                                          int64_t(index[i]) * 2 * d + e);
              uint32_t gb, wb;
              std::memcpy(&gb, &g, 4);
              std::memcpy(&wb, &want[e], 4);
              if (gb != wb && ++bad <= 5) {
                ADD_FAILURE() << "page " << i << " element " << e << ": " << g
                              << " vs " << want[e];
              }
            }
          }
          EXPECT_EQ(bad, 0);
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvmem::cuda
