// The CPU backend's bulk conversions; element math lives in kernels/dtype.h.
#include "kernels/cpu/dtype.h"

namespace kvmem::cpu {

void LoadFloats(const void* src, DType t, absl::Span<float> out) {
  // One loop per type, so the compiler can vectorise each.
  const size_t n = out.size();
  if (n == 0) return;  // `src` may be null then, which memcpy must not see
  switch (t) {
    case DType::kFp32:
      memcpy(out.data(), src, n * sizeof(float));
      return;
    case DType::kBf16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(h[i]);
      return;
    }
    case DType::kFp16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) out[i] = Fp16ToFloat(h[i]);
      return;
    }
  }
}

void StoreFloats(absl::Span<const float> src, DType t, void* out) {
  for (size_t i = 0; i < src.size(); ++i) StoreElement(out, t, i, src[i]);
}

}  // namespace kvmem::cpu
