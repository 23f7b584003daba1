// The CPU backend's bulk conversions; element math lives in kernels/dtype.h.
#include "kernels/cpu/dtype.h"

namespace kvmem::cpu {

namespace {

// Element i of 16-bit values at any alignment: a request's tensors are
// read in place, at whatever offset the wire put them (step_wire.h).
uint16_t Load16(const unsigned char* at, size_t i) {
  uint16_t h;
  memcpy(&h, at + 2 * i, 2);
  return h;
}

}  // namespace

void LoadFloats(const void* src, DType t, absl::Span<float> out) {
  // One loop per type, so the compiler can vectorise each.
  const size_t n = out.size();
  if (n == 0) return;  // `src` may be null then, which memcpy must not see
  const auto* bytes = static_cast<const unsigned char*>(src);
  switch (t) {
    case DType::kFp32:
      memcpy(out.data(), src, n * sizeof(float));
      return;
    case DType::kBf16:
      for (size_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(Load16(bytes, i));
      return;
    case DType::kFp16:
      for (size_t i = 0; i < n; ++i) out[i] = Fp16ToFloat(Load16(bytes, i));
      return;
  }
}

void StoreFloats(absl::Span<const float> src, DType t, void* out) {
  for (size_t i = 0; i < src.size(); ++i) StoreElement(out, t, i, src[i]);
}

}  // namespace kvmem::cpu
