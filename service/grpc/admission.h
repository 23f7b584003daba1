// Bounds the step work waiting for or running on the WorkPool: at most
// `max_requests` requests and `max_bytes` of their tensors at once. Past
// either, a request is refused at once with RESOURCE_EXHAUSTED naming the
// limit, so an overloaded server answers promptly and its memory stays
// bounded instead of queueing without end. Thread-safe.
#ifndef KVMEM_SERVICE_GRPC_ADMISSION_H_
#define KVMEM_SERVICE_GRPC_ADMISSION_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvmem {

class Admission {
 public:
  Admission(int64_t max_requests, int64_t max_bytes)
      : max_requests_(max_requests), max_bytes_(max_bytes) {}

  // OK and counted (the caller must Release(bytes) when done), or
  // RESOURCE_EXHAUSTED and not counted.
  absl::Status Admit(int64_t bytes) {
    const int64_t requests = requests_.fetch_add(1) + 1;
    const int64_t total = bytes_.fetch_add(bytes) + bytes;
    if (requests <= max_requests_ && (total <= max_bytes_ || requests == 1)) {
      return absl::OkStatus();
    }
    Release(bytes);
    if (requests > max_requests_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "server overloaded: ", max_requests_,
          " step requests in progress, the limit (--max_queued_requests); "
          "nothing was applied, retry later"));
    }
    return absl::ResourceExhaustedError(absl::StrCat(
        "server overloaded: step requests in progress hold ", total - bytes,
        " bytes, this one ", bytes, ", limit ", max_bytes_,
        " (--max_queued_bytes); nothing was applied, retry later"));
  }

  void Release(int64_t bytes) {
    requests_.fetch_sub(1);
    bytes_.fetch_sub(bytes);
  }

  int64_t queued_bytes() const { return bytes_.load(); }

 private:
  const int64_t max_requests_;
  const int64_t max_bytes_;
  std::atomic<int64_t> requests_{0};
  std::atomic<int64_t> bytes_{0};
};

// One admitted request's share, released when the last copy goes away:
// whether the request ran, was refused later, or was never queued.
class AdmissionTicket {
 public:
  AdmissionTicket(Admission* admission, int64_t bytes)
      : admission_(admission), bytes_(bytes) {}
  ~AdmissionTicket() { admission_->Release(bytes_); }
  AdmissionTicket(const AdmissionTicket&) = delete;
  AdmissionTicket& operator=(const AdmissionTicket&) = delete;

 private:
  Admission* const admission_;  // not owned; outlives every ticket
  const int64_t bytes_;
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_ADMISSION_H_
