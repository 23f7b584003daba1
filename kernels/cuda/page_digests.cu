// A block per page, a thread per channel (or per rotary pair): min and max
// with the CPU's comparisons (std::min / std::max, so signed zeros match),
// pair norms in double rounded up to fp32 as the CPU rounds them.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/page_digests.h"
#include "kernels/cuda/row_access.cuh"

namespace kvmem::cuda {
namespace {

constexpr int kThreads = 128;

struct DigestArgs {
  int head_dim;
  DigestKind kind;
  PageDigestInputs in;
  void* digests;
};

__device__ __forceinline__ float PairNormRoundedUp(float a, float b) {
  const double norm = __dsqrt_rn(__dadd_rn(__dmul_rn(double(a), double(a)),
                                           __dmul_rn(double(b), double(b))));
  float f = __double2float_rn(norm);
  if (double(f) < norm) f = nextafterf(f, INFINITY);
  return f;
}

template <DType kKey, DType kDigest>
__device__ __forceinline__ void Store(void* digests, size_t i, float v) {
  if constexpr (kDigest == DType::kFp32) {
    static_cast<float*>(digests)[i] = v;
  } else if constexpr (kDigest == DType::kBf16) {
    static_cast<uint16_t*>(digests)[i] = FloatToBf16(v);
  } else {
    static_cast<uint16_t*>(digests)[i] = FloatToFp16(v);
  }
}

template <DType kKey, DType kDigest>
__global__ void __launch_bounds__(kThreads)
    PageDigestKernel(const DigestArgs args) {
  const int page = blockIdx.x;
  const int n = args.in.occupied_rows[page];
  if (n < 1) return;
  const int head_dim = args.head_dim;
  const size_t row_bytes = size_t(head_dim) * DTypeBytes(kKey);
  const char* rows = static_cast<const char*>(args.in.key_rows) +
                     size_t(args.in.first_row[page]) * row_bytes;
  const size_t out = size_t(args.in.digest_index[page]) * 2 * head_dim;
  int first_plain = 0;
  if (args.kind.rotation_invariant) {
    first_plain = args.kind.rotated_dims;
    for (int i = threadIdx.x; i < args.kind.rotated_dims / 2; i += kThreads) {
      int a = 0;
      int b = 0;
      RotaryPairChannels(args.kind.pairing, args.kind.rotated_dims, i, &a, &b);
      float largest = 0.0f;
      for (int r = 0; r < n; ++r) {
        const char* row = rows + r * row_bytes;
        const float norm = PairNormRoundedUp(ElementToFloat<kKey>(row, a),
                                             ElementToFloat<kKey>(row, b));
        largest = r == 0 ? norm : (largest < norm ? norm : largest);
      }
      Store<kKey, kDigest>(args.digests, out + a, -largest);
      Store<kKey, kDigest>(args.digests, out + b, -largest);
      Store<kKey, kDigest>(args.digests, out + head_dim + a, largest);
      Store<kKey, kDigest>(args.digests, out + head_dim + b, largest);
    }
  }
  for (int c = first_plain + threadIdx.x; c < head_dim; c += kThreads) {
    float low = ElementToFloat<kKey>(rows, c);
    float high = low;
    for (int r = 1; r < n; ++r) {
      const float k = ElementToFloat<kKey>(rows + r * row_bytes, c);
      low = k < low ? k : low;     // std::min(low, k)
      high = high < k ? k : high;  // std::max(high, k)
    }
    Store<kKey, kDigest>(args.digests, out + c, low);
    Store<kKey, kDigest>(args.digests, out + head_dim + c, high);
  }
}

template <DType kKey>
void* KernelFor(DType digest) {
  switch (digest) {
    case DType::kBf16:
      return reinterpret_cast<void*>(&PageDigestKernel<kKey, DType::kBf16>);
    case DType::kFp16:
      return reinterpret_cast<void*>(&PageDigestKernel<kKey, DType::kFp16>);
    default:
      return reinterpret_cast<void*>(&PageDigestKernel<kKey, DType::kFp32>);
  }
}

bool KnownDType(DType t) {
  return t == DType::kBf16 || t == DType::kFp16 || t == DType::kFp32;
}

}  // namespace

absl::Status ComputePageDigests(const PageDigestShape& shape,
                                const PageDigestInputs& inputs, void* digests,
                                cudaStream_t stream) {
  if (shape.pages < 1 || shape.pages > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages: ", shape.pages, ", want >= 1"));
  }
  absl::Status valid = shape.kind.Validate(shape.head_dim);
  if (!valid.ok()) return valid;
  if (!KnownDType(shape.key_dtype) || !KnownDType(shape.digest_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key_dtype: ", static_cast<int>(shape.key_dtype), ", digest_dtype: ",
        static_cast<int>(shape.digest_dtype), "; want bf16/fp16/fp32"));
  }
  if (shape.digest_dtype != DType::kFp32 &&
      (shape.digest_dtype != shape.key_dtype ||
       shape.kind.rotation_invariant)) {
    return absl::InvalidArgumentError(
        "digest_dtype: fp32, or the key dtype for ABSOLUTE digests (exact)");
  }
  if (inputs.key_rows == nullptr || inputs.first_row == nullptr ||
      inputs.occupied_rows == nullptr || inputs.digest_index == nullptr ||
      digests == nullptr) {
    return absl::InvalidArgumentError(
        "key_rows, first_row, occupied_rows, digest_index and digests must "
        "all be set");
  }
  DigestArgs args;
  args.head_dim = shape.head_dim;
  args.kind = shape.kind;
  args.in = inputs;
  args.digests = digests;
  void* kernel = shape.key_dtype == DType::kBf16
                     ? KernelFor<DType::kBf16>(shape.digest_dtype)
                 : shape.key_dtype == DType::kFp16
                     ? KernelFor<DType::kFp16>(shape.digest_dtype)
                     : KernelFor<DType::kFp32>(shape.digest_dtype);
  void* kernel_args[] = {&args};
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernel(
      kernel, dim3(shape.pages), dim3(kThreads), kernel_args, 0, stream));
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("PageDigestKernel");
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
