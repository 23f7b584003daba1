// Batched recompute of page digests (specs/quest.md §1, §8.5; selection.md
// § Pages) on the CUDA device, for the pages whose slots changed in a step.
// Same values as cpu::ComputePageDigest over the page's occupied rows.
// Thread-safe (no state); asynchronous on the caller's stream.
#ifndef KVMEM_KERNELS_CUDA_PAGE_DIGESTS_H_
#define KVMEM_KERNELS_CUDA_PAGE_DIGESTS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/page_digest.h"

namespace kvmem::cuda {

struct PageDigestShape {
  int pages = 0;     // pages to recompute, ≥ 1
  int head_dim = 0;  // D ≥ 1
  DType key_dtype = DType::kBf16;
  // fp32, or key_dtype for ABSOLUTE digests (exact: min/max are keys).
  DType digest_dtype = DType::kFp32;
  DigestKind kind;
};

// Device pointers, borrowed until the stream has run the launch. A page's
// occupied slots are a prefix (sinks and cascade rings fill slots in
// order): page i covers pool rows first_row[i] + [0, occupied_rows[i]),
// occupied_rows[i] ≥ 1 (a page with none has no digest and is skipped).
struct PageDigestInputs {
  const void* key_rows = nullptr;          // [pool_rows, D] key_dtype
  const int32_t* first_row = nullptr;      // [pages]
  const int32_t* occupied_rows = nullptr;  // [pages]
  const int32_t* digest_index = nullptr;   // [pages]: where to write
};

// Writes digests[digest_index[i]] ([2, D] digest_dtype: low row, high row)
// for every page. One launch. INVALID_ARGUMENT names a bad field; INTERNAL
// with file:line on a launch error; on error nothing is enqueued.
absl::Status ComputePageDigests(const PageDigestShape& shape,
                                const PageDigestInputs& inputs, void* digests,
                                cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_PAGE_DIGESTS_H_
