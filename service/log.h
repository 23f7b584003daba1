// Structured log lines on stderr, one event per line in logfmt:
//   ts=2026-11-24T01:02:03.456789Z event=session_created tenant=acme
//   session=chat-1
// Values with spaces, quotes or '=' are quoted. Thread-safe: each line is
// written with one call.
#ifndef KVMEM_SERVICE_LOG_H_
#define KVMEM_SERVICE_LOG_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace kvmem {

using LogField = std::pair<absl::string_view, std::string>;

// Writes `event` and `fields` as one line.
void LogEvent(absl::string_view event, std::initializer_list<LogField> fields);

// As LogEvent, but at most 10 such lines a second server-wide: for events
// a bad client can cause at line rate (rejected steps).
void LogEventThrottled(absl::string_view event,
                       std::initializer_list<LogField> fields);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_LOG_H_
