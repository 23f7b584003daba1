// kvmemctl: list, describe and delete the sessions of a kvmem server, and
// print its stats. Aligned text for people, --json for scripts.
//
// The flags are parsed here rather than by absl::ParseCommandLine, which
// exits 1 on an unknown flag: kvmemctl promises 2 for every usage error.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "client/cpp/kvmem_client.h"
#include "google/protobuf/util/json_util.h"

namespace kvmem {
namespace {

constexpr char kUsage[] =
    R"(kvmemctl: inspect and manage the sessions of a kvmem server.

usage: kvmemctl [flags] <command>

commands:
  list            every session of the tenant, one row each: id, layers,
                  position, durable position, resident tokens, spilled
                  pages and bytes, labels
  describe <id>   one session: shape, policy (every default filled in),
                  durability, labels, position and durable position,
                  resident tokens, spilled pages and bytes, and per layer
                  the next position and the durable position
  delete <id>     remove a session and all its stored data
  stats           server-wide figures (backend, sessions, steps, bytes)

flags:
  --address=HOST:PORT  the server (default 127.0.0.1:50051)
  --tenant=NAME        act as this tenant (the kvmem-tenant metadata);
                       default: none, which the server reads as "default"
  --json               print JSON instead of aligned text: the kvmem.v1
                       messages (Session, ListSessionsResponse,
                       GetStatsResponse) in protobuf's JSON mapping with the
                       .proto's field names, every field present; 64-bit
                       integers are strings, as that mapping says
  --deadline_ms=N      deadline of each call in milliseconds (default 10000)
  --help               print this text

exit status: 0 done; 1 the server answered with an error (its code and
message go to stderr); 2 a usage error.
)";

constexpr int kExitOk = 0;
constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;

struct Args {
  ClientOptions options;
  bool json = false;
  bool help = false;
  std::vector<std::string> positional;
};

int UsageError(const std::string& message) {
  std::fprintf(stderr, "kvmemctl: %s\n(kvmemctl --help explains)\n",
               message.c_str());
  return kExitUsage;
}

int RpcError(const absl::Status& status) {
  std::fprintf(stderr, "kvmemctl: %s: %s\n",
               absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return kExitRpcError;
}

// Parses argv into `args`; on a usage error returns its message.
std::string ParseArgs(int argc, char** argv, Args* args) {
  args->options.deadline = absl::Seconds(10);
  bool flags_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (flags_done || arg.size() < 2 || arg[0] != '-') {
      args->positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      continue;
    }
    absl::string_view flag = arg;
    if (!absl::ConsumePrefix(&flag, "--")) absl::ConsumePrefix(&flag, "-");
    std::string name(flag), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      has_value = true;
    }
    if (name == "help" || name == "h") {
      args->help = true;
    } else if (name == "json") {
      if (has_value && value != "true" && value != "false") {
        return absl::StrCat("--json takes true or false, got \"", value, "\"");
      }
      args->json = !has_value || value == "true";
    } else if (name == "address" || name == "tenant" || name == "deadline_ms") {
      if (!has_value) {
        if (i + 1 >= argc) return absl::StrCat("--", name, " needs a value");
        value = argv[++i];
      }
      if (name == "address") {
        args->options.address = value;
      } else if (name == "tenant") {
        args->options.tenant = value;
      } else {
        int ms = 0;
        if (!absl::SimpleAtoi(value, &ms) || ms <= 0) {
          return absl::StrCat("--deadline_ms: \"", value,
                              "\", want a positive integer");
        }
        args->options.deadline = absl::Milliseconds(ms);
      }
    } else {
      return absl::StrCat("unknown flag ", arg);
    }
  }
  return "";
}

// Prints rows of cells with every column padded to its widest cell.
void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) {
      widths[c] = std::max(widths[c], row[c].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line.append(widths[c] - row[c].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

int PrintJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options)
           .ok()) {
    std::fprintf(stderr, "kvmemctl: could not print %s as JSON\n",
                 message.GetTypeName().c_str());
    return kExitRpcError;
  }
  std::printf("%s", json.c_str());
  if (json.empty() || json.back() != '\n') std::printf("\n");
  return kExitOk;
}

// "DTYPE_FP32" -> "FP32": the enum's name without its prefix.
std::string EnumName(const std::string& name, absl::string_view prefix) {
  absl::string_view shown = name;
  absl::ConsumePrefix(&shown, prefix);
  return std::string(shown);
}

std::string Labels(const v1::Session& s) {
  std::map<std::string, std::string> sorted(s.labels().begin(),
                                            s.labels().end());
  return sorted.empty() ? "-"
                        : absl::StrJoin(sorted, ",", absl::PairFormatter("="));
}

