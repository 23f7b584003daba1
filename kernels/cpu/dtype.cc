// The CPU backend's bulk conversions; element math lives in kernels/dtype.h.
#include "kernels/cpu/dtype.h"

namespace kvmem::cpu {

void LoadFloats(const void* src, DType t, absl::Span<float> out) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = LoadElement(src, t, i);
}

void StoreFloats(absl::Span<const float> src, DType t, void* out) {
  for (size_t i = 0; i < src.size(); ++i) StoreElement(out, t, i, src[i]);
}

}  // namespace kvmem::cpu
