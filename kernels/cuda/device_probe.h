// Asks the CUDA runtime which devices this process can use. The server's
// `--backend=auto` picks the CUDA backend only where one is present.
// Thread-safe. No CUDA types in this header.
#ifndef KVMEM_KERNELS_CUDA_DEVICE_PROBE_H_
#define KVMEM_KERNELS_CUDA_DEVICE_PROBE_H_

#include <string>

namespace kvmem::cuda {

struct DeviceProbe {
  int device_count = 0;     // usable CUDA devices; 0 where none or no driver
  std::string device_name;  // device 0's name, empty when device_count == 0
  std::string why_none;     // the runtime's reason when device_count == 0
};

// Never fails: a machine without a driver or a GPU has no devices, and
// `why_none` says what the CUDA runtime answered.
DeviceProbe ProbeDevices();

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DEVICE_PROBE_H_
