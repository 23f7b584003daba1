"""The kvmem Python client against the real kvmem-server: session lifecycle,
paging, tenants, errors keeping their gRPC code and message, the bf16
helpers, and the checks the client makes before sending anything.

Run with Debian's /usr/bin/python3 -m pytest; KVMEM_BUILD names the build
directory (holding service/kvmem-server and python/), default
build/release. This module also holds the harness that
test_client_step.py imports (server fixture, clients, paths).
"""
import fractions
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BUILD = os.path.join(REPO, os.environ.get("KVMEM_BUILD", "build/release"))
sys.path.insert(0, os.path.join(BUILD, "python"))
sys.path.insert(0, os.path.join(REPO, "client", "python"))
# A test that imported the raw stubs first (`from kvmem.v1 import ...` with
# only <build>/python on the path) left `kvmem` as a bare namespace package;
# import the client package in its place (kvmem.v1 stays as loaded).
if "kvmem" in sys.modules and not hasattr(sys.modules["kvmem"], "Client"):
    del sys.modules["kvmem"]
import kvmem  # noqa: E402
from kvmem.v1 import kvmem_pb2 as pb  # noqa: E402
from kvmem.v1 import kvmem_pb2_grpc as rpc  # noqa: E402

SERVER = os.path.join(BUILD, "service", "kvmem-server")


