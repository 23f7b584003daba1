#include "service/log.h"

#include <atomic>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvmem {
namespace {

void AppendValue(std::string* line, absl::string_view value) {
  bool plain = !value.empty();
  for (char c : value) {
    plain = plain && c > ' ' && c != '"' && c != '=' && c != '\\';
  }
  if (plain) {
    line->append(value.data(), value.size());
    return;
  }
  line->push_back('"');
  for (char c : value) {
    if (c == '"' || c == '\\') line->push_back('\\');
    if (c == '\n') {
      line->append("\\n");
      continue;
    }
    line->push_back(c);
  }
  line->push_back('"');
}

}  // namespace

void LogEvent(absl::string_view event, std::initializer_list<LogField> fields) {
  std::string line =
      absl::StrCat("ts=",
                   absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(),
                                    absl::UTCTimeZone()),
                   " event=");
  AppendValue(&line, event);
  for (const LogField& field : fields) {
    absl::StrAppend(&line, " ", field.first, "=");
    AppendValue(&line, field.second);
  }
  line.push_back('\n');
  std::fwrite(line.data(), 1, line.size(), stderr);
}

void LogEventThrottled(absl::string_view event,
                       std::initializer_list<LogField> fields) {
  // At most 10 throttled lines a second, server-wide.
  static std::atomic<int64_t> window_second{0};
  static std::atomic<int> in_window{0};
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  int64_t seen = window_second.load(std::memory_order_relaxed);
  if (seen != now && window_second.compare_exchange_strong(
                         seen, now, std::memory_order_relaxed)) {
    in_window.store(0, std::memory_order_relaxed);
  }
  if (in_window.fetch_add(1, std::memory_order_relaxed) >= 10) return;
  LogEvent(event, fields);
}

}  // namespace kvmem
