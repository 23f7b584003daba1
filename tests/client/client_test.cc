// kvmem::Client against a real server on 127.0.0.1:0 (server_fixture.h):
// the lifecycle, Step and StepStream (byte-equal to each other, and ATTEND
// equal to a naive attention computed here), and per-request stream errors.
// Every other promised status code: client_errors_test.cc.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/kvmem_client.h"
#include "gtest/gtest.h"
#include "tests/client/server_fixture.h"

namespace kvmem {
namespace {

using ::kvmem::testing::Bytes;
using ::kvmem::testing::Contains;
using ::kvmem::testing::RandomTokens;
using ::kvmem::testing::ServerFixture;
using ::kvmem::testing::Tokens;

float Fp32At(absl::Span<const uint8_t> bytes, size_t i) {
  float x;
  std::memcpy(&x, bytes.data() + i * 4, 4);
  return x;
}

using LifecycleTest = ServerFixture;

TEST_F(LifecycleTest, CreateGetListDeleteStats) {
  SessionSpec spec = SmallFp32("chat-1", 3);
  spec.labels["team"] = "a";
  absl::StatusOr<std::unique_ptr<Session>> chat = client_->CreateSession(spec);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ((*chat)->id(), "chat-1");
  EXPECT_EQ((*chat)->layers(), 3);
  EXPECT_EQ((*chat)->q_bytes(2), 2u * 4 * 64 * 4);
  EXPECT_EQ((*chat)->kv_bytes(), 2u * 64 * 4);
  for (int layer = 0; layer < 3; ++layer) {
    EXPECT_EQ((*chat)->next_position(layer), 0);
  }
  EXPECT_EQ((*chat)->next_position(3), -1);

  // An id chosen by the server, and more sessions to page through.
  absl::StatusOr<std::unique_ptr<Session>> generated =
      client_->CreateSession(SmallFp32(""));
  ASSERT_TRUE(generated.ok()) << generated.status();
  EXPECT_FALSE((*generated)->id().empty());
  for (int i = 0; i < 3; ++i) {
    SessionSpec labelled = SmallFp32(absl::StrCat("p", i));
    labelled.labels["team"] = i == 1 ? "a" : "b";
    ASSERT_TRUE(client_->CreateSession(labelled).ok());
  }

  absl::StatusOr<v1::Session> got = client_->GetSession("chat-1");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->tenant(), "default");
  EXPECT_EQ(got->shape().layers(), 3);
  EXPECT_EQ(got->policy().window(), 64);
  EXPECT_EQ(got->policy().step_budget_tokens(), 2048);  // the default
  EXPECT_EQ(got->labels().at("team"), "a");
  EXPECT_EQ(got->layer_next_positions_size(), 3);

  // Every page, in id order; page_size 2 takes three calls.
  absl::StatusOr<std::vector<v1::Session>> all = client_->ListSessions({}, 2);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 5u);
  for (size_t i = 1; i < all->size(); ++i) {
    EXPECT_LT((*all)[i - 1].session_id(), (*all)[i].session_id());
  }
  absl::StatusOr<std::vector<v1::Session>> team_a =
      client_->ListSessions({{"team", "a"}});
  ASSERT_TRUE(team_a.ok()) << team_a.status();
  ASSERT_EQ(team_a->size(), 2u);
  EXPECT_EQ((*team_a)[0].session_id(), "chat-1");
  EXPECT_EQ((*team_a)[1].session_id(), "p1");

  absl::StatusOr<v1::GetStatsResponse> stats = client_->GetStats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->sessions(), 5);
  EXPECT_EQ(stats->backend(), "cpu");

  // A second handle to the same session sees its positions.
  std::mt19937 rng(7);
  Tokens t = RandomTokens(**chat, 3, &rng);
  ASSERT_TRUE((*chat)->Step(1, v1::STEP_MODE_APPEND, t.q, t.k, t.v, 3).ok());
  absl::StatusOr<std::unique_ptr<Session>> opened =
      client_->OpenSession("chat-1");
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ((*opened)->next_position(0), 0);
  EXPECT_EQ((*opened)->next_position(1), 3);
  absl::StatusOr<v1::Session> described = (*opened)->Describe();
  ASSERT_TRUE(described.ok());
  EXPECT_EQ(described->resident_tokens(), 3 * 2);  // 3 tokens x 2 KV heads

  ASSERT_TRUE((*chat)->Delete().ok());
  EXPECT_EQ(client_->GetSession("chat-1").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ((*opened)->Refresh().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*opened)->next_position(1), 3);  // a failed Refresh keeps them
  EXPECT_EQ((*opened)->Delete().code(), absl::StatusCode::kNotFound);
  all = client_->ListSessions();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 4u);
}

