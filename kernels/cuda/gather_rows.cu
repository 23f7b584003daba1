// A warp per row: 16-byte pieces when every row is 16-byte aligned, else
// 2-byte units (rows are whole elements of at least 2 bytes).
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;
constexpr int kMaxGridTiles = 4096;

struct GatherArgs {
  size_t row_bytes;
  bool vector;
  GatherRowsInputs in;
  GatherRowsOutputs out;
};

__global__ void __launch_bounds__(kThreads)
    GatherRowsKernel(const GatherArgs args) {
  const int stream = blockIdx.y;
  const int n = args.in.row_count[stream];
  const int begin = args.in.row_begin[stream];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int t = blockIdx.x * kRowsPerBlock + warp; t < n;
       t += gridDim.x * kRowsPerBlock) {
    const size_t at = size_t(begin) + t;
    const int32_t row = args.in.rows[at];
    const size_t src = size_t(row) * args.row_bytes;
    const size_t dst = at * args.row_bytes;
    CopyRow(static_cast<const char*>(args.in.key_rows) + src,
            static_cast<char*>(args.out.keys) + dst, args.row_bytes,
            args.vector, lane);
    CopyRow(static_cast<const char*>(args.in.value_rows) + src,
            static_cast<char*>(args.out.values) + dst, args.row_bytes,
            args.vector, lane);
    if (lane == 0 && args.out.positions != nullptr) {
      args.out.positions[at] = args.in.row_positions[row];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ScatterRowsKernel(const ScatterRowsArgs args, size_t row_bytes,
                      bool vector) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int i = blockIdx.x * kRowsPerBlock + warp; i < args.count;
       i += gridDim.x * kRowsPerBlock) {
    const size_t src = size_t(i) * row_bytes;
    const size_t dst = size_t(args.rows[i]) * row_bytes;
    CopyRow(static_cast<const char*>(args.keys) + src,
            static_cast<char*>(args.key_rows) + dst, row_bytes, vector, lane);
    CopyRow(static_cast<const char*>(args.values) + src,
            static_cast<char*>(args.value_rows) + dst, row_bytes, vector, lane);
  }
}

}  // namespace

absl::Status ScatterRows(const ScatterRowsArgs& args, cudaStream_t stream) {
  if (args.count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("count: ", args.count, ", want >= 0"));
  }
  if (args.head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim: ", args.head_dim, ", want >= 1"));
  }
  if (args.dtype != DType::kBf16 && args.dtype != DType::kFp16 &&
      args.dtype != DType::kFp32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dtype: ", static_cast<int>(args.dtype), ", want bf16/fp16/fp32"));
  }
  if (args.count == 0) return absl::OkStatus();
  if (args.rows == nullptr || args.keys == nullptr || args.values == nullptr ||
      args.key_rows == nullptr || args.value_rows == nullptr) {
    return absl::InvalidArgumentError(
        "rows, keys, values, key_rows and value_rows must all be set");
  }
  const size_t row_bytes = size_t(args.head_dim) * DTypeBytes(args.dtype);
  const bool vector = row_bytes % 16 == 0 && Aligned16(args.keys) &&
                      Aligned16(args.values) && Aligned16(args.key_rows) &&
                      Aligned16(args.value_rows);
  int tiles = (args.count + kRowsPerBlock - 1) / kRowsPerBlock;
  if (tiles > kMaxGridTiles) tiles = kMaxGridTiles;
  ScatterRowsKernel<<<tiles, kThreads, 0, stream>>>(args, row_bytes, vector);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ScatterRowsKernel");
  return absl::OkStatus();
}

absl::Status GatherRows(const GatherRowsShape& shape,
                        const GatherRowsInputs& inputs,
                        const GatherRowsOutputs& outputs, cudaStream_t stream) {
  if (shape.streams < 1 || shape.streams > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("streams: ", shape.streams, ", want 1..65535"));
  }
  if (shape.head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim: ", shape.head_dim, ", want >= 1"));
  }
  if (shape.dtype != DType::kBf16 && shape.dtype != DType::kFp16 &&
      shape.dtype != DType::kFp32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dtype: ", static_cast<int>(shape.dtype), ", want bf16/fp16/fp32"));
  }
  if (shape.max_rows_per_stream < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_rows_per_stream: ", shape.max_rows_per_stream, ", want >= 1"));
  }
  if (inputs.key_rows == nullptr || inputs.value_rows == nullptr ||
      inputs.rows == nullptr || inputs.row_begin == nullptr ||
      inputs.row_count == nullptr || outputs.keys == nullptr ||
      outputs.values == nullptr) {
    return absl::InvalidArgumentError(
        "key_rows, value_rows, rows, row_begin, row_count, keys and values "
        "must all be set");
  }
  if ((inputs.row_positions == nullptr) != (outputs.positions == nullptr)) {
    return absl::InvalidArgumentError(
        "positions: set both inputs.row_positions and outputs.positions, or "
        "neither");
  }
  GatherArgs args;
  args.row_bytes = size_t(shape.head_dim) * DTypeBytes(shape.dtype);
  args.vector = args.row_bytes % 16 == 0 && Aligned16(inputs.key_rows) &&
                Aligned16(inputs.value_rows) && Aligned16(outputs.keys) &&
                Aligned16(outputs.values);
  args.in = inputs;
  args.out = outputs;
  int tiles = (shape.max_rows_per_stream + kRowsPerBlock - 1) / kRowsPerBlock;
  if (tiles > kMaxGridTiles) tiles = kMaxGridTiles;
  GatherRowsKernel<<<dim3(tiles, shape.streams), kThreads, 0, stream>>>(args);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowsKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
