#include "kernels/cuda/cuda_status.h"

#include "absl/strings/str_cat.h"

namespace kvmem::cuda {

absl::Status CudaStatus(cudaError_t err, const char* what, const char* file,
                        int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ",
                   cudaGetErrorString(err), " (", file, ":", line, ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace kvmem::cuda
