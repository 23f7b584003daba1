// The built kvmemctl and kvmem_toy_decode binaries, run as processes against
// a real server on 127.0.0.1:0: their output, --json and exit codes.
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/cpp/kvmem_client.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/client/server_fixture.h"

namespace kvmem {
namespace {

using ::kvmem::testing::Contains;

struct Finished {
  int exit_code = -1;  // -1 unless the process exited normally
  std::string out;
  std::string err;
};

class ToolsTest : public testing::ServerFixture {
 protected:
  // Runs `binary` with `args` (a shell fragment) and waits for it.
  Finished Run(const std::string& binary, const std::string& args) {
    const std::string err_path = dir_.path() + "/stderr.txt";
    const std::string command =
        absl::StrCat(binary, " ", args, " 2>", err_path);
    Finished result;
    FILE* pipe = popen(command.c_str(), "r");
    EXPECT_NE(pipe, nullptr) << command;
    if (pipe == nullptr) return result;
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
      result.out.append(buffer, n);
    }
    const int status = pclose(pipe);
    if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
    std::ifstream err(err_path);
    std::stringstream text;
    text << err.rdbuf();
    result.err = text.str();
    return result;
  }

  // kvmemctl against this test's server.
  Finished Ctl(const std::string& args) {
    return Run(KVMEMCTL_PATH,
               absl::StrCat("--address=", server_->address(), " ", args));
  }

