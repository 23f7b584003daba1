// Host-side help for launching the kernels of kernels/cuda/. Thread-safe.
#ifndef KVMEM_KERNELS_CUDA_LAUNCH_H_
#define KVMEM_KERNELS_CUDA_LAUNCH_H_

#include <cuda_runtime.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem::cuda {

// Lets `kernel` take `bytes` of dynamic shared memory, over the 48 KiB a
// block gets without opting in. The driver call is made once per kernel and
// size (it costs tens of µs, and a decode step may be under stream
// capture), raising the limit to the most any launch has asked for. Per
// process, so for the current device only: a multi-device engine would set
// it per device. INTERNAL with file:line when the driver refuses.
absl::Status AllowDynamicSharedMemory(const void* kernel, size_t bytes);

// Launches `kernel` as cudaLaunchKernel does, allowed to start while the
// kernel before it in `stream` finishes (programmatic dependent launch;
// see grid_dependency.cuh). The kernel must call WaitForPriorGrids before
// it touches memory that earlier kernels use. INTERNAL on a driver error.
absl::Status LaunchAfterPrior(const void* kernel, dim3 grid, dim3 block,
                              size_t shared_bytes, cudaStream_t stream,
                              void** args);

// How many blocks of `kernel` (`threads` a block, `bytes` of dynamic shared
// memory) the current device holds at once, over all its SMs: a grid this
// size runs in one wave. Asked of the driver once per kernel, shape and
// device, for the same reasons as above. At least 1.
absl::StatusOr<int> ResidentBlocks(const void* kernel, int threads,
                                   size_t bytes);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_LAUNCH_H_
