#include "client/cpp/kvmem_client.h"

#include <climits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/connection.h"
#include "google/protobuf/arena.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace kvmem {
namespace {

bool IsTenantChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

}  // namespace

absl::Status ClientOptions::Validate() const {
  if (address.empty()) {
    return absl::InvalidArgumentError("ClientOptions.address: empty");
  }
  if (tenant.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ClientOptions.tenant: ", tenant.size(), " characters, at most 64"));
  }
  for (char c : tenant) {
    if (!IsTenantChar(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClientOptions.tenant: \"", tenant,
                       "\" has a character outside [A-Za-z0-9._-]"));
    }
  }
  if (deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.deadline: ", absl::FormatDuration(deadline),
                     ", want > 0"));
  }
  if (max_message_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.max_message_bytes: ", max_message_bytes,
                     ", want 1024..", INT_MAX));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const ClientOptions& options) {
  if (absl::Status st = options.Validate(); !st.ok()) return st;
  auto connection = std::make_unique<client_internal::Connection>();
  connection->options = options;
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(options.max_message_bytes);
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  connection->channel = grpc::CreateCustomChannel(
      options.address, grpc::InsecureChannelCredentials(), args);
  if (connection->channel == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ClientOptions.address: no channel to \"", options.address, "\""));
  }
  connection->stub = v1::KvMemory::NewStub(connection->channel);
  return std::unique_ptr<Client>(new Client(std::move(connection)));
}

Client::Client(std::unique_ptr<client_internal::Connection> connection)
    : connection_(std::move(connection)) {}

Client::~Client() = default;

const ClientOptions& Client::options() const { return connection_->options; }

absl::StatusOr<std::unique_ptr<Session>> Client::CreateSession(
    const SessionSpec& spec) {
  v1::CreateSessionRequest request;
  request.set_session_id(spec.session_id);
  *request.mutable_shape() = spec.shape;
  *request.mutable_policy() = spec.policy;
  request.set_durability(spec.durability);
  request.mutable_labels()->insert(spec.labels.begin(), spec.labels.end());
  v1::Session created;
  auto context = connection_->NewContext(connection_->options.deadline);
  grpc::Status st =
      connection_->stub->CreateSession(context.get(), request, &created);
  if (!st.ok()) return client_internal::FromGrpc(st);
  return std::unique_ptr<Session>(new Session(this, created));
}

absl::StatusOr<std::unique_ptr<Session>> Client::OpenSession(
    const std::string& session_id) {
  absl::StatusOr<v1::Session> described = GetSession(session_id);
  if (!described.ok()) return described.status();
  return std::unique_ptr<Session>(new Session(this, *described));
}

absl::StatusOr<v1::Session> Client::GetSession(const std::string& session_id) {
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  v1::Session described;
  auto context = connection_->NewContext(connection_->options.deadline);
  grpc::Status st =
      connection_->stub->GetSession(context.get(), request, &described);
  if (!st.ok()) return client_internal::FromGrpc(st);
  return described;
}

absl::StatusOr<std::vector<v1::Session>> Client::ListSessions(
    const std::map<std::string, std::string>& label_filter, int page_size) {
  v1::ListSessionsRequest request;
  request.set_page_size(page_size);
  request.mutable_label_filter()->insert(label_filter.begin(),
                                         label_filter.end());
  std::vector<v1::Session> sessions;
  do {
    v1::ListSessionsResponse page;
    auto context = connection_->NewContext(connection_->options.deadline);
    grpc::Status st =
        connection_->stub->ListSessions(context.get(), request, &page);
    if (!st.ok()) return client_internal::FromGrpc(st);
    for (v1::Session& session : *page.mutable_sessions()) {
      sessions.push_back(std::move(session));
    }
    request.set_page_token(page.next_page_token());
  } while (!request.page_token().empty());
  return sessions;
}

absl::Status Client::DeleteSession(const std::string& session_id) {
  v1::DeleteSessionRequest request;
  request.set_session_id(session_id);
  v1::DeleteSessionResponse response;
  auto context = connection_->NewContext(connection_->options.deadline);
  return client_internal::FromGrpc(
      connection_->stub->DeleteSession(context.get(), request, &response));
}

absl::StatusOr<v1::GetStatsResponse> Client::GetStats() {
  v1::GetStatsResponse stats;
  auto context = connection_->NewContext(connection_->options.deadline);
  grpc::Status st =
      connection_->stub->GetStats(context.get(), v1::GetStatsRequest(), &stats);
  if (!st.ok()) return client_internal::FromGrpc(st);
  return stats;
}

absl::StatusOr<StepReply> Client::Step(
    int layer, v1::StepMode mode, absl::Span<const StepEntryView> entries) {
  // The request lives on a short-lived arena (its entries freed at once);
  // the response on one the reply keeps.
  google::protobuf::Arena request_arena;
  auto* request =
      google::protobuf::Arena::CreateMessage<v1::StepRequest>(&request_arena);
  client_internal::FillStepRequest(layer, mode, entries, 0, request);
  auto arena = std::make_unique<google::protobuf::Arena>();
  auto* response =
      google::protobuf::Arena::CreateMessage<v1::StepResponse>(arena.get());
  auto context = connection_->NewContext(connection_->options.deadline);
  grpc::Status st = connection_->stub->Step(context.get(), *request, response);
  if (!st.ok()) return client_internal::FromGrpc(st);
  return StepReplyMaker::Make(std::move(arena), response);
}

std::unique_ptr<StepStream> Client::OpenStepStream(absl::Duration deadline) {
  return std::unique_ptr<StepStream>(
      new StepStream(connection_.get(), deadline));
}

}  // namespace kvmem