class RunningServer:
    """A kvmem-server process on 127.0.0.1:<free port> over a fresh data
    directory. Its output after the start line is drained by a thread (so
    that a full pipe never blocks it) and kept for failure messages."""

    def __init__(self, data_dir: str, flags: Sequence[str] = ()) -> None:
        self.process = subprocess.Popen(
            [SERVER, "--listen=127.0.0.1:0", "--data_dir=" + data_dir,
             *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"listening on (127\.0\.0\.1:(\d+))", line)
        if not match or int(match.group(2)) == 0:
            self.stop()
            raise AssertionError("start line was: %r" % line)
        self.address = match.group(1)
        self.output: List[str] = []
        self._drain = threading.Thread(target=self._read_output, daemon=True)
        self._drain.start()

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def stop(self) -> None:
        """Stops the server gracefully (SIGTERM: sanitizers report at exit),
        killing it if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if hasattr(self, "_drain"):
            self._drain.join(timeout=30)

    def problems(self) -> List[str]:
        """Sanitizer reports in the output, and a failed exit."""
        found = [line for line in self.output
                 if "runtime error:" in line or "Sanitizer" in line]
        if self.process.returncode != 0:
            found.append("exit status %d" % self.process.returncode)
        return found


def start_server(flags: Sequence[str] = ()) -> Iterator[RunningServer]:
    """Yields a running server; afterwards stops it and fails on sanitizer
    reports or an unclean exit."""
    with tempfile.TemporaryDirectory() as data_dir:
        server = RunningServer(data_dir, flags)
        try:
            yield server
        finally:
            server.stop()
        problems = server.problems()
        assert not problems, "".join(server.output[-50:])


def tenant_for(request: pytest.FixtureRequest) -> str:
    """A tenant of this test alone: 1-64 characters of [A-Za-z0-9._-]."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:48]
    return "%s-%08x" % (name, zlib.crc32(request.node.nodeid.encode()))


def client_for(server: RunningServer,
               request: pytest.FixtureRequest) -> Iterator[kvmem.Client]:
    """A client of a tenant used by this test only."""
    with kvmem.Client(server.address, tenant=tenant_for(request),
                      timeout=60) as c:
        yield c


def stub_for(server: RunningServer) -> Iterator[rpc.KvMemoryStub]:
    """The raw generated stub, to send what the client refuses to."""
    with grpc.insecure_channel(server.address) as channel:
        yield rpc.KvMemoryStub(channel)


# The fixtures: one server per test module (tests keep apart by tenant).
@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from start_server()


@pytest.fixture
def client(server: RunningServer,
           request: pytest.FixtureRequest) -> Iterator[kvmem.Client]:
    yield from client_for(server, request)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[rpc.KvMemoryStub]:
    yield from stub_for(server)


SHAPE = kvmem.ModelShape(layers=4, kv_heads=2, query_heads=8, head_dim=64,
                         dtype="fp32")


# -- lifecycle ---------------------------------------------------------------

def test_create_fills_defaults_and_get_matches(client: kvmem.Client) -> None:
    policy = kvmem.CachePolicy(sinks=4, cascades=2, window=64, page_tokens=16)
    session = client.create_session(SHAPE, policy, durability="step_sync",
                                    session_id="chat-1",
                                    labels={"model": "toy", "team": "a"})
    assert session.id == "chat-1"
    assert session.tenant == client.tenant
    assert session.shape.layers == 4 and session.shape.kv_heads == 2
    assert session.shape.query_heads == 8 and session.shape.head_dim == 64
    assert session.shape.dtype == "fp32"
    assert session.shape.softmax_scale == pytest.approx(1 / 8)
    assert session.durability == "step_sync"
    assert session.labels == {"model": "toy", "team": "a"}
    # What was given is kept; what was not is the documented default.
    p = session.policy
    assert (p.sinks, p.cascades, p.window, p.page_tokens) == (4, 2, 64, 16)
    assert p.step_budget_tokens == 2048 and p.recent_tokens == 16
    assert p.ema_beta == pytest.approx(0.9999999, rel=0, abs=1e-12)
    assert p.score_reduction == "max" and p.positions_mode == "absolute"
    assert p.eager_fill is True and p.recall is True
    assert tuple(p.dense_layers) == (0, 1)
    assert p.spill_quota_bytes == 0 and p.idle_ttl_seconds == 0
    assert session.position == 0 and session.durable_position == 0
    assert session.layer_next_positions == [0, 0, 0, 0]
    assert session.create_time_unix_micros > 0

    again = client.get_session("chat-1")
    assert (again.id, again.shape, again.policy, again.labels) == (
        session.id, session.shape, session.policy, session.labels)
    assert again.layer_next_positions == [0, 0, 0, 0]

    session.delete()
    with pytest.raises(kvmem.NotFoundError) as error:
        client.get_session("chat-1")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(kvmem.NotFoundError):
        session.refresh()


def test_every_policy_field_round_trips(client: kvmem.Client) -> None:
    shape = kvmem.ModelShape(
        layers=3, kv_heads=1, query_heads=4, head_dim=128, dtype="bf16",
        softmax_scale=0.125,
        rotary=kvmem.Rotary(base_theta=500000.0, rotary_dims=64,
                            interleaved=True, scaling="llama3",
                            scaling_factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0,
                            original_max_positions=8192))
    policy = kvmem.CachePolicy(
        sinks=8, cascades=3, window=32, page_tokens=8,
        step_budget_tokens=100, recent_tokens=4, ema_beta=0.99,
        score_reduction="mean", eager_fill=False,
        positions_mode="cache_rank", recall=False, dense_layers=(2,),
        spill_quota_bytes=1 << 20, idle_ttl_seconds=3600)
    session = client.create_session(shape, policy, durability="async")
    assert session.id  # chosen by the server
    assert session.shape == shape
    assert session.policy == policy
    assert session.durability == "async"
    assert client.get_session(session.id).policy == policy


def test_empty_dense_layers_means_none(client: kvmem.Client) -> None:
    session = client.create_session(
        SHAPE, kvmem.CachePolicy(dense_layers=()))
    assert tuple(session.policy.dense_layers) == ()


def test_list_sessions_iterates_every_page(client: kvmem.Client) -> None:
    ids = ["s-%02d" % i for i in range(7)]
    for i, session_id in enumerate(reversed(ids)):
        client.create_session(SHAPE, session_id=session_id,
                              labels={"parity": "odd" if i % 2 else "even"})
    # 7 sessions in pages of 3: three ListSessions calls, in id order.
    listed = [s.id for s in client.list_sessions(page_size=3)]
    assert listed == ids
    assert [s.id for s in client.list_sessions()] == ids
    odd = [s.id for s in client.list_sessions({"parity": "odd"},
                                              page_size=2)]
    assert odd == [ids[1], ids[3], ids[5]]
    assert list(client.list_sessions({"parity": "none"})) == []
    everything = list(client.list_sessions(page_size=1))
    assert all(isinstance(s, kvmem.Session) for s in everything)
    assert [s.labels["parity"] for s in everything] == [
        "even", "odd", "even", "odd", "even", "odd", "even"]


def test_session_context_manager_deletes(client: kvmem.Client) -> None:
    with client.create_session(SHAPE, session_id="scoped") as session:
        assert client.get_session("scoped").id == session.id
    with pytest.raises(kvmem.NotFoundError):
        client.get_session("scoped")

    # Already deleted inside the block: the exit does not fail.
    with client.create_session(SHAPE, session_id="scoped") as session:
        session.delete()

    # Kept when asked to.
    with client.create_session(SHAPE, session_id="kept",
                               delete_on_exit=False):
        pass
    assert client.get_session("kept").id == "kept"
    with client.get_session("kept") as session:
        assert session.delete_on_exit
    assert [s.id for s in client.list_sessions()] == []

    # An exception inside the block still deletes, and propagates.
    with pytest.raises(RuntimeError):
        with client.create_session(SHAPE, session_id="raised"):
            raise RuntimeError("worker failed")
    with pytest.raises(kvmem.NotFoundError):
        client.get_session("raised")


def test_client_context_manager_closes_channel(
        server: RunningServer) -> None:
    with kvmem.Client(server.address) as client:
        assert client.stats().backend in ("cpu", "cuda")
    with pytest.raises(ValueError, match="closed channel"):
        client.stats()


def test_tenants_are_isolated(server: RunningServer,
                              request: pytest.FixtureRequest) -> None:
    base = tenant_for(request)[:50]
    with kvmem.Client(server.address, tenant=base + "-a") as a, \
            kvmem.Client(server.address, tenant=base + "-b") as b, \
            kvmem.Client(server.address) as default:
        mine = a.create_session(SHAPE, session_id="shared-id")
        assert mine.tenant == base + "-a"
        with pytest.raises(kvmem.NotFoundError) as error:
            b.get_session("shared-id")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(kvmem.NotFoundError):
            b.delete_session("shared-id")
        with pytest.raises(kvmem.NotFoundError):
            default.get_session("shared-id")
        assert list(b.list_sessions()) == []
        # The same id is free in another tenant.
        theirs = b.create_session(SHAPE, session_id="shared-id")
        assert theirs.tenant == base + "-b"
        b.delete_session("shared-id")
        assert a.get_session("shared-id").tenant == base + "-a"
        assert "shared-id" not in [s.id for s in default.list_sessions()]
        mine.delete()


def test_stats(client: kvmem.Client) -> None:
    before = client.stats()
    assert isinstance(before, kvmem.ServerStats)
    assert before.backend in ("cpu", "cuda")
    assert before.version and before.device
    client.create_session(SHAPE)
    after = client.stats()
    assert after.sessions == before.sessions + 1
    assert after.hibernations == 0  # no memory limit in this server
    assert after.device_fallbacks == 0
    assert after.device_policy_steps == 0  # the CPU backend
    assert after.device_side_bytes == 0
    assert after.device_attend_steps == 0
    assert set(after.step_phase_seconds) == {
        "lock", "plan", "recall", "device_rows", "device", "apply",
        "device_write", "write", "device_wait", "device_spill", "sessions",
        "queue", "convert"}
    assert all(v >= 0 for v in after.step_phase_seconds.values())


# -- errors keep the gRPC code and the server's message ----------------------

def _create_request(shape: kvmem.ModelShape,
                    policy: Optional[kvmem.CachePolicy] = None,
                    session_id: str = "") -> "pb.CreateSessionRequest":
    from kvmem.config import policy_to_proto, shape_to_proto
    return pb.CreateSessionRequest(
        session_id=session_id, shape=shape_to_proto(shape),
        policy=policy_to_proto(policy or kvmem.CachePolicy()))


BAD_CREATES = [
    ("head_dim", kvmem.ModelShape(4, 2, 8, 96, "fp32"), None,
     ["shape.head_dim", "96"]),
    ("query_heads", kvmem.ModelShape(4, 2, 7, 64, "fp32"), None,
     ["shape.query_heads"]),
    ("layers", kvmem.ModelShape(0, 2, 8, 64, "fp32"), None,
     ["shape.layers"]),
    ("window", SHAPE, kvmem.CachePolicy(window=100, page_tokens=16),
     ["policy.window", "16"]),
    ("budget", SHAPE, kvmem.CachePolicy(sinks=64, recent_tokens=16,
                                        step_budget_tokens=32),
     ["policy.step_budget_tokens"]),
    ("dense_layers", SHAPE, kvmem.CachePolicy(dense_layers=(4,)),
     ["policy.dense_layers"]),
    ("ema_beta", SHAPE, kvmem.CachePolicy(ema_beta=1.5),
     ["policy.ema_beta"]),
]


@pytest.mark.parametrize("name,shape,policy,words", BAD_CREATES,
                         ids=[case[0] for case in BAD_CREATES])
def test_invalid_create_keeps_code_and_message(
        client: kvmem.Client, stub: rpc.KvMemoryStub, name: str,
        shape: kvmem.ModelShape, policy: Optional[kvmem.CachePolicy],
        words: List[str]) -> None:
    with pytest.raises(kvmem.InvalidArgumentError) as error:
        client.create_session(shape, policy)
    assert isinstance(error.value, kvmem.KvmemError)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.value.details
    assert isinstance(error.value.__cause__, grpc.RpcError)
    # Exactly the server's message, as the raw stub sees it.
    with pytest.raises(grpc.RpcError) as raw:
        stub.CreateSession(_create_request(shape, policy),
                           metadata=(("kvmem-tenant", client.tenant),))
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details == raw.value.details()
    assert str(error.value) == "INVALID_ARGUMENT: " + raw.value.details()
    assert list(client.list_sessions()) == []  # nothing was created


def test_other_errors_keep_code_and_message(server: RunningServer,
                                            client: kvmem.Client) -> None:
    client.create_session(SHAPE, session_id="taken")
    with pytest.raises(kvmem.AlreadyExistsError) as exists:
        client.create_session(SHAPE, session_id="taken")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "taken" in exists.value.details

    with pytest.raises(kvmem.NotFoundError) as missing:
        client.delete_session("never-made")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "never-made" in missing.value.details

    with pytest.raises(kvmem.InvalidArgumentError) as malformed:
        client.get_session("bad id!")
    assert malformed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in malformed.value.details

    with kvmem.Client(server.address, tenant="no spaces allowed") as bad:
        with pytest.raises(kvmem.InvalidArgumentError) as tenant:
            bad.stats()
    assert "kvmem-tenant" in tenant.value.details


def test_unknown_codes_map_to_the_base_class() -> None:
    from kvmem.errors import error_for, error_from_status_number
    error = error_for(grpc.StatusCode.UNIMPLEMENTED, "not yet")
    assert type(error) is kvmem.KvmemError
    assert (error.code, error.details) == (grpc.StatusCode.UNIMPLEMENTED,
                                           "not yet")
    for code, cls in [
            (grpc.StatusCode.DEADLINE_EXCEEDED, kvmem.DeadlineExceededError),
            (grpc.StatusCode.UNAVAILABLE, kvmem.UnavailableError),
            (grpc.StatusCode.DATA_LOSS, kvmem.DataLossError),
            (grpc.StatusCode.RESOURCE_EXHAUSTED,
             kvmem.ResourceExhaustedError)]:
        assert type(error_for(code, "")) is cls
    error = error_from_status_number(9, "entries[0].position: want 3")
    assert isinstance(error, kvmem.FailedPreconditionError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details == "entries[0].position: want 3"


# -- bf16 helpers -------------------------------------------------------------

def _bf16_reference(value: float) -> int:
    """bf16 bits of an fp32 value by exact rational arithmetic: the nearer
    of the two bf16 neighbours, the even one on a tie. An independent
    computation: no bit tricks on the rounding itself."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    if magnitude > 0x7F800000:
        return ((bits >> 16) | 0x40) & 0xFFFF  # NaN: quiet NaN, same sign
    if magnitude == 0x7F800000:
        return bits >> 16  # ±inf
    below = magnitude & 0xFFFF0000  # the bf16 at or below |value|
    above = below + 0x10000         # the next bf16 up (inf after max)

    def exact(pattern: int) -> fractions.Fraction:
        if pattern >= 0x7F800000:  # rounding past the largest finite:
            # the boundary to compare against is 2^128.
            return fractions.Fraction(2) ** 128
        return fractions.Fraction(
            struct.unpack("<f", struct.pack("<I", pattern))[0])

    x = fractions.Fraction(struct.unpack("<f", struct.pack(
        "<I", magnitude))[0])
    low_gap, high_gap = x - exact(below), exact(above) - x
    if low_gap < high_gap or (low_gap == high_gap and
                              (below >> 16) % 2 == 0):
        chosen = below
    else:
        chosen = above
    return ((sign | chosen) >> 16) & 0xFFFF


def test_bf16_round_trips_every_pattern() -> None:
    every = np.arange(1 << 16, dtype=np.uint16)
    widened = kvmem.from_bf16(every)
    assert widened.dtype == np.float32 and widened.shape == (1 << 16,)
    for pattern in (0x0000, 0x3F80, 0xBF80, 0x7F80, 0x0001, 0x7F7F):
        expected = struct.unpack("<f", struct.pack("<I", pattern << 16))[0]
        assert widened[pattern] == expected
    again = kvmem.to_bf16(widened)
    is_nan = np.isnan(widened)
    assert np.array_equal(again[~is_nan], every[~is_nan])
    assert np.isnan(kvmem.from_bf16(again[is_nan])).all()


def f32(bits: int) -> float:
    """The fp32 value of a bit pattern."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


TIES = [
    # (fp32 value, bf16 bits): a halfway case goes to the even neighbour.
    (f32(0x3F808000), 0x3F80),  # 1 + 2^-8: tie, 0x3F80 even: down
    (f32(0x3F818000), 0x3F82),  # 1 + 3·2^-8: tie, 0x3F81 odd: up
    (f32(0xBF808000), 0xBF80),  # the sign is kept
    (f32(0x3F808001), 0x3F81),  # just above the tie: up
    (f32(0x3F807FFF), 0x3F80),  # just below: down
    (255.5, 0x4380),            # 0x437F8000: tie, 0x437F odd: up to 256
    (f32(0x7F7F8000), 0x7F80),  # tie past the largest finite: to inf
    (f32(0x7F7F7FFF), 0x7F7F),  # just below it: the largest finite
    (f32(0xFF7F8000), 0xFF80),  # and -inf
    (f32(0x00008000), 0x0000),  # subnormal tie between 0 and 2^-133: 0
    (f32(0x00018000), 0x0002),  # subnormal tie, 0x0001 odd: up
    (f32(0x007F8000), 0x0080),  # largest subnormal tie: to the min normal
]


@pytest.mark.parametrize("value,bits", TIES)
def test_bf16_rounds_to_nearest_even(value: float, bits: int) -> None:
    assert _bf16_reference(value) == bits  # the oracle agrees with the table
    got = kvmem.to_bf16(np.array([value], dtype=np.float32))
    assert got.dtype == np.uint16
    assert int(got[0]) == bits, "%r -> %#06x, want %#06x" % (
        value, int(got[0]), bits)


def test_bf16_matches_exact_rounding_on_random_values() -> None:
    seed = 20240611
    print("seed", seed)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 1 << 32, size=3000, dtype=np.uint64).astype(
        np.uint32)
    # Many exact ties and near-ties: low half 0x8000 and its neighbours.
    ties = (patterns[:1000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    near = ties[:500] + np.uint32(1)
    values = np.concatenate([patterns, ties, near, ties[500:] - 1]).view(
        np.float32)
    values = np.concatenate([values, rng.standard_normal(1000).astype(
        np.float32)])
    got = kvmem.to_bf16(values)
    want = np.array([_bf16_reference(float(x)) for x in values],
                    dtype=np.uint16)
    mismatched = np.flatnonzero(got != want)
    assert mismatched.size == 0, [
        (hex(int(values.view(np.uint32)[i])), hex(int(got[i])),
         hex(int(want[i]))) for i in mismatched[:5]]


def test_bf16_shapes_and_dtypes() -> None:
    grid = np.linspace(-4, 4, 24, dtype=np.float32).reshape(2, 3, 4)
    bits = kvmem.to_bf16(grid)
    assert bits.shape == (2, 3, 4) and bits.dtype == np.uint16
    assert np.allclose(kvmem.from_bf16(bits), grid, rtol=2.0 ** -8, atol=0)
    assert kvmem.to_bf16(np.float32(1.5)).shape == ()
    assert int(kvmem.to_bf16(np.float32(1.5))) == 0x3FC0
    with pytest.raises(ValueError, match="uint16"):
        kvmem.from_bf16(np.zeros(3, np.float32))


# -- checks the client makes before sending ----------------------------------

def _tokens(shape: kvmem.ModelShape, tokens: int = 1,
            dtype: Optional[np.dtype] = None
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero q [T, Hq, D], k and v [T, H, D] in the session's dtype."""
    from kvmem.dtypes import wire_dtype
    dtype = dtype or wire_dtype(shape.dtype)
    return (np.zeros((tokens, shape.query_heads, shape.head_dim), dtype),
            np.zeros((tokens, shape.kv_heads, shape.head_dim), dtype),
            np.zeros((tokens, shape.kv_heads, shape.head_dim), dtype))


def test_step_input_is_checked_before_sending(client: kvmem.Client) -> None:
    fp32 = client.create_session(SHAPE)
    bf16 = client.create_session(kvmem.ModelShape(4, 2, 8, 64, "bf16"))
    q, k, v = _tokens(SHAPE, 2)

    with pytest.raises(ValueError, match=r"^k: dtype float64, want float32"):
        fp32.step(0, q, k.astype(np.float64), v)
    with pytest.raises(ValueError, match=r"uint16 holding bf16 bits"):
        bf16.step(0, q.astype(np.float32), k.astype(np.uint16),
                  v.astype(np.uint16))
    sixteen = client.create_session(kvmem.ModelShape(2, 2, 8, 64, "fp16"))
    with pytest.raises(ValueError, match=r"want float16 \(session dtype "
                                         r"fp16\)"):
        sixteen.step(0, *_tokens(SHAPE, 1, np.float32))
    with pytest.raises(ValueError, match=r"^v: shape \[2, 2, 65\], want "
                                         r"\[T, 2, 64\] or \[2, 64\]"):
        fp32.step(0, q, k, np.zeros((2, 2, 65), np.float32))
    with pytest.raises(ValueError, match=r"^q: shape \[2, 4, 64\]"):
        fp32.step(0, q[:, :4], k, v)
    with pytest.raises(ValueError, match=r"^k: shape \[1, 2, 2, 64\]"):
        fp32.step(0, q, k[np.newaxis], v)
    with pytest.raises(ValueError, match=r"^k: 2 tokens, q has 1"):
        fp32.step(0, q[:1], k, v)
    with pytest.raises(ValueError, match=r"^v: 1 tokens, q has 2"):
        fp32.step(0, q, k, v[:1])
    with pytest.raises(ValueError, match=r"0 tokens"):
        fp32.step(0, q[:0], k[:0], v[:0])
    with pytest.raises(ValueError, match=r"^v: 1 tokens, k has 2"):
        fp32.step(0, None, k, v[:1], mode="append")
    with pytest.raises(ValueError, match=r"layer 4 out of range \[0, 4\)"):
        fp32.step(4, q, k, v)
    with pytest.raises(ValueError, match=r"layer -1 out of range"):
        fp32.step(-1, q, k, v)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        fp32.step(0, q, k, v, mode="decode")
    with pytest.raises(ValueError, match=r"^q: required in attend mode"):
        fp32.step(0, None, k, v)
    with pytest.raises(ValueError, match=r"^q: required in fetch mode"):
        fp32.step(0, None, k, v, mode="fetch")
    with pytest.raises(ValueError, match=r"position: -1"):
        fp32.step(0, q, k, v, position=-1)
    with pytest.raises(ValueError, match=r"^entries\[1\]\.session: .* is "
                                         r"also entries\[0\]"):
        client.step(0, "attend", [kvmem.StepEntry(fp32, q, k, v),
                                  kvmem.StepEntry(fp32, q, k, v)])
    with pytest.raises(ValueError, match=r"^entries\[1\]\.q: dtype float32"):
        client.step(0, "attend", [kvmem.StepEntry(fp32, q, k, v),
                                  kvmem.StepEntry(bf16, q, k, v)])
    with pytest.raises(ValueError, match=r"at least one entry"):
        client.step(0, "attend", [])
    with client.step_stream() as stream:
        with pytest.raises(ValueError, match=r"^entries\[0\]\.q: dtype"):
            stream.send(0, "attend", [kvmem.StepEntry(bf16, q, k, v)])
        assert stream.pending == 0
        with pytest.raises(ValueError, match=r"no request pending"):
            stream.receive()

    # Nothing was sent: the tracked and the stored positions are still 0.
    for session in (fp32, bf16, sixteen):
        zeros = [0] * session.shape.layers
        assert session.layer_next_positions == zeros
        assert session.refresh().layer_next_positions == zeros


def test_session_config_is_checked_before_sending(
        client: kvmem.Client) -> None:
    with pytest.raises(ValueError, match=r"shape\.dtype must be one of .*"
                                         r"'bfloat16'"):
        client.create_session(kvmem.ModelShape(4, 2, 8, 64, "bfloat16"))
    with pytest.raises(ValueError, match=r"^durability must be one of"):
        client.create_session(SHAPE, durability="sync")
    with pytest.raises(ValueError, match=r"policy\.positions_mode"):
        client.create_session(SHAPE, kvmem.CachePolicy(
            positions_mode="relative"))
    with pytest.raises(ValueError, match=r"rotary\.scaling"):
        client.create_session(kvmem.ModelShape(
            4, 2, 8, 64, "fp32", rotary=kvmem.Rotary(10000.0,
                                                     scaling="yarn")))
    assert list(client.list_sessions()) == []


# -- the documented example --------------------------------------------------

# Files whose first ```python block is a runnable example against a server
# at 127.0.0.1:50051 (replaced by this test's), run from the repository root.
EXAMPLE_DOCS = ["client/python/README.md"]


@pytest.mark.parametrize("doc", EXAMPLE_DOCS)
def test_readme_example_runs(server: RunningServer, doc: str) -> None:
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "no ```python block in " + doc
    code = match.group(1).replace("127.0.0.1:50051", server.address)
    # The example names the default build; run it against this one.
    code = code.replace('"build/release/python"',
                        repr(os.path.join(BUILD, "python")))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "(1, 8) 1\n", run.stdout
