// Status propagation macros. Debian's Abseil 20220623 ships none.
#ifndef KVMEM_BASE_STATUS_MACROS_H_
#define KVMEM_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVMEM_CONCAT_INNER_(a, b) a##b
#define KVMEM_CONCAT_(a, b) KVMEM_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define KVMEM_RETURN_IF_ERROR(expr)                \
  do {                                             \
    absl::Status kvmem_status_ = (expr);           \
    if (!kvmem_status_.ok()) return kvmem_status_; \
  } while (false)

// `lhs = *expr` when `expr` (an absl::StatusOr) is OK; otherwise returns its
// status from the enclosing function. `lhs` may declare a variable.
#define KVMEM_ASSIGN_OR_RETURN(lhs, expr)                                     \
  KVMEM_ASSIGN_OR_RETURN_IMPL_(KVMEM_CONCAT_(kvmem_statusor_, __LINE__), lhs, \
                               expr)

#define KVMEM_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                 \
  if (!statusor.ok()) return statusor.status();           \
  lhs = std::move(*statusor)

#endif  // KVMEM_BASE_STATUS_MACROS_H_
