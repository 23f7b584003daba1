// Batched gather of selected key/value rows for FETCH mode (DESIGN.md step
// 6) on the CUDA device: row t of stream s, pool row rows[row_begin[s] + t],
// is copied byte for byte to index row_begin[s] + t of the outputs.
// Thread-safe (no state); asynchronous on the caller's stream.
#ifndef KVMEM_KERNELS_CUDA_GATHER_ROWS_H_
#define KVMEM_KERNELS_CUDA_GATHER_ROWS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvmem::cuda {

struct GatherRowsShape {
  int streams = 0;              // 1..65535
  int head_dim = 0;             // D ≥ 1
  DType dtype = DType::kBf16;   // of the pools and outputs
  int max_rows_per_stream = 0;  // ≥ 1, sizes the grid only
};

// Device pointers, borrowed until the stream has run the launch.
struct GatherRowsInputs {
  const void* key_rows = nullptr;          // [pool_rows, D] dtype
  const void* value_rows = nullptr;        // [pool_rows, D] dtype
  const int64_t* row_positions = nullptr;  // [pool_rows] or null
  const int32_t* rows = nullptr;           // pool row indices
  const int32_t* row_begin = nullptr;      // [streams]
  const int32_t* row_count = nullptr;      // [streams] ≥ 0
};

struct GatherRowsOutputs {
  void* keys = nullptr;          // [rows_capacity, D] dtype
  void* values = nullptr;        // [rows_capacity, D] dtype
  int64_t* positions = nullptr;  // [rows_capacity]; iff row_positions
};

// One launch for the batch. INVALID_ARGUMENT names a bad field; INTERNAL
// with file:line on a launch error; on error nothing is enqueued.
absl::Status GatherRows(const GatherRowsShape& shape,
                        const GatherRowsInputs& inputs,
                        const GatherRowsOutputs& outputs, cudaStream_t stream);

// The inverse, for writes into a pool: staged row i of `keys`/`values`
// ([count, D] dtype, contiguous) goes to pool row rows[i] of
// key_rows/value_rows, for i < count. Rows must be distinct. One launch;
// INVALID_ARGUMENT names a bad field, INTERNAL with file:line on a launch
// error. count 0 enqueues nothing.
struct ScatterRowsArgs {
  int count = 0;     // ≥ 0
  int head_dim = 0;  // D ≥ 1
  DType dtype = DType::kBf16;
  const int32_t* rows = nullptr;  // [count] pool rows
  const void* keys = nullptr;     // [count, D]
  const void* values = nullptr;   // [count, D]
  void* key_rows = nullptr;       // [pool_rows, D]
  void* value_rows = nullptr;     // [pool_rows, D]
};
absl::Status ScatterRows(const ScatterRowsArgs& args, cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_GATHER_ROWS_H_