using StepTest = ServerFixture;

// Two sessions of one spec step the same inputs, one with unary Steps and
// one on a StepStream: every reply is the same bytes.
TEST_F(StepTest, StepAndStepStreamAnswerByteEqual) {
  absl::StatusOr<std::unique_ptr<Session>> unary =
      client_->CreateSession(SmallFp32("unary"));
  absl::StatusOr<std::unique_ptr<Session>> streamed =
      client_->CreateSession(SmallFp32("streamed"));
  ASSERT_TRUE(unary.ok() && streamed.ok());
  std::unique_ptr<StepStream> stream = client_->OpenStepStream();
  const uint32_t seed = 11;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  // A prefill chunk of 5, then 8 decode tokens, each through both layers;
  // the last decode token FETCHes.
  for (int token = 0; token < 9; ++token) {
    const int num_tokens = token == 0 ? 5 : 1;
    const v1::StepMode mode =
        token == 8 ? v1::STEP_MODE_FETCH : v1::STEP_MODE_ATTEND;
    for (int layer = 0; layer < 2; ++layer) {
      Tokens t = RandomTokens(**unary, num_tokens, &rng);
      absl::StatusOr<StepReply> a =
          (*unary)->Step(layer, mode, t.q, t.k, t.v, num_tokens);
      absl::StatusOr<StepReply> b = (*streamed)->Step(
          layer, mode, t.q, t.k, t.v, num_tokens, stream.get());
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      const StepResultView& ra = a->result(0);
      const StepResultView& rb = b->result(0);
      EXPECT_EQ(ra.session_id, "unary");
      EXPECT_EQ(rb.session_id, "streamed");
      EXPECT_EQ(ra.next_position, rb.next_position);
      EXPECT_EQ((*streamed)->next_position(layer), rb.next_position);
      if (mode == v1::STEP_MODE_ATTEND) {
        ASSERT_EQ(ra.output.size(), (*unary)->q_bytes(num_tokens));
        ASSERT_EQ(ra.lse.size(), size_t(num_tokens) * 4 * 4);
        EXPECT_TRUE(std::equal(ra.output.begin(), ra.output.end(),
                               rb.output.begin(), rb.output.end()));
        EXPECT_TRUE(std::equal(ra.lse.begin(), ra.lse.end(), rb.lse.begin(),
                               rb.lse.end()));
        EXPECT_TRUE(ra.heads.empty());
      } else {
        ASSERT_EQ(ra.heads.size(), 2u);
        ASSERT_EQ(rb.heads.size(), 2u);
        for (size_t h = 0; h < 2; ++h) {
          // Every one of the 13 tokens, the new one included.
          ASSERT_EQ(ra.heads[h].positions.size(), 13u);
          EXPECT_EQ(ra.heads[h].positions[12], 12);
          EXPECT_TRUE(std::equal(
              ra.heads[h].positions.begin(), ra.heads[h].positions.end(),
              rb.heads[h].positions.begin(), rb.heads[h].positions.end()));
          EXPECT_TRUE(std::equal(ra.heads[h].k.begin(), ra.heads[h].k.end(),
                                 rb.heads[h].k.begin(), rb.heads[h].k.end()));
          EXPECT_TRUE(std::equal(ra.heads[h].v.begin(), ra.heads[h].v.end(),
                                 rb.heads[h].v.begin(), rb.heads[h].v.end()));
          // The new token's key comes back as sent: the last row of head h.
          EXPECT_TRUE(std::equal(ra.heads[h].k.end() - 64 * 4,
                                 ra.heads[h].k.end(),
                                 t.k.begin() + long(h) * 64 * 4));
        }
      }
    }
  }
  EXPECT_TRUE(stream->Close().ok());
  EXPECT_FALSE(stream->is_open());
  EXPECT_TRUE(stream->Close().ok());  // idempotent
  // The positions each handle tracked are the server's.
  for (Session* s : {unary->get(), streamed->get()}) {
    absl::StatusOr<v1::Session> d = s->Describe();
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d->layer_next_positions(0), 13);
    EXPECT_EQ(d->layer_next_positions(1), 13);
    EXPECT_EQ(d->position(), 13);
    EXPECT_EQ(s->next_position(1), 13);
  }
}

// What a session of SmallFp32's shape has been sent, per layer, to compute
// attention naively: every token attends to every earlier one and itself.
class NaiveAttention {
 public:
  static constexpr int kHq = 4, kH = 2, kD = 64;