  // Two sessions: "alpha" (labelled, 3 tokens in layer 1), "beta".
  void MakeSessions() {
    SessionSpec spec = SmallFp32("alpha");
    spec.labels["team"] = "search";
    absl::StatusOr<std::unique_ptr<Session>> alpha =
        client_->CreateSession(spec);
    ASSERT_TRUE(alpha.ok()) << alpha.status();
    std::vector<uint8_t> q((*alpha)->q_bytes(3), 0x3f);
    std::vector<uint8_t> kv((*alpha)->kv_bytes(3), 0x3e);
    ASSERT_TRUE((*alpha)->Step(1, v1::STEP_MODE_APPEND, q, kv, kv, 3).ok());
    ASSERT_TRUE(client_->CreateSession(SmallFp32("beta")).ok());
  }
};

template <typename Message>
::testing::AssertionResult ParseJson(const std::string& json, Message* out) {
  if (google::protobuf::util::JsonStringToMessage(json, out).ok()) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << "not JSON of " << out->GetTypeName() << ": " << json;
}

TEST_F(ToolsTest, KvmemctlListsDescribesAndDeletes) {
  MakeSessions();

  Finished list = Ctl("list");
  EXPECT_EQ(list.exit_code, 0) << list.err;
  EXPECT_TRUE(list.err.empty()) << list.err;
  EXPECT_TRUE(Contains(list.out, "SESSION")) << list.out;
  EXPECT_TRUE(Contains(list.out, "alpha")) << list.out;
  EXPECT_TRUE(Contains(list.out, "team=search")) << list.out;
  EXPECT_TRUE(Contains(list.out, "beta")) << list.out;
  EXPECT_TRUE(Contains(list.out, "2 sessions")) << list.out;

  Finished json_list = Ctl("--json list");
  EXPECT_EQ(json_list.exit_code, 0) << json_list.err;
  v1::ListSessionsResponse listed;
  ASSERT_TRUE(ParseJson(json_list.out, &listed));
  ASSERT_EQ(listed.sessions_size(), 2);
  EXPECT_EQ(listed.sessions(0).session_id(), "alpha");
  EXPECT_EQ(listed.sessions(1).session_id(), "beta");

  Finished describe = Ctl("describe alpha");
  EXPECT_EQ(describe.exit_code, 0) << describe.err;
  for (const char* part :
       {"session_id", "policy.window", "policy.page_tokens", "shape.dtype",
        "FP32", "durable_position", "resident_tokens", "spilled_pages",
        "spilled_bytes", "LAYER", "NEXT_POSITION", "DURABLE_POSITION"}) {
    EXPECT_TRUE(Contains(describe.out, part)) << part << "\n" << describe.out;
  }
  // Aligned text: the value column starts at one offset on every row.
  EXPECT_TRUE(Contains(describe.out, "policy.window              64\n"))
      << describe.out;
  EXPECT_TRUE(Contains(describe.out, "resident_tokens            6\n"))
      << describe.out;

  Finished json_describe = Ctl("--json describe alpha");
  EXPECT_EQ(json_describe.exit_code, 0) << json_describe.err;
  v1::Session described;
  ASSERT_TRUE(ParseJson(json_describe.out, &described));
  absl::StatusOr<v1::Session> truth = client_->GetSession("alpha");
  ASSERT_TRUE(truth.ok());
  described.clear_last_used_unix_micros();
  truth->clear_last_used_unix_micros();
  EXPECT_EQ(described.SerializeAsString(), truth->SerializeAsString())
      << json_describe.out;
  EXPECT_EQ(described.layer_next_positions(1), 3);
  EXPECT_EQ(described.resident_tokens(), 6);
  // Zero-valued fields are printed too, for scripts.
  EXPECT_TRUE(Contains(json_describe.out, "\"spilled_pages\""))
      << json_describe.out;

  Finished missing = Ctl("describe ghost");
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_TRUE(missing.out.empty()) << missing.out;
  EXPECT_TRUE(Contains(missing.err, "NOT_FOUND")) << missing.err;
  EXPECT_TRUE(Contains(missing.err, "ghost")) << missing.err;

  Finished other_tenant = Ctl("--tenant=other list");
  EXPECT_EQ(other_tenant.exit_code, 0) << other_tenant.err;
  EXPECT_TRUE(Contains(other_tenant.out, "0 sessions")) << other_tenant.out;

  Finished deleted = Ctl("delete beta");
  EXPECT_EQ(deleted.exit_code, 0) << deleted.err;
  EXPECT_TRUE(Contains(deleted.out, "deleted beta")) << deleted.out;
  EXPECT_EQ(client_->GetSession("beta").status().code(),
            absl::StatusCode::kNotFound);
  Finished again = Ctl("--json delete beta");
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_TRUE(Contains(again.err, "NOT_FOUND")) << again.err;
  Finished json_deleted = Ctl("--json delete alpha");
  EXPECT_EQ(json_deleted.exit_code, 0) << json_deleted.err;
  v1::DeleteSessionRequest which;
  ASSERT_TRUE(ParseJson(json_deleted.out, &which));
  EXPECT_EQ(which.session_id(), "alpha");

  Finished stats = Ctl("stats");
  EXPECT_EQ(stats.exit_code, 0) << stats.err;
  EXPECT_TRUE(Contains(stats.out, "backend")) << stats.out;
  EXPECT_TRUE(Contains(stats.out, "cpu")) << stats.out;
  Finished json_stats = Ctl("--json stats");
  EXPECT_EQ(json_stats.exit_code, 0) << json_stats.err;
  v1::GetStatsResponse parsed;
  ASSERT_TRUE(ParseJson(json_stats.out, &parsed));
  EXPECT_EQ(parsed.backend(), "cpu");
  EXPECT_EQ(parsed.sessions(), 0);
  EXPECT_EQ(parsed.steps(), 1);
}

TEST_F(ToolsTest, KvmemctlUsageErrorsExitTwo) {
  for (const char* args :
       {"", "frobnicate", "describe", "delete a b", "list extra",
        "--bogus list", "--tenant", "--json=maybe list",
        "--deadline_ms=-5 list", "'--tenant=has space' list"}) {
    Finished usage = Ctl(args);
    EXPECT_EQ(usage.exit_code, 2) << "args: " << args << "\n" << usage.err;
    EXPECT_TRUE(Contains(usage.err, "kvmemctl: ")) << usage.err;
    EXPECT_TRUE(usage.out.empty()) << usage.out;
  }
  Finished help = Run(KVMEMCTL_PATH, "--help");
  EXPECT_EQ(help.exit_code, 0);
  for (const char* part : {"usage: kvmemctl", "describe <id>", "--json",
                           "--address", "--tenant", "exit status"}) {
    EXPECT_TRUE(Contains(help.out, part)) << part;
  }
}

TEST_F(ToolsTest, KvmemctlReportsAnUnreachableServer) {
  server_->Shutdown(absl::Seconds(5));
  Finished down = Ctl("list");
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_TRUE(Contains(down.err, "UNAVAILABLE")) << down.err;
}

TEST_F(ToolsTest, ToyDecodeRunsAFewTokens) {
  for (const char* dtype : {"bf16", "fp32"}) {
    Finished run =
        Run(KVMEM_TOY_DECODE_PATH,
            absl::StrCat("--address=", server_->address(), " --dtype=", dtype,
                         " --prefill_tokens=4 --decode_tokens=3"));
    EXPECT_EQ(run.exit_code, 0) << run.err << run.out;
    EXPECT_TRUE(Contains(run.out, "prefill: 4 tokens x 4 layers")) << run.out;
    EXPECT_TRUE(Contains(run.out, "token 2 (position 6)")) << run.out;
    EXPECT_TRUE(Contains(run.out, "deleted session")) << run.out;
  }
  // It cleaned up after itself.
  absl::StatusOr<std::vector<v1::Session>> left = client_->ListSessions();
  ASSERT_TRUE(left.ok());
  EXPECT_TRUE(left->empty());
}

}  // namespace
}  // namespace kvmem
