"""Overload: a flood of steps far beyond the server's queue limit gets
RESOURCE_EXHAUSTED promptly, the server's resident memory stays under a
stated bound, and every session is intact afterwards.

Runs the kvmem-server binary in its own process (so its RSS is its own) with
one handler thread and a queue of 4 requests. Debian's /usr/bin/python3.
"""
import os
import sys
import time

import grpc
import numpy as np
import pytest

BUILD = os.environ.get("KVMEM_BUILD", "build/release")
sys.path.insert(0, os.path.join(BUILD, "python"))
sys.path.insert(0, os.path.dirname(__file__))
from kvmem.v1 import kvmem_pb2 as pb  # noqa: E402
from kvmem.v1 import kvmem_pb2_grpc as rpc  # noqa: E402
from server_util import SANITIZED, running_server, rss_mb  # noqa: E402

SESSIONS = 16
FLOOD = 400            # requests in flight at once
T, HQ, H, D = 64, 8, 2, 128
RSS_BOUND_MB = 400     # stated bound on the server's RSS during the flood


@pytest.fixture
def server():
    with running_server("--handler_threads=1", "--max_queued_requests=4",
                        "--max_queued_bytes=%d" % (64 << 20)) as running:
        yield running


def entry(rng, session, position):
    tensor = lambda heads: rng.standard_normal(  # noqa: E731
        (T, heads, D)).astype(np.float32).tobytes()
    return pb.StepEntry(session_id=session, position=position, num_tokens=T,
                        q=tensor(HQ), k=tensor(H), v=tensor(H))


def test_flood_is_refused_promptly_and_sessions_stay_intact(server):
    proc, address = server
    rng = np.random.default_rng(int(time.time()))
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = rpc.KvMemoryStub(channel)
    shape = pb.ModelShape(layers=2, kv_heads=H, query_heads=HQ, head_dim=D,
                          dtype=pb.DTYPE_FP32)
    policy = pb.CachePolicy(sinks=4, cascades=2, window=64, page_tokens=16)
    for i in range(SESSIONS):
        stub.CreateSession(pb.CreateSessionRequest(
            session_id="s%d" % i, shape=shape, policy=policy))
    rss_before = rss_mb(proc.pid)

    # Every request is a prefill chunk at position 0 of some session, with
    # its own bytes: at most one per session can apply.
    requests = [pb.StepRequest(layer=0, mode=pb.STEP_MODE_ATTEND,
                               entries=[entry(rng, "s%d" % (n % SESSIONS), 0)])
                for n in range(FLOOD)]
    started = time.monotonic()
    futures = [stub.Step.future(r, timeout=120) for r in requests]
    peak = rss_before
    codes = {}
    for f in futures:
        peak = max(peak, rss_mb(proc.pid))
        try:
            f.result()
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as error:
            name = error.code().name
            codes[name] = codes.get(name, 0) + 1
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "limit" in error.details(), error.details()
    elapsed = time.monotonic() - started
    print("flood of %d: %s in %.2f s; RSS %.0f -> peak %.0f MB"
          % (FLOOD, codes, elapsed, rss_before, peak))
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes
    assert codes.get("OK", 0) >= 1, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
    if not SANITIZED:
        assert peak - rss_before < RSS_BOUND_MB, (rss_before, peak)

    # Every session is intact: it stands at 0 or at T, and goes on from
    # the position it reports.
    for i in range(SESSIONS):
        s = stub.GetSession(pb.GetSessionRequest(session_id="s%d" % i))
        at = s.layer_next_positions[0]
        assert at in (0, T), (i, at)
        reply = stub.Step(pb.StepRequest(
            layer=0, mode=pb.STEP_MODE_ATTEND,
            entries=[entry(rng, "s%d" % i, at)]), timeout=60)
        assert reply.results[0].next_position == at + T
    assert proc.poll() is None
