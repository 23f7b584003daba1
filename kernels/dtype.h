// Element types of the wire and of stored keys/values, and their conversion
// to and from fp32. Header-only and __host__ __device__ so that both backends
// round identically. Thread-safe (pure functions).
#ifndef KVMEM_KERNELS_DTYPE_H_
#define KVMEM_KERNELS_DTYPE_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVMEM_HD __host__ __device__ __forceinline__
#else
#define KVMEM_HD inline
#endif

namespace kvmem {

// Values match kvmem.v1.DType so the adapter can cast.
enum class DType : int { kBf16 = 1, kFp16 = 2, kFp32 = 3 };

KVMEM_HD int DTypeBytes(DType t) { return t == DType::kFp32 ? 4 : 2; }

KVMEM_HD uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
KVMEM_HD float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// bf16 is the top half of an fp32.
KVMEM_HD float Bf16ToFloat(uint16_t h) { return BitsFloat(uint32_t{h} << 16); }

// Round to nearest, ties to even; NaN stays NaN (quiet).
KVMEM_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 → fp32, exact (subnormals, infinities and NaN included).
KVMEM_HD float Fp16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    // Subnormal (or zero): mant · 2^-24, exact in fp32.
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 → IEEE binary16, round to nearest even; overflow gives ±inf.
KVMEM_HD uint16_t FloatToFp16(float f) {
  uint32_t u = FloatBits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal in fp16: round abs / 2^-24 to an integer, ties even.
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal
    uint32_t e = abs >> 23;
    uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // abs·2^24 = m·2^(e-126): bits to drop
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t q = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((q - 0x38000000u) >> 13));
}

// Element `i` of a little-endian tensor of type `t` at `base`, as fp32.
KVMEM_HD float LoadElement(const void* base, DType t, int64_t i) {
  if (t == DType::kFp32) {
    float f;
    memcpy(&f, static_cast<const char*>(base) + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, static_cast<const char*>(base) + 2 * i, 2);
  return t == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}

// Stores `v` rounded to type `t` as element `i` of the tensor at `base`.
KVMEM_HD void StoreElement(void* base, DType t, int64_t i, float v) {
  if (t == DType::kFp32) {
    memcpy(static_cast<char*>(base) + 4 * i, &v, 4);
    return;
  }
  uint16_t h = t == DType::kBf16 ? FloatToBf16(v) : FloatToFp16(v);
  memcpy(static_cast<char*>(base) + 2 * i, &h, 2);
}

}  // namespace kvmem

#endif  // KVMEM_KERNELS_DTYPE_H_
