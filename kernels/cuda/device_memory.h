// Move-only owners of CUDA resources: device memory, pinned host memory,
// streams and events (STYLE.md § Ownership and device). Each is made by a
// StatusOr factory and frees its resource in its destructor. A moved-from
// object owns nothing. Not thread-safe: one owner each; the CUDA objects
// themselves may be used from any thread.
#ifndef KVMEM_KERNELS_CUDA_DEVICE_MEMORY_H_
#define KVMEM_KERNELS_CUDA_DEVICE_MEMORY_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem::cuda {

// Where a CudaMemory lives.
enum class MemoryKind {
  kDevice,      // device memory on the current device (cudaMalloc: 256-byte
                // aligned)
  kPinnedHost,  // page-locked host memory (cudaMallocHost), for
                // asynchronous copies
};

// `bytes` of memory of one kind, uninitialised, freed when it goes. One
// class for both kinds: they differ only in the runtime calls that make
// and free them (device_memory.cc).
template <MemoryKind kKind>
class CudaMemory {
 public:
  // RESOURCE_EXHAUSTED when out of memory; UNAVAILABLE with no device;
  // INTERNAL otherwise. 0 bytes gives an empty buffer (null).
  static absl::StatusOr<CudaMemory> Allocate(size_t bytes);

  CudaMemory() = default;
  CudaMemory(CudaMemory&& other) noexcept;
  CudaMemory& operator=(CudaMemory&& other) noexcept;
  CudaMemory(const CudaMemory&) = delete;
  CudaMemory& operator=(const CudaMemory&) = delete;
  ~CudaMemory();

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  CudaMemory(void* ptr, size_t bytes) : ptr_(ptr), bytes_(bytes) {}
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

extern template class CudaMemory<MemoryKind::kDevice>;
extern template class CudaMemory<MemoryKind::kPinnedHost>;
using DeviceBuffer = CudaMemory<MemoryKind::kDevice>;
using PinnedHostBuffer = CudaMemory<MemoryKind::kPinnedHost>;

// A non-blocking CUDA stream (never synchronises with the legacy default
// stream, which kvmem never uses).
class Stream {
 public:
  // INTERNAL / UNAVAILABLE as the runtime reports.
  static absl::StatusOr<Stream> Create();

  Stream() = default;
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream();

  cudaStream_t get() const { return stream_; }
  // Blocks the calling thread until the stream's work is done; for tests,
  // benchmarks and the end of a step, never inside a launcher.
  absl::Status Synchronize() const;

 private:
  explicit Stream(cudaStream_t stream) : stream_(stream) {}
  cudaStream_t stream_ = nullptr;
};

// A CUDA event. `timing` false makes a cheaper event that only orders work.
class Event {
 public:
  static absl::StatusOr<Event> Create(bool timing);

  Event() = default;
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();

  cudaEvent_t get() const { return event_; }
  absl::Status Record(cudaStream_t stream) const;
  absl::Status Synchronize() const;
  // Milliseconds from `start` to this event; both recorded and complete,
  // both made with timing on.
  absl::StatusOr<float> ElapsedMsSince(const Event& start) const;

 private:
  explicit Event(cudaEvent_t event) : event_(event) {}
  cudaEvent_t event_ = nullptr;
};

// An instantiated CUDA graph, made by capturing the work a thread enqueues
// on a stream (BeginCapture … GraphExec::EndCapture) and launched as one
// call. Destroyed with the object.
class GraphExec {
 public:
  // Ends the capture begun by BeginCapture on `stream` and instantiates
  // what it recorded. On error (including a capture that an unsupported
  // call invalidated) the stream has left capture mode all the same.
  static absl::StatusOr<GraphExec> EndCapture(cudaStream_t stream);

  GraphExec() = default;
  GraphExec(GraphExec&& other) noexcept;
  GraphExec& operator=(GraphExec&& other) noexcept;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec();

  bool valid() const { return exec_ != nullptr; }
  absl::Status Launch(cudaStream_t stream) const;

 private:
  explicit GraphExec(cudaGraphExec_t exec) : exec_(exec) {}
  cudaGraphExec_t exec_ = nullptr;
};

// Starts recording, not running, what this thread enqueues on `stream`
// (thread-local mode: other threads' CUDA calls are unaffected).
absl::Status BeginCapture(cudaStream_t stream);

// Asynchronous copies on `stream` (host memory should be pinned for the
// copy to overlap). INTERNAL on a runtime error.
absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes,
                          cudaStream_t stream);
absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes,
                        cudaStream_t stream);
// Fills `bytes` bytes of device memory with `byte` (e.g. 0xff: NaN poison
// for fp32, fp16 and bf16 alike).
absl::Status FillDevice(void* device_dst, int byte, size_t bytes,
                        cudaStream_t stream);

}  // namespace kvmem::cuda

#endif  // KVMEM_KERNELS_CUDA_DEVICE_MEMORY_H_
