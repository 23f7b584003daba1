"""A worker process killed in the middle of its stream of batches: the
sessions it drove stand at one consistent position (each batch applied
wholly or not at all), answer the next step from another worker's stream
at the position the server reports, and the server's memory returns to
where it was (no state of the dead stream stays pinned).

The server and the dying worker are separate processes (Debian's
/usr/bin/python3 runs both sides).
"""
import os
import signal
import subprocess
import sys
import textwrap
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

SESSIONS = 4
LAYERS = 2
HQ, H, D = 8, 2, 64
RSS_SLACK_MB = 32  # allowed difference from the baseline, stated

# The dying worker: one stream, batches of every session, layer by layer,
# forever; it prints each acknowledged token so the test knows it is busy.
WORKER = textwrap.dedent("""
    import sys
    import grpc
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from kvmem.v1 import kvmem_pb2 as pb, kvmem_pb2_grpc as rpc
    stub = rpc.KvMemoryStub(grpc.insecure_channel(sys.argv[1]))
    start, sessions = int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(1)
    def requests():
        t = start
        while True:
            for layer in range(%d):
                yield pb.StepRequest(layer=layer, mode=pb.STEP_MODE_ATTEND,
                    entries=[pb.StepEntry(
                        session_id="w%%d" %% i, position=t, num_tokens=1,
                        q=rng.standard_normal((%d, %d)).astype(np.float32)
                            .tobytes(),
                        k=rng.standard_normal((%d, %d)).astype(np.float32)
                            .tobytes(),
                        v=rng.standard_normal((%d, %d)).astype(np.float32)
                            .tobytes()) for i in range(sessions)])
            t += 1
    for reply in stub.StepStream(requests()):
        assert reply.error_code == 0, reply.error_message
        print(reply.response.results[0].next_position, flush=True)
""" % (LAYERS, HQ, D, H, D, H, D))


@pytest.fixture
def server():
    with running_server() as running:
        yield running


def step_all(stub, rng, t):
    """One token through every layer of every session, unary."""
    for layer in range(LAYERS):
        reply = stub.Step(pb.StepRequest(
            layer=layer, mode=pb.STEP_MODE_ATTEND,
            entries=[pb.StepEntry(
                session_id="w%d" % i, position=t, num_tokens=1,
                q=rng.standard_normal((HQ, D)).astype(np.float32).tobytes(),
                k=rng.standard_normal((H, D)).astype(np.float32).tobytes(),
                v=rng.standard_normal((H, D)).astype(np.float32).tobytes())
                for i in range(SESSIONS)]), timeout=30)
        assert all(r.next_position == t + 1 for r in reply.results)


def test_killed_worker_leaves_sessions_consistent(server):
    proc, address = server
    stub = rpc.KvMemoryStub(grpc.insecure_channel(address))
    shape = pb.ModelShape(layers=LAYERS, kv_heads=H, query_heads=HQ,
                          head_dim=D, dtype=pb.DTYPE_FP32)
    policy = pb.CachePolicy(sinks=4, cascades=2, window=64, page_tokens=16)
    for i in range(SESSIONS):
        stub.CreateSession(pb.CreateSessionRequest(
            session_id="w%d" % i, shape=shape, policy=policy))
    rng = np.random.default_rng(int(time.time()))
    # Warm every stream so its cascade is allocated: the baseline.
    for t in range(200):
        step_all(stub, rng, t)
    baseline = rss_mb(proc.pid)

    for cycle in range(3):
        at = stub.GetSession(pb.GetSessionRequest(
            session_id="w0")).layer_next_positions[0]
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, address,
             os.path.join(BUILD, "python"), str(at), str(SESSIONS)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # Let it get going, then kill it in the middle of its batches.
        for _ in range(20 + 7 * cycle):
            assert worker.stdout.readline(), "the worker died early"
        worker.send_signal(signal.SIGKILL)
        worker.wait()

        # One consistent position: each batch was applied wholly or not.
        positions = set()
        deadline = time.monotonic() + 10
        while True:
            sessions = [stub.GetSession(pb.GetSessionRequest(
                session_id="w%d" % i)) for i in range(SESSIONS)]
            positions = {tuple(s.layer_next_positions) for s in sessions}
            if len(positions) == 1 or time.monotonic() > deadline:
                break  # a batch still in flight may land; look again
        assert len(positions) == 1, positions
        layer_next = positions.pop()
        assert layer_next[0] - layer_next[-1] in (0, 1), layer_next
        # Another worker finishes the token the dead one left half done,
        # then goes on.
        if layer_next[0] != layer_next[-1]:
            t = layer_next[-1]
            for layer in range(1, LAYERS):
                if layer_next[layer] == t:
                    stub.Step(pb.StepRequest(
                        layer=layer, mode=pb.STEP_MODE_APPEND,
                        entries=[pb.StepEntry(
                            session_id="w%d" % i, position=t, num_tokens=1,
                            k=rng.standard_normal((H, D)).astype(
                                np.float32).tobytes(),
                            v=rng.standard_normal((H, D)).astype(
                                np.float32).tobytes())
                            for i in range(SESSIONS)]), timeout=30)
        start = layer_next[0]
        for t in range(start, start + 20):
            step_all(stub, rng, t)

    after = rss_mb(proc.pid)
    print("server RSS: baseline %.0f MB, after 3 killed workers %.0f MB"
          % (baseline, after))
    if not SANITIZED:
        assert after - baseline < RSS_SLACK_MB, (baseline, after)
    assert proc.poll() is None
