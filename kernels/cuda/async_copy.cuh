// Device helpers for staging global memory into shared memory with
// cp.async, shared by the kernels of
// kernels/cuda/. Included by .cu files only.
#ifndef KVMEM_KERNELS_CUDA_ASYNC_COPY_CUH_
#define KVMEM_KERNELS_CUDA_ASYNC_COPY_CUH_

#include <cstdint>

namespace kvmem::cuda {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared; zeros when !valid (nothing is read then).
__device__ __forceinline__ void CopyAsync16(void* shared, const void* global,
                                            bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   SharedAddress(shared)),
               "l"(global), "r"(valid ? 16 : 0));
}
// 8 or 4 bytes global → shared (through L1: cp.async.cg takes 16 only);
// zeros when !valid.
__device__ __forceinline__ void CopyAsync8(void* shared, const void* global,
                                           bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(
                   SharedAddress(shared)),
               "l"(global), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void CopyAsync4(void* shared, const void* global,
                                           bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(
                   SharedAddress(shared)),
               "l"(global), "r"(valid ? 4 : 0));
}
// Closes this thread's copies issued since the last commit into a group.
__device__ __forceinline__ void CommitCopies() {
  asm volatile("cp.async.commit_group;");
}
// Waits until at most kPending of this thread's groups are in flight.
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_ASYNC_COPY_CUH_
