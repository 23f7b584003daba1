// CUDA errors as absl::Status with the file and line of the failing call
// (STYLE.md § Errors: kernels/cuda/ adds file:line to the cudaError_t).
// Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_CUDA_CUDA_STATUS_H_
#define KVMEM_KERNELS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace kvmem::cuda {

// OK for cudaSuccess. Otherwise RESOURCE_EXHAUSTED for
// cudaErrorMemoryAllocation, UNAVAILABLE when there is no usable device or
// driver, INTERNAL for anything else; the message reads
// "<what>: cudaErrorX: <text> (file:line)".
absl::Status CudaStatus(cudaError_t err, const char* what, const char* file,
                        int line);

}  // namespace kvmem::cuda

// Returns a non-OK status from the enclosing function when the CUDA runtime
// call `expr` fails. The failure is also taken off the thread's last-error
// slot (a refused allocation is not sticky): left there, the next launch
// check would report it as its own.
#define KVMEM_CUDA_RETURN_IF_ERROR(expr)                                 \
  do {                                                                   \
    const cudaError_t kvmem_cuda_err_ = (expr);                          \
    if (kvmem_cuda_err_ != cudaSuccess) {                                \
      (void)cudaGetLastError();                                          \
      return ::kvmem::cuda::CudaStatus(kvmem_cuda_err_, #expr, __FILE__, \
                                       __LINE__);                        \
    }                                                                    \
  } while (false)

// After a kernel launch: returns the launch's error, if any, naming `name`.
#define KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED(name)                        \
  do {                                                                  \
    const cudaError_t kvmem_cuda_err_ = cudaGetLastError();             \
    if (kvmem_cuda_err_ != cudaSuccess) {                               \
      return ::kvmem::cuda::CudaStatus(kvmem_cuda_err_, name, __FILE__, \
                                       __LINE__);                       \
    }                                                                   \
  } while (false)

#endif  // KVMEM_KERNELS_CUDA_CUDA_STATUS_H_
