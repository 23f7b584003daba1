// kvmem_toy_decode: a toy multi-layer decode loop against a kvmem server,
// the way an inference worker drives it. Creates a session, sends a
// prefill chunk to every layer, then decodes tokens one at a time: per
// token, per layer, one ATTEND round trip on a StepStream, whose output
// becomes the next layer's query (as a transformer's hidden state would).
// q, k and v are random; prints each token's latency, then deletes the
// session.
//
//   kvmem-server --listen=127.0.0.1:50051 --data_dir=/tmp/kvmem &
//   kvmem_toy_decode --address=127.0.0.1:50051 --decode_tokens=32
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "client/cpp/kvmem_client.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "the kvmem server");
ABSL_FLAG(std::string, tenant, "",
          "tenant to act as (kvmem-tenant metadata); empty: the default");
ABSL_FLAG(int, layers, 4, "model layers L");
ABSL_FLAG(int, query_heads, 8, "query heads Hq (a multiple of kv_heads)");
ABSL_FLAG(int, kv_heads, 2, "KV heads H");
ABSL_FLAG(int, head_dim, 64, "head dim D: 64, 128 or 256");
ABSL_FLAG(std::string, dtype, "bf16", "bf16 or fp32");
ABSL_FLAG(int, prefill_tokens, 32, "tokens of the prompt, sent in one chunk");
ABSL_FLAG(int, decode_tokens, 16, "tokens decoded one at a time after it");
ABSL_FLAG(uint32_t, seed, 1, "seed of the random q, k and v");

namespace kvmem {
namespace {

// Random values of N(0, 1) as bytes of `dtype` (fp32, or bf16 rounded to
// nearest even from fp32).
class RandomTensors {
 public:
  RandomTensors(uint32_t seed, v1::DType dtype) : rng_(seed), dtype_(dtype) {}

  void Fill(size_t bytes, std::vector<uint8_t>* out) {
    out->resize(bytes);
    const size_t width = dtype_ == v1::DTYPE_FP32 ? 4 : 2;
    for (size_t i = 0; i + width <= bytes; i += width) {
      const float x = normal_(rng_);
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      if (width == 4) {
        std::memcpy(out->data() + i, &bits, 4);
      } else {
        const uint16_t bf16 =
            uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        std::memcpy(out->data() + i, &bf16, 2);
      }
    }
  }

 private:
  std::mt19937 rng_;
  std::normal_distribution<float> normal_;
  const v1::DType dtype_;
};

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "kvmem_toy_decode: %s: %s\n", what,
               status.ToString().c_str());
  return 1;
}

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

// Prefill, then decode; every step on `stream`.
absl::Status Decode(Session& session, StepStream& stream, RandomTensors& rng,
                    int prefill_tokens, int decode_tokens) {
  std::vector<uint8_t> q, k, v;
  const auto prefill_start = std::chrono::steady_clock::now();
  for (int layer = 0; layer < session.layers() && prefill_tokens > 0; ++layer) {
    rng.Fill(session.q_bytes(prefill_tokens), &q);
    rng.Fill(session.kv_bytes(prefill_tokens), &k);
    rng.Fill(session.kv_bytes(prefill_tokens), &v);
    absl::StatusOr<StepReply> reply = session.Step(
        layer, v1::STEP_MODE_ATTEND, q, k, v, prefill_tokens, &stream);
    if (!reply.ok()) return reply.status();
  }
  std::printf("prefill: %d tokens x %d layers in %.3f ms\n", prefill_tokens,
              session.layers(), MillisSince(prefill_start));

  std::vector<double> latencies_ms;
  for (int t = 0; t < decode_tokens; ++t) {
    const int64_t position = session.next_position(0);
    const auto start = std::chrono::steady_clock::now();
    rng.Fill(session.q_bytes(), &q);
    for (int layer = 0; layer < session.layers(); ++layer) {
      rng.Fill(session.kv_bytes(), &k);
      rng.Fill(session.kv_bytes(), &v);
      absl::StatusOr<StepReply> reply =
          session.Step(layer, v1::STEP_MODE_ATTEND, q, k, v, 1, &stream);
      if (!reply.ok()) return reply.status();
      // The attention output [Hq, D] feeds the next layer's query [Hq, D].
      const absl::Span<const uint8_t> output = reply->result(0).output;
      q.assign(output.begin(), output.end());
    }
    latencies_ms.push_back(MillisSince(start));
    std::printf("token %d (position %lld): %.3f ms for %d layers\n", t,
                static_cast<long long>(position), latencies_ms.back(),
                session.layers());
  }
  if (!latencies_ms.empty()) {
    std::vector<double> sorted = latencies_ms;
    std::sort(sorted.begin(), sorted.end());
    double sum = 0;
    for (double ms : sorted) sum += ms;
    std::printf("decode: %zu tokens, mean %.3f ms, p50 %.3f ms, max %.3f ms\n",
                sorted.size(), sum / double(sorted.size()),
                sorted[sorted.size() / 2], sorted.back());
  }
  return absl::OkStatus();
}

int Main() {
  SessionSpec spec;
  spec.shape.set_layers(absl::GetFlag(FLAGS_layers));
  spec.shape.set_query_heads(absl::GetFlag(FLAGS_query_heads));
  spec.shape.set_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  spec.shape.set_head_dim(absl::GetFlag(FLAGS_head_dim));
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype != "bf16" && dtype != "fp32") {
    std::fprintf(stderr,
                 "kvmem_toy_decode: --dtype: \"%s\", want bf16 or "
                 "fp32\n",
                 dtype.c_str());
    return 2;
  }
  spec.shape.set_dtype(dtype == "bf16" ? v1::DTYPE_BF16 : v1::DTYPE_FP32);
  spec.labels["example"] = "toy_decode";

  ClientOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.tenant = absl::GetFlag(FLAGS_tenant);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  if (!client.ok()) return Fail("connect", client.status());
  absl::StatusOr<std::unique_ptr<Session>> session =
      (*client)->CreateSession(spec);
  if (!session.ok()) return Fail("create session", session.status());
  std::printf("session %s on %s: %d layers, %d query / %d KV heads x %d, %s\n",
              (*session)->id().c_str(), options.address.c_str(),
              spec.shape.layers(), spec.shape.query_heads(),
              spec.shape.kv_heads(), spec.shape.head_dim(), dtype.c_str());

  RandomTensors rng(absl::GetFlag(FLAGS_seed), spec.shape.dtype());
  std::unique_ptr<StepStream> stream = (*client)->OpenStepStream();
  absl::Status decoded =
      Decode(**session, *stream, rng, absl::GetFlag(FLAGS_prefill_tokens),
             absl::GetFlag(FLAGS_decode_tokens));
  absl::Status closed = stream->Close();
  // Delete the session whatever happened, so that a failed run leaves
  // nothing behind.
  absl::Status deleted = (*session)->Delete();
  if (!decoded.ok()) return Fail("decode", decoded);
  if (!closed.ok()) return Fail("close stream", closed);
  if (!deleted.ok()) return Fail("delete session", deleted);
  std::printf("deleted session %s\n", (*session)->id().c_str());
  return 0;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvmem_toy_decode: runs a toy multi-layer decode loop against a kvmem "
      "server\n(prefill chunk, then one ATTEND round trip per layer per "
      "token on a StepStream,\nrandom q/k/v), prints per-token latency and "
      "deletes its session.\n\nusage: kvmem_toy_decode [--address=HOST:PORT] "
      "[--decode_tokens=N] ...");
  absl::ParseCommandLine(argc, argv);
  return kvmem::Main();
}
