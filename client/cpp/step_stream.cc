#include "client/cpp/step_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/connection.h"
#include "google/protobuf/arena.h"
#include "grpcpp/support/sync_stream.h"

namespace kvmem {

struct StepStream::Call {
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::StepRequest, v1::StepStreamResponse>>
      stream;
  // Reused by every Send: Clear() keeps its entries and their buffers, so
  // a decode loop stops allocating after its first requests.
  v1::StepRequest request;
};

StepStream::StepStream(const client_internal::Connection* connection,
                       absl::Duration deadline)
    : call_(std::make_unique<Call>()) {
  call_->context = connection->NewContext(deadline);
  call_->stream = connection->stub->StepStream(call_->context.get());
}

StepStream::~StepStream() {
  if (!open_) return;
  call_->context->TryCancel();
  // Abandoned on purpose: the status (CANCELLED) has no reader.
  End(/*expected_end=*/false).IgnoreError();
}

absl::StatusOr<uint64_t> StepStream::Send(
    int layer, v1::StepMode mode, absl::Span<const StepEntryView> entries) {
  if (!open_) {
    if (!final_status_.ok()) return final_status_;
    return absl::FailedPreconditionError("StepStream::Send: closed");
  }
  const uint64_t request_id = sent_ + 1;
  client_internal::FillStepRequest(layer, mode, entries, request_id,
                                   &call_->request);
  // The sync API serializes during Write, so the message is free after.
  if (!call_->stream->Write(call_->request)) {
    return End(/*expected_end=*/false);
  }
  sent_ = request_id;
  return request_id;
}

absl::StatusOr<StepReply> StepStream::Receive() {
  if (!open_) {
    if (!final_status_.ok()) return final_status_;
    return absl::FailedPreconditionError("StepStream::Receive: closed");
  }
  if (sent_ == received_) {
    return absl::FailedPreconditionError(
        "StepStream::Receive: no request in flight");
  }
  // Each reply gets its own arena: the StepReply keeps it, and its fetched
  // heads and their positions go to the arena's blocks, freed at once.
  auto arena = std::make_unique<google::protobuf::Arena>();
  auto* reply = google::protobuf::Arena::CreateMessage<v1::StepStreamResponse>(
      arena.get());
  if (!call_->stream->Read(reply)) return End(/*expected_end=*/false);
  const uint64_t expected_id = ++received_;
  if (reply->request_id() != expected_id) {
    return absl::InternalError(
        absl::StrCat("StepStream: a reply to request ", reply->request_id(),
                     " came in place of request ", expected_id, "'s"));
  }
  if (reply->error_code() != 0) {
    return client_internal::FromCode(reply->error_code(),
                                     reply->error_message());
  }
  return StepReplyMaker::Make(std::move(arena), &reply->response());
}

absl::StatusOr<StepReply> StepStream::Step(
    int layer, v1::StepMode mode, absl::Span<const StepEntryView> entries) {
  if (open_ && sent_ != received_) {
    return absl::FailedPreconditionError(
        absl::StrCat("StepStream::Step: ", in_flight(),
                     " requests in flight would be answered first; Receive "
                     "them, or use Send"));
  }
  absl::StatusOr<uint64_t> sent = Send(layer, mode, entries);
  if (!sent.ok()) return sent.status();
  return Receive();
}

absl::Status StepStream::Close() {
  if (!open_) return final_status_;
  // A failed WritesDone means the stream already broke; Finish says how.
  call_->stream->WritesDone();
  return End(/*expected_end=*/true);
}

absl::Status StepStream::End(bool expected_end) {
  v1::StepStreamResponse dropped;
  while (call_->stream->Read(&dropped)) {
    ++received_;
  }
  const grpc::Status status = call_->stream->Finish();
  open_ = false;
  final_status_ = client_internal::FromGrpc(status);
  if (final_status_.ok() && !expected_end) {
    final_status_ = absl::UnavailableError(
        absl::StrCat("StepStream: the server ended the stream with ",
                     in_flight(), " requests unanswered"));
  }
  return final_status_;
}

}  // namespace kvmem