  // Appends T tokens' k and v and checks the server's ATTEND `result` of
  // their queries `q`: output [T, Hq, D] and LSE [T, Hq] within fp32's
  // 1e-5 (absolute + relative).
  void StepAndCheck(const Tokens& t, int num_tokens,
                    const StepResultView& result) {
    keys_.insert(keys_.end(), t.k.begin(), t.k.end());
    values_.insert(values_.end(), t.v.begin(), t.v.end());
    const int64_t total = int64_t(keys_.size() / (kH * kD * 4));
    const double scale = 1.0 / std::sqrt(double(kD));
    ASSERT_EQ(result.output.size(), size_t(num_tokens) * kHq * kD * 4);
    ASSERT_EQ(result.lse.size(), size_t(num_tokens) * kHq * 4);
    for (int i = 0; i < num_tokens; ++i) {
      const int64_t last = total - num_tokens + i;  // causal in the chunk
      for (int h = 0; h < kHq; ++h) {
        const int g = h / (kHq / kH);
        std::vector<double> logits;
        double max_logit = -INFINITY;
        for (int64_t j = 0; j <= last; ++j) {
          double dot = 0;
          for (int d = 0; d < kD; ++d) {
            dot += double(Fp32At(t.q, (size_t(i) * kHq + h) * kD + d)) *
                   Fp32At(keys_, (size_t(j) * kH + g) * kD + d);
          }
          logits.push_back(dot * scale);
          max_logit = std::max(max_logit, logits.back());
        }
        double sum = 0;
        for (double l : logits) sum += std::exp(l - max_logit);
        const double lse = max_logit + std::log(sum);
        EXPECT_NEAR(result.Lse(i, kHq, h), lse, 1e-5 + 1e-5 * std::abs(lse))
            << "token " << i << " head " << h;
        for (int d = 0; d < kD; ++d) {
          double out = 0;
          for (int64_t j = 0; j <= last; ++j) {
            out += std::exp(logits[size_t(j)] - max_logit) / sum *
                   Fp32At(values_, (size_t(j) * kH + g) * kD + d);
          }
          const float got =
              Fp32At(result.output, (size_t(i) * kHq + h) * kD + d);
          ASSERT_NEAR(got, out, 1e-5 + 1e-5 * std::abs(out))
              << "token " << i << " head " << h << " channel " << d;
        }
      }
    }
  }

 private:
  Bytes keys_, values_;  // [tokens, H, D] fp32
};

// Two sessions in one batch: a prefill chunk through Client::Step, then
// decode tokens on a StepStream; every ATTEND result equals the naive one.
TEST_F(StepTest, AttendEqualsNaiveAttention) {
  std::vector<std::unique_ptr<Session>> sessions;
  for (const char* id : {"a", "b"}) {
    absl::StatusOr<std::unique_ptr<Session>> s =
        client_->CreateSession(SmallFp32(id));
    ASSERT_TRUE(s.ok()) << s.status();
    sessions.push_back(std::move(*s));
  }
  NaiveAttention reference[2][2];  // [session][layer]
  std::unique_ptr<StepStream> stream = client_->OpenStepStream();
  const uint32_t seed = 23;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  for (int token = 0; token < 12; ++token) {
    const int num_tokens = token == 0 ? 6 : 1;
    for (int layer = 0; layer < 2; ++layer) {
      Tokens t[2] = {RandomTokens(*sessions[0], num_tokens, &rng),
                     RandomTokens(*sessions[1], num_tokens, &rng)};
      StepEntryView entries[2];
      for (int s = 0; s < 2; ++s) {
        entries[s] = sessions[size_t(s)]->Entry(layer, t[s].q, t[s].k, t[s].v,
                                                num_tokens);
      }
      absl::StatusOr<StepReply> reply =
          token == 0 ? client_->Step(layer, v1::STEP_MODE_ATTEND, entries)
                     : stream->Step(layer, v1::STEP_MODE_ATTEND, entries);
      ASSERT_TRUE(reply.ok()) << reply.status();
      ASSERT_EQ(reply->results().size(), 2u);
      for (int s = 0; s < 2; ++s) {
        SCOPED_TRACE(
            absl::StrCat("token ", token, " layer ", layer, " session ", s));
        EXPECT_EQ(reply->result(size_t(s)).session_id,
                  sessions[size_t(s)]->id());
        sessions[size_t(s)]->Advance(layer, reply->result(size_t(s)));
        reference[s][layer].StepAndCheck(t[s], num_tokens,
                                         reply->result(size_t(s)));
      }
    }
  }
  EXPECT_EQ(sessions[0]->next_position(1), 17);
  EXPECT_TRUE(stream->Close().ok());
}