std::string Time(int64_t unix_micros) {
  if (unix_micros == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ",
                          absl::FromUnixMicros(unix_micros),
                          absl::UTCTimeZone());
}

int List(Client& client, bool json) {
  absl::StatusOr<std::vector<v1::Session>> sessions = client.ListSessions();
  if (!sessions.ok()) return RpcError(sessions.status());
  if (json) {
    v1::ListSessionsResponse all;
    for (v1::Session& s : *sessions) *all.add_sessions() = std::move(s);
    return PrintJson(all);
  }
  std::vector<std::vector<std::string>> rows = {
      {"SESSION", "LAYERS", "POSITION", "DURABLE", "RESIDENT_TOKENS",
       "SPILLED_PAGES", "SPILLED_BYTES", "LABELS"}};
  for (const v1::Session& s : *sessions) {
    rows.push_back(
        {s.session_id(), absl::StrCat(s.shape().layers()),
         absl::StrCat(s.position()), absl::StrCat(s.durable_position()),
         absl::StrCat(s.resident_tokens()), absl::StrCat(s.spilled_pages()),
         absl::StrCat(s.spilled_bytes()), Labels(s)});
  }
  PrintTable(rows);
  std::printf("%zu sessions\n", sessions->size());
  return kExitOk;
}

void AddShapeRows(const v1::ModelShape& shape,
                  std::vector<std::vector<std::string>>* rows) {
  rows->push_back({"shape.layers", absl::StrCat(shape.layers())});
  rows->push_back({"shape.kv_heads", absl::StrCat(shape.kv_heads())});
  rows->push_back({"shape.query_heads", absl::StrCat(shape.query_heads())});
  rows->push_back({"shape.head_dim", absl::StrCat(shape.head_dim())});
  rows->push_back(
      {"shape.dtype", EnumName(v1::DType_Name(shape.dtype()), "DTYPE_")});
  rows->push_back(
      {"shape.softmax_scale", absl::StrFormat("%.9g", shape.softmax_scale())});
  const v1::Rotary& r = shape.rotary();
  if (r.base_theta() > 0) {
    rows->push_back(
        {"shape.rotary",
         absl::StrCat("base_theta ", r.base_theta(), ", dims ", r.rotary_dims(),
                      r.interleaved() ? ", interleaved" : ", half-split",
                      ", scaling ",
                      EnumName(v1::RotaryScaling_Name(r.scaling()),
                               "ROTARY_SCALING_"))});
  }
}

void AddPolicyRows(const v1::CachePolicy& p,
                   std::vector<std::vector<std::string>>* rows) {
  rows->push_back({"policy.sinks", absl::StrCat(p.sinks())});
  rows->push_back({"policy.cascades", absl::StrCat(p.cascades())});
  rows->push_back({"policy.window", absl::StrCat(p.window())});
  rows->push_back({"policy.page_tokens", absl::StrCat(p.page_tokens())});
  rows->push_back(
      {"policy.step_budget_tokens", absl::StrCat(p.step_budget_tokens())});
  rows->push_back({"policy.recent_tokens", absl::StrCat(p.recent_tokens())});
  rows->push_back({"policy.ema_beta", absl::StrFormat("%.15g", p.ema_beta())});
  rows->push_back({"policy.score_reduction",
                   EnumName(v1::ScoreReduction_Name(p.score_reduction()),
                            "SCORE_REDUCTION_")});
  rows->push_back({"policy.eager_fill", p.eager_fill() ? "true" : "false"});
  rows->push_back({"policy.positions_mode",
                   EnumName(v1::PositionsMode_Name(p.positions_mode()),
                            "POSITIONS_MODE_")});
  rows->push_back({"policy.recall", p.recall() ? "true" : "false"});
  rows->push_back(
      {"policy.dense_layers",
       absl::StrCat("[", absl::StrJoin(p.dense_layers(), ","), "]")});
  rows->push_back(
      {"policy.spill_quota_bytes", absl::StrCat(p.spill_quota_bytes())});
  rows->push_back(
      {"policy.idle_ttl_seconds", absl::StrCat(p.idle_ttl_seconds())});
}

