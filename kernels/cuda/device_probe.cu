#include <cuda_runtime.h>

#include "kernels/cuda/device_probe.h"

namespace kvmem::cuda {

DeviceProbe ProbeDevices() {
  DeviceProbe probe;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // cudaGetDeviceCount leaves a sticky-free error; clear it for later calls.
    (void)cudaGetLastError();
    probe.why_none = std::string(cudaGetErrorName(err)) + ": " +
                     cudaGetErrorString(err) + " (" __FILE__ ")";
    return probe;
  }
  if (count == 0) {
    probe.why_none = "the CUDA runtime sees no device";
    return probe;
  }
  cudaDeviceProp prop;
  err = cudaGetDeviceProperties(&prop, 0);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    probe.why_none = std::string("cudaGetDeviceProperties: ") +
                     cudaGetErrorString(err) + " (" __FILE__ ")";
    return probe;
  }
  probe.device_count = count;
  probe.device_name = prop.name;
  return probe;
}

}  // namespace kvmem::cuda
