// Helpers for the CUDA kernel tests: a device check, fresh seeds, uploads
// and downloads through DeviceBuffer, NaN poisoning and the tolerance rule
// of STYLE.md § Kernels.
#ifndef KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_
#define KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/device_probe.h"
#include "kernels/dtype.h"

namespace kvmem::cuda::testing {

// Skips the test on a machine without a CUDA device (CI builds, never runs).
#define KVMEM_REQUIRE_DEVICE()                                \
  do {                                                        \
    if (::kvmem::cuda::ProbeDevices().device_count == 0) {    \
      GTEST_SKIP() << "no CUDA device: "                      \
                   << ::kvmem::cuda::ProbeDevices().why_none; \
    }                                                         \
  } while (false)

// A fresh seed, or KVMEM_TEST_SEED's (to repeat a failed run).
inline uint32_t FreshSeed() {
  const char* fixed = std::getenv("KVMEM_TEST_SEED");
  const uint32_t seed = fixed != nullptr
                            ? uint32_t(std::strtoul(fixed, nullptr, 10))
                            : std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

// STYLE.md: fp32 1e-5, fp16 1e-3, bf16 1e-2 (atol and rtol alike).
inline double Tolerance(DType t) {
  return t == DType::kFp32 ? 1e-5 : t == DType::kFp16 ? 1e-3 : 1e-2;
}

inline bool Close(double cuda, double cpu, double tol) {
  if (std::isnan(cuda) || std::isnan(cpu)) return false;
  if (std::isinf(cpu) || std::isinf(cuda)) return cuda == cpu;
  return std::fabs(cuda - cpu) <= tol + tol * std::fabs(cpu);
}

// A device copy of `host`; the test fails on an allocation error.
template <typename T>
DeviceBuffer Upload(const std::vector<T>& host, cudaStream_t stream) {
  absl::StatusOr<DeviceBuffer> buffer =
      DeviceBuffer::Allocate(host.size() * sizeof(T) + 16);
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  if (!buffer.ok()) return DeviceBuffer();
  EXPECT_TRUE(
      CopyToDevice(buffer->get(), host.data(), host.size() * sizeof(T), stream)
          .ok());
  return std::move(*buffer);
}

// A device buffer of `count` T filled with 0xff bytes (NaN for floats).
template <typename T>
DeviceBuffer Poisoned(size_t count, cudaStream_t stream) {
  absl::StatusOr<DeviceBuffer> buffer =
      DeviceBuffer::Allocate(count * sizeof(T) + 16);
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  if (!buffer.ok()) return DeviceBuffer();
  EXPECT_TRUE(FillDevice(buffer->get(), 0xff, count * sizeof(T), stream).ok());
  return std::move(*buffer);
}

// `count` T from the device after the stream's work is done.
template <typename T>
std::vector<T> Download(const DeviceBuffer& buffer, size_t count,
                        const Stream& stream) {
  std::vector<T> host(count);
  EXPECT_TRUE(
      CopyToHost(host.data(), buffer.get(), count * sizeof(T), stream.get())
          .ok());
  EXPECT_TRUE(stream.Synchronize().ok());
  return host;
}

inline Stream MakeStream() {
  absl::StatusOr<Stream> stream = Stream::Create();
  EXPECT_TRUE(stream.ok()) << stream.status();
  return stream.ok() ? std::move(*stream) : Stream();
}

// `count` values uniform in [lo, hi), rounded to `dtype`, as its bytes.
inline std::vector<uint8_t> RandomRows(size_t count, DType dtype,
                                       std::mt19937& rng, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> uniform(lo, hi);
  std::vector<uint8_t> bytes(count * DTypeBytes(dtype));
  for (size_t i = 0; i < count; ++i) {
    StoreElement(bytes.data(), dtype, static_cast<int64_t>(i), uniform(rng));
  }
  return bytes;
}

inline const char* DTypeName(DType t) {
  return t == DType::kBf16 ? "bf16" : t == DType::kFp16 ? "fp16" : "fp32";
}

}  // namespace kvmem::cuda::testing

#endif  // KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_