int Describe(Client& client, const std::string& id, bool json) {
  absl::StatusOr<v1::Session> got = client.GetSession(id);
  if (!got.ok()) return RpcError(got.status());
  const v1::Session& s = *got;
  if (json) return PrintJson(s);
  std::vector<std::vector<std::string>> rows = {
      {"session_id", s.session_id()},
      {"tenant", s.tenant()},
      {"labels", Labels(s)},
      {"durability",
       EnumName(v1::Durability_Name(s.durability()), "DURABILITY_")}};
  AddShapeRows(s.shape(), &rows);
  AddPolicyRows(s.policy(), &rows);
  rows.push_back({"position", absl::StrCat(s.position())});
  rows.push_back({"durable_position", absl::StrCat(s.durable_position())});
  rows.push_back({"resident_tokens", absl::StrCat(s.resident_tokens())});
  {
    std::string per_cascade;
    for (int i = 0; i < s.resident_tokens_per_cascade_size(); ++i) {
      absl::StrAppend(&per_cascade, i == 0 ? "sinks " : ", c",
                      i == 0 ? "" : absl::StrCat(i - 1, " "),
                      s.resident_tokens_per_cascade(i));
    }
    rows.push_back({"resident_per_cascade", per_cascade});
  }
  rows.push_back({"spilled_pages", absl::StrCat(s.spilled_pages())});
  rows.push_back({"spilled_bytes", absl::StrCat(s.spilled_bytes())});
  rows.push_back({"created", Time(s.create_time_unix_micros())});
  rows.push_back({"last_used", Time(s.last_used_unix_micros())});
  PrintTable(rows);
  // A layer's durable position: the session's, as far as that layer got
  // (layers ahead of it are rolled back to it after a crash).
  std::printf("\n");
  std::vector<std::vector<std::string>> layers = {
      {"LAYER", "NEXT_POSITION", "DURABLE_POSITION"}};
  for (int l = 0; l < s.layer_next_positions_size(); ++l) {
    const int64_t next = s.layer_next_positions(l);
    layers.push_back({absl::StrCat(l), absl::StrCat(next),
                      absl::StrCat(std::min(next, s.durable_position()))});
  }
  PrintTable(layers);
  return kExitOk;
}

int Delete(Client& client, const std::string& id, bool json) {
  if (absl::Status st = client.DeleteSession(id); !st.ok()) {
    return RpcError(st);
  }
  if (json) {
    v1::DeleteSessionRequest deleted;  // {"session_id": ...}, escaped
    deleted.set_session_id(id);
    return PrintJson(deleted);
  }
  std::printf("deleted %s\n", id.c_str());
  return kExitOk;
}

int Stats(Client& client, bool json) {
  absl::StatusOr<v1::GetStatsResponse> stats = client.GetStats();
  if (!stats.ok()) return RpcError(stats.status());
  if (json) return PrintJson(*stats);
  const v1::GetStatsResponse& s = *stats;
  PrintTable(
      {{"version", s.version()},
       {"backend", s.backend()},
       {"device", s.device()},
       {"uptime_seconds", absl::StrCat(s.uptime_seconds())},
       {"sessions", absl::StrCat(s.sessions())},
       {"steps", absl::StrCat(s.steps())},
       {"tokens_appended", absl::StrCat(s.tokens_appended())},
       {"resident_bytes", absl::StrCat(s.resident_bytes())},
       {"spilled_bytes", absl::StrCat(s.spilled_bytes())},
       {"spill_queue_bytes", absl::StrCat(s.spill_queue_bytes())},
       {"device_pool_bytes", absl::StrCat(s.device_pool_bytes())},
       {"device_pool_used_bytes", absl::StrCat(s.device_pool_used_bytes())},
       {"device_side_bytes", absl::StrCat(s.device_side_bytes())},
       {"device_attend_steps", absl::StrCat(s.device_attend_steps())}});
  return kExitOk;
}

int Main(int argc, char** argv) {
  Args args;
  if (std::string error = ParseArgs(argc, argv, &args); !error.empty()) {
    return UsageError(error);
  }
  if (args.help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  if (args.positional.empty()) return UsageError("no command given");
  const std::string& command = args.positional[0];
  const size_t want_args = command == "describe" || command == "delete" ? 2
                           : command == "list" || command == "stats"    ? 1
                                                                        : 0;
  if (want_args == 0) {
    return UsageError(absl::StrCat("unknown command \"", command, "\""));
  }
  if (args.positional.size() != want_args) {
    return UsageError(want_args == 2
                          ? absl::StrCat(command, " takes one session id")
                          : absl::StrCat(command, " takes no arguments"));
  }
  absl::StatusOr<std::unique_ptr<Client>> client =
      Client::Connect(args.options);
  if (!client.ok()) return UsageError(std::string(client.status().message()));
  if (command == "list") return List(**client, args.json);
  if (command == "stats") return Stats(**client, args.json);
  if (command == "describe") {
    return Describe(**client, args.positional[1], args.json);
  }
  return Delete(**client, args.positional[1], args.json);
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) { return kvmem::Main(argc, argv); }
