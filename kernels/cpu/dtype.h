// Bulk dtype conversions for the CPU backend. Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_CPU_DTYPE_H_
#define KVMEM_KERNELS_CPU_DTYPE_H_

#include "absl/types/span.h"
#include "kernels/dtype.h"

namespace kvmem::cpu {

// out[i] = element i of the little-endian tensor `src` of type `t`, at any
// alignment. `src` must hold out.size() elements.
void LoadFloats(const void* src, DType t, absl::Span<float> out);

// Element i of `out` (type `t`, room for src.size() elements) = src[i],
// rounded to nearest even.
void StoreFloats(absl::Span<const float> src, DType t, void* out);

}  // namespace kvmem::cpu

#endif  // KVMEM_KERNELS_CPU_DTYPE_H_