// Several requests in flight on one stream come back in order.
TEST_F(StepTest, StreamRepliesInOrder) {
  absl::StatusOr<std::unique_ptr<Session>> s =
      client_->CreateSession(SmallFp32("s", 4));
  ASSERT_TRUE(s.ok());
  std::unique_ptr<StepStream> stream = client_->OpenStepStream();
  EXPECT_EQ(stream->Receive().status().code(),
            absl::StatusCode::kFailedPrecondition);  // nothing sent
  std::mt19937 rng(3);
  Tokens t = RandomTokens(**s, 4, &rng);
  for (int layer = 0; layer < 4; ++layer) {  // a prefill, pipelined
    StepEntryView entry = (*s)->Entry(layer, t.q, t.k, t.v, 4);
    absl::StatusOr<uint64_t> id =
        stream->Send(layer, v1::STEP_MODE_APPEND, {&entry, 1});
    ASSERT_TRUE(id.ok()) << id.status();
    EXPECT_EQ(*id, uint64_t(layer + 1));
  }
  EXPECT_EQ(stream->in_flight(), 4);
  // Step would take the oldest reply: refused, nothing sent.
  StepEntryView entry = (*s)->Entry(0, t.q, t.k, t.v, 4);
  EXPECT_EQ(stream->Step(0, v1::STEP_MODE_APPEND, {&entry, 1}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(stream->in_flight(), 4);
  for (int layer = 0; layer < 4; ++layer) {
    absl::StatusOr<StepReply> reply = stream->Receive();
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->request_id(), uint64_t(layer + 1));
    EXPECT_EQ(reply->result(0).next_position, 4);
    EXPECT_TRUE(reply->result(0).output.empty());  // APPEND
    (*s)->Advance(layer, reply->result(0));
  }
  EXPECT_EQ(stream->in_flight(), 0);
  // Close drops replies not received; the steps themselves were applied.
  for (int layer = 0; layer < 2; ++layer) {
    Tokens one = RandomTokens(**s, 1, &rng);
    StepEntryView e = (*s)->Entry(layer, one.q, one.k, one.v);
    ASSERT_TRUE(stream->Send(layer, v1::STEP_MODE_ATTEND, {&e, 1}).ok());
  }
  EXPECT_TRUE(stream->Close().ok());
  EXPECT_EQ(stream->Send(0, v1::STEP_MODE_ATTEND, {}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*s)->Refresh().ok());
  EXPECT_EQ((*s)->next_position(0), 5);
  EXPECT_EQ((*s)->next_position(1), 5);
  EXPECT_EQ((*s)->next_position(2), 4);
}

// A rejected request is answered with its own status; the stream goes on.
TEST_F(StepTest, StreamErrorsAnswerTheirRequestOnly) {
  absl::StatusOr<std::unique_ptr<Session>> s =
      client_->CreateSession(SmallFp32("s"));
  ASSERT_TRUE(s.ok());
  std::unique_ptr<StepStream> stream = client_->OpenStepStream();
  std::mt19937 rng(5);
  Tokens t = RandomTokens(**s, 1, &rng);
  auto step_ok = [&](int layer) {
    absl::StatusOr<StepReply> r =
        (*s)->Step(layer, v1::STEP_MODE_ATTEND, t.q, t.k, t.v, 1, stream.get());
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(stream->is_open());
  };
  step_ok(0);

  StepEntryView gap = (*s)->Entry(0, t.q, t.k, t.v);
  gap.position = 3;
  absl::StatusOr<StepReply> r =
      stream->Step(0, v1::STEP_MODE_ATTEND, {&gap, 1});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(r.status().message(), "expected 1")) << r.status();
  EXPECT_TRUE(stream->is_open());
  step_ok(0);

  StepEntryView unknown = (*s)->Entry(1, t.q, t.k, t.v);
  unknown.session_id = "nobody";
  r = stream->Step(1, v1::STEP_MODE_ATTEND, {&unknown, 1});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(r.status().message(), "nobody")) << r.status();
  step_ok(1);

  r = (*s)->Step(1, v1::STEP_MODE_ATTEND, t.q, t.k,
                 absl::MakeConstSpan(t.v).subspan(4), 1, stream.get());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status().message(), "entries[0].v")) << r.status();
  EXPECT_EQ((*s)->next_position(1), 1);  // unchanged by the failure
  step_ok(1);

  StepEntryView wrong_layer = (*s)->Entry(1, t.q, t.k, t.v);
  r = stream->Step(7, v1::STEP_MODE_ATTEND, {&wrong_layer, 1});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status().message(), "layer")) << r.status();
  step_ok(0);
  EXPECT_TRUE(stream->Close().ok());
  ASSERT_TRUE((*s)->Refresh().ok());
  EXPECT_EQ((*s)->next_position(0), 3);
  EXPECT_EQ((*s)->next_position(1), 2);
}

}  // namespace
}  // namespace kvmem
