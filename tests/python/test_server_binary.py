"""The kvmem-server binary as an operator meets it: start line, health,
reflection, the README's quick start, and a graceful stop on SIGTERM.

Run with Debian's /usr/bin/python3 -m pytest; KVMEM_BUILD names the build
directory (holding service/kvmem-server and python/)."""
import os
import signal
import sys

import grpc
import pytest

BUILD = os.environ.get("KVMEM_BUILD", "build/release")
sys.path.insert(0, os.path.join(BUILD, "python"))
sys.path.insert(0, os.path.dirname(__file__))
from kvmem.v1 import kvmem_pb2 as pb  # noqa: E402
from kvmem.v1 import kvmem_pb2_grpc as rpc  # noqa: E402
from server_util import running_server  # noqa: E402

IDENTITY = (lambda b: b, lambda b: b)


@pytest.fixture
def server():
    with running_server() as running:
        yield running


def health(channel, service=""):
    request = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=IDENTITY[0],
                                response_deserializer=IDENTITY[1])
    return check(request, timeout=10)


def test_health_and_reflection(server):
    _, address = server
    with grpc.insecure_channel(address) as channel:
        assert health(channel) == b"\x08\x01"  # status: SERVING
        assert health(channel, "kvmem.v1.KvMemory") == b"\x08\x01"
        # ServerReflectionRequest{list_services = 7: "*"}
        info = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=IDENTITY[0], response_deserializer=IDENTITY[1])
        replies = list(info(iter([b"\x3a\x01*"]), timeout=10))
        assert len(replies) == 1
        assert b"kvmem.v1.KvMemory" in replies[0]


def test_readme_quick_start(server):
    _, address = server
    # The README's quick start, against this server.
    stub = rpc.KvMemoryStub(grpc.insecure_channel(address))
    s = stub.CreateSession(pb.CreateSessionRequest(
        session_id="chat-1",
        shape=pb.ModelShape(layers=32, kv_heads=8, query_heads=32,
                            head_dim=128, dtype=pb.DTYPE_BF16)))
    assert s.policy.window == 1024 and s.policy.sinks == 64
    listed = stub.ListSessions(pb.ListSessionsRequest())
    assert [x.session_id for x in listed.sessions] == ["chat-1"]
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateSession(pb.CreateSessionRequest(
            shape=pb.ModelShape(layers=32, kv_heads=8, query_heads=32,
                                head_dim=96, dtype=pb.DTYPE_BF16)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape.head_dim" in error.value.details()
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="chat-1"))


def test_sigterm_stops_gracefully(server):
    proc, address = server
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
