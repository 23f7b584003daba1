#include "kernels/cuda/device_memory.h"

#include <utility>

#include "kernels/cuda/cuda_status.h"

namespace kvmem::cuda {

// ---- CudaMemory (DeviceBuffer, PinnedHostBuffer) ---------------------------
namespace {

template <MemoryKind kKind>
cudaError_t AllocateMemory(void** ptr, size_t bytes) {
  return kKind == MemoryKind::kDevice ? cudaMalloc(ptr, bytes)
                                      : cudaMallocHost(ptr, bytes);
}

// A destructor cannot report; a free fails only after a sticky error,
// which the next checked call reports.
template <MemoryKind kKind>
void FreeMemory(void* ptr) {
  if (ptr == nullptr) return;
  (void)(kKind == MemoryKind::kDevice ? cudaFree(ptr) : cudaFreeHost(ptr));
}

}  // namespace

template <MemoryKind kKind>
absl::StatusOr<CudaMemory<kKind>> CudaMemory<kKind>::Allocate(size_t bytes) {
  if (bytes == 0) return CudaMemory();
  void* ptr = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(AllocateMemory<kKind>(&ptr, bytes));
  return CudaMemory(ptr, bytes);
}

template <MemoryKind kKind>
CudaMemory<kKind>::CudaMemory(CudaMemory&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

template <MemoryKind kKind>
CudaMemory<kKind>& CudaMemory<kKind>::operator=(CudaMemory&& other) noexcept {
  if (this != &other) {
    FreeMemory<kKind>(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

template <MemoryKind kKind>
CudaMemory<kKind>::~CudaMemory() {
  FreeMemory<kKind>(ptr_);
}

template class CudaMemory<MemoryKind::kDevice>;
template class CudaMemory<MemoryKind::kPinnedHost>;

// ---- Stream ---------------------------------------------------------------
absl::StatusOr<Stream> Stream::Create() {
  cudaStream_t stream = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return Stream(stream);
}

Stream::Stream(Stream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Stream::~Stream() {
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

absl::Status Stream::Synchronize() const {
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

// ---- Event ----------------------------------------------------------------
absl::StatusOr<Event> Event::Create(bool timing) {
  cudaEvent_t event = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(
      &event, timing ? cudaEventDefault : cudaEventDisableTiming));
  return Event(event);
}

Event::Event(Event&& other) noexcept
    : event_(std::exchange(other.event_, nullptr)) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

Event::~Event() {
  if (event_ != nullptr) (void)cudaEventDestroy(event_);
}

absl::Status Event::Record(cudaStream_t stream) const {
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
  return absl::OkStatus();
}

absl::Status Event::Synchronize() const {
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
  return absl::OkStatus();
}

absl::StatusOr<float> Event::ElapsedMsSince(const Event& start) const {
  float ms = 0.0f;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

// ---- copies -----------------------------------------------------------------
absl::Status BeginCapture(cudaStream_t stream) {
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  return absl::OkStatus();
}

absl::StatusOr<GraphExec> GraphExec::EndCapture(cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);  // the instance keeps what it needs
  KVMEM_CUDA_RETURN_IF_ERROR(err);
  return GraphExec(exec);
}

GraphExec::GraphExec(GraphExec&& other) noexcept
    : exec_(std::exchange(other.exec_, nullptr)) {}

GraphExec& GraphExec::operator=(GraphExec&& other) noexcept {
  if (this != &other) {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

GraphExec::~GraphExec() {
  if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
}

absl::Status GraphExec::Launch(cudaStream_t stream) const {
  KVMEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, stream));
  return absl::OkStatus();
}

absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes,
                          cudaStream_t stream) {
  if (bytes == 0) return absl::OkStatus();
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, host_src, bytes,
                                             cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes,
                        cudaStream_t stream) {
  if (bytes == 0) return absl::OkStatus();
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_dst, device_src, bytes,
                                             cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

absl::Status FillDevice(void* device_dst, int byte, size_t bytes,
                        cudaStream_t stream) {
  if (bytes == 0) return absl::OkStatus();
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(device_dst, byte, bytes, stream));
  return absl::OkStatus();
}

}  // namespace kvmem::cuda
