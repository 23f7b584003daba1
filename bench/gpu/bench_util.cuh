// Helpers of the GPU benchmarks (one translation unit each): failing
// loudly on a bad status, random bf16 inputs drawn on the device, medians.
#ifndef KVMEM_BENCH_GPU_BENCH_UTIL_CUH_
#define KVMEM_BENCH_GPU_BENCH_UTIL_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem::cuda {

#define BENCH_CHECK(expr)                                     \
  do {                                                        \
    const absl::Status bench_status_ = (expr);                \
    if (!bench_status_.ok()) {                                \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, \
                   bench_status_.ToString().c_str());         \
      std::abort();                                           \
    }                                                         \
  } while (false)

template <typename T>
T Check(absl::StatusOr<T> v) {
  BENCH_CHECK(v.status());
  return std::move(*v);
}

// Pseudo-random bf16 in about [-1, 1] from a hash of the index.
__global__ void FillRandomBf16(uint16_t* out, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32);
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float f = (float(x & 0xffffu) - 32768.0f) / 32768.0f;
    out[i] = uint16_t(__float_as_uint(f) >> 16);
  }
}

inline float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace kvmem::cuda

#endif  // KVMEM_BENCH_GPU_BENCH_UTIL_CUH_
