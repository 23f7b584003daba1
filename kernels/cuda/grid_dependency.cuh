// Programmatic dependent launch (sm_90), the device side. A kernel launched
// by LaunchAfterPrior (launch.h) may be scheduled while the kernel before it
// in its stream still runs, once every block of that kernel has called
// LetDependentsLaunch (or exited); it must WaitForPriorGrids before it
// touches memory that the earlier kernels write or read. What this saves
// is the gap between two dependent kernels (the next grid's launch and
// block scheduling), a few µs in a decode step of four kernels.
#ifndef KVMEM_KERNELS_CUDA_GRID_DEPENDENCY_CUH_
#define KVMEM_KERNELS_CUDA_GRID_DEPENDENCY_CUH_

namespace kvmem::cuda {

// Returns when the grids this one depends on have completed and their
// memory operations are visible. A no-op for a grid launched plainly.
__device__ __forceinline__ void WaitForPriorGrids() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Lets the grid that depends on this one be scheduled before this block
// exits (its blocks then wait in WaitForPriorGrids).
__device__ __forceinline__ void LetDependentsLaunch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_GRID_DEPENDENCY_CUH_
