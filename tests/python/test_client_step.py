"""Session.step, Client.step and StepStream against the real kvmem-server.

With a step budget that covers every token, a decode step attends over the
whole history (resident and recalled spilled tokens alike), so every ATTEND
result must equal full causal attention computed here in numpy (float64 on
the very values sent), and FETCH must return every position so far.
Tolerances, |got - want| <= tol + tol·|want| per element:
    output: fp32 1e-5, fp16 1e-3, bf16 1e-2 (the output's own rounding);
    lse (fp32 on the wire for every dtype): 1e-5.

Run with Debian's /usr/bin/python3 -m pytest; KVMEM_BUILD names the build
directory. The server, client and stub fixtures come from test_client.py.
"""
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np
import pytest

from test_client import (RunningServer, kvmem, pb, rpc, start_server,
                         tenant_for)
# The same fixtures as test_client.py (module scope: one server for this
# module too; tests keep apart by tenant). Imported, pytest registers them.
from test_client import client, server, stub  # noqa: F401

# The budget covers every token of these tests (at most 200 per session);
# the resident set (4 + 2·64 = 132 tokens) does not, so tokens spill and
# come back by recall. Dense layers stay the default {0, 1}.
POLICY = kvmem.CachePolicy(sinks=4, cascades=2, window=64, page_tokens=16,
                           step_budget_tokens=256, recent_tokens=16,
                           recall=True)
RESIDENT_TOKENS = 4 + 2 * 64

OUTPUT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}
LSE_TOLERANCE = 1e-5

SEED = int(os.environ.get("KVMEM_TEST_SEED", "1234"))


def shape_of(dtype: str, layers: int = 4, kv_heads: int = 2,
             query_heads: int = 8, head_dim: int = 64) -> kvmem.ModelShape:
    return kvmem.ModelShape(layers=layers, kv_heads=kv_heads,
                            query_heads=query_heads, head_dim=head_dim,
                            dtype=dtype)


def to_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the session dtype's numpy convention."""
    if dtype == "bf16":
        return kvmem.to_bf16(values)
    return values.astype(np.float16 if dtype == "fp16" else np.float32)


def from_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """The session dtype's numpy convention -> exact float64 values."""
    if dtype == "bf16":
        return kvmem.from_bf16(values).astype(np.float64)
    return values.astype(np.float64)


def full_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          first: int, scale: float
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """Softmax attention of T query tokens at positions first..first+T-1
    over every key at or before each one.

    Args:
        q: [T, Hq, D] float64.
        k, v: [first + T, H, D] float64, positions 0.. in order.
        scale: multiplies q·k.

    Returns:
        output [T, Hq, D] and lse [T, Hq] (natural log of the softmax
        denominator over the scaled logits), float64. Query head h uses KV
        head h // (Hq // H).
    """
    tokens, query_heads, _ = q.shape
    keys = k.shape[0]
    assert keys == first + tokens
    group = query_heads // k.shape[1]
    k_q = np.repeat(k, group, axis=1)  # [N, Hq, D]: head h -> h // group
    v_q = np.repeat(v, group, axis=1)
    logits = np.einsum("thd,nhd->thn", q, k_q) * scale  # [T, Hq, N]
    visible = (np.arange(keys)[np.newaxis, :]
               <= (first + np.arange(tokens))[:, np.newaxis])  # [T, N]
    logits = np.where(visible[:, np.newaxis, :], logits, -np.inf)
    peak = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    lse = (peak + np.log(total))[..., 0]
    output = np.einsum("thn,nhd->thd", weights / total, v_q)
    return output, lse


def assert_close(what: str, got: np.ndarray, want: np.ndarray,
                 tol: float) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    excess = np.abs(got - want) - (tol + tol * np.abs(want))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"{what}: at {tuple(int(i) for i in worst)} got {got[worst]!r}, "
        f"want {want[worst]!r} (tolerance {tol} + {tol}·|want|; seed "
        f"{SEED})")


class Model:
    """What one session should hold, per layer: every k and v sent (as
    sent, and as exact float64), to check each reply against."""

    def __init__(self, session: kvmem.Session,
                 rng: np.random.Generator) -> None:
        self.session = session
        self.shape = session.shape
        self.rng = rng
        layers = self.shape.layers
        self.k_sent: List[List[np.ndarray]] = [[] for _ in range(layers)]
        self.v_sent: List[List[np.ndarray]] = [[] for _ in range(layers)]

    def tokens(self, count: int
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random q [T, Hq, D], k and v [T, H, D] in the session's dtype."""
        s = self.shape
        draw = lambda heads: to_wire(  # noqa: E731
            self.rng.standard_normal((count, heads, s.head_dim),
                                     dtype=np.float32), s.dtype)
        return draw(s.query_heads), draw(s.kv_heads), draw(s.kv_heads)

    def stored(self, layer: int) -> int:
        """Tokens stored in `layer` so far: its next position."""
        return sum(len(k) for k in self.k_sent[layer])

    def history(self, layer: int, sent: bool = False
                ) -> Tuple[np.ndarray, np.ndarray]:
        s = self.shape
        k = np.concatenate(self.k_sent[layer]) if self.k_sent[layer] else \
            np.zeros((0, s.kv_heads, s.head_dim), np.float32)
        v = np.concatenate(self.v_sent[layer]) if self.v_sent[layer] else k
        if sent:
            return k, v
        return from_wire(k, s.dtype), from_wire(v, s.dtype)

    def check(self, layer: int, mode: str, q: Optional[np.ndarray],
              k: np.ndarray, v: np.ndarray, result: kvmem.StepResult) -> None:
        """Records the step's tokens, then checks `result` against the
        whole history: full attention (attend), every position with the
        k/v bits sent (fetch)."""
        s = self.shape
        k3 = k.reshape(-1, s.kv_heads, s.head_dim)
        v3 = v.reshape(-1, s.kv_heads, s.head_dim)
        first = self.stored(layer)
        tokens = len(k3)
        self.k_sent[layer].append(k3)
        self.v_sent[layer].append(v3)
        where = (f"session {self.session.id} layer {layer} positions "
                 f"{first}..{first + tokens - 1} {mode}")
        assert result.session_id == self.session.id
        assert result.next_position == first + tokens, where
        if mode == "attend":
            q3 = from_wire(q.reshape(-1, s.query_heads, s.head_dim), s.dtype)
            all_k, all_v = self.history(layer)
            want_out, want_lse = full_causal_attention(
                q3, all_k, all_v, first, self.shape.softmax_scale)
            assert result.output.shape == (tokens, s.query_heads, s.head_dim)
            assert result.output.dtype == to_wire(np.zeros(1), s.dtype).dtype
            assert result.lse.dtype == np.float32
            assert_close(where + " output", from_wire(result.output, s.dtype),
                         want_out, OUTPUT_TOLERANCE[s.dtype])
            assert_close(where + " lse", result.lse.astype(np.float64),
                         want_lse, LSE_TOLERANCE)
            assert result.heads == []
        elif mode == "fetch":
            assert result.output is None and result.lse is None
            all_k, all_v = self.history(layer, sent=True)
            assert len(result.heads) == s.kv_heads
            for h, head in enumerate(result.heads):
                np.testing.assert_array_equal(
                    head.positions, np.arange(first + tokens),
                    err_msg=where + f" head {h} positions")
                np.testing.assert_array_equal(head.k, all_k[:, h],
                                              err_msg=where + " k")
                np.testing.assert_array_equal(head.v, all_v[:, h],
                                              err_msg=where + " v")
                assert head.query_rotary_positions.size == 0  # ABSOLUTE
        else:
            assert result.output is None and result.heads == []


@pytest.fixture
def rng() -> np.random.Generator:
    print("seed", SEED)
    return np.random.default_rng(SEED)


def decode(model: Model, tokens: int, modes: Callable[[int], str]) -> None:
    """`tokens` decode steps of every layer through Session.step, one token
    given as q [Hq, D], k and v [H, D]; layer l in mode modes(l)."""
    s = model.shape
    for _ in range(tokens):
        q, k, v = model.tokens(1)
        for layer in range(s.layers):
            mode = modes(layer)
            result = model.session.step(layer, q[0], k[0], v[0], mode=mode)
            model.check(layer, mode, q, k, v, result)


# -- one session --------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_attend_matches_full_attention(client: kvmem.Client,
                                       rng: np.random.Generator,
                                       dtype: str) -> None:
    with client.create_session(shape_of(dtype), POLICY) as session:
        model = Model(session, rng)
        decode(model, 200, lambda layer: "attend")
        assert session.layer_next_positions == [200] * 4
        assert session.position == 200
        session.refresh()
        assert session.position == 200
        assert session.layer_next_positions == [200] * 4
        # The test did reach past the resident set: recall was needed.
        assert session.resident_tokens <= 4 * 2 * RESIDENT_TOKENS
        assert session.spilled_pages > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fetch_returns_every_position(client: kvmem.Client,
                                      rng: np.random.Generator,
                                      dtype: str) -> None:
    shape = shape_of(dtype, layers=2)
    with client.create_session(shape, POLICY) as session:
        model = Model(session, rng)
        decode(model, 150, lambda layer: "fetch")
        assert session.refresh().spilled_pages > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_chunks_then_decode(client: kvmem.Client,
                                    rng: np.random.Generator,
                                    dtype: str) -> None:
    # Prefill chunks attend densely over the resident tokens only, so the
    # whole test stays within the resident set (100 <= 132 tokens).
    with client.create_session(shape_of(dtype), POLICY) as session:
        model = Model(session, rng)
        q, k, v = model.tokens(40)
        # Layer 0 stores the chunk without a query; the rest attend.
        result = session.step(0, None, k, v, mode="append")
        model.check(0, "append", None, k, v, result)
        for layer in range(1, 4):
            result = session.step(layer, q, k, v)
            assert result.output.shape == (40, 8, 64)
            assert result.lse.shape == (40, 8)
            model.check(layer, "attend", q, k, v, result)
        decode(model, 10, lambda layer: "attend")
        q, k, v = model.tokens(30)
        for layer in range(4):
            mode = ["append", "attend", "fetch", "attend"][layer]
            result = session.step(layer, q, k, v, mode=mode)
            model.check(layer, mode, q, k, v, result)
        decode(model, 20, lambda layer: ["attend", "fetch"][layer % 2])
        assert session.refresh().layer_next_positions == [100] * 4


def test_durable_position(client: kvmem.Client,
                          rng: np.random.Generator) -> None:
    with client.create_session(shape_of("fp32", layers=2), POLICY,
                               durability="step_sync") as synced:
        model = Model(synced, rng)
        for t in range(5):
            q, k, v = model.tokens(1)
            first = synced.step(0, q, k, v)
            assert first.durable_position == t  # layer 1 is behind
            last = synced.step(1, q, k, v)
            assert last.durable_position == t + 1
            assert synced.durable_position == t + 1
        assert synced.refresh().durable_position == 5
    with client.create_session(shape_of("fp32", layers=2), POLICY) as lazy:
        model = Model(lazy, rng)
        for t in range(5):
            q, k, v = model.tokens(1)
            for layer in range(2):
                result = lazy.step(layer, q, k, v)
                assert 0 <= result.durable_position <= t + 1


# -- many sessions ------------------------------------------------------------

def test_batch_of_sessions_with_different_shapes(
        client: kvmem.Client, rng: np.random.Generator) -> None:
    shapes = [shape_of("fp32"),
              shape_of("bf16", kv_heads=1, query_heads=4, head_dim=128),
              shape_of("fp16", kv_heads=4, query_heads=4),
              shape_of("fp32", kv_heads=2, query_heads=2, head_dim=256),
              shape_of("bf16")]
    models = [Model(client.create_session(s, POLICY), rng) for s in shapes]
    try:
        # Session i joins after 3·i tokens: one request mixes positions.
        for t in range(40):
            live = [m for i, m in enumerate(models) if t >= 3 * i]
            inputs = [m.tokens(1) for m in live]
            for layer in range(4):
                mode = "fetch" if layer == 3 else "attend"
                entries = [kvmem.StepEntry(m.session, q, k, v)
                           for m, (q, k, v) in zip(live, inputs)]
                results = client.step(layer, mode, entries)
                assert [r.session_id for r in results] == [
                    m.session.id for m in live]
                for m, (q, k, v), result in zip(live, inputs, results):
                    m.check(layer, mode, q, k, v, result)
        for i, m in enumerate(models):
            assert m.session.refresh().position == 40 - 3 * i
    finally:
        for m in models:
            m.session.delete()


def test_two_streams_interleave(client: kvmem.Client,
                                rng: np.random.Generator) -> None:
    """Four sessions switch streams every token. For each token both
    streams have all four layers in flight before either is read."""
    models = [Model(client.create_session(shape_of(dtype), POLICY), rng)
              for dtype in ("fp32", "bf16", "fp32", "fp16")]
    try:
        with client.step_stream() as even, client.step_stream() as odd:
            for t in range(60):
                first, second = models[:2], models[2:]
                if t % 2:
                    first, second = second, first
                work = []
                for stream, group in ((even, first), (odd, second)):
                    inputs = [m.tokens(1) for m in group]
                    for layer in range(4):
                        stream.send(layer, "attend", [
                            kvmem.StepEntry(m.session, q, k, v)
                            for m, (q, k, v) in zip(group, inputs)])
                    work.append((stream, group, inputs))
                assert even.pending == odd.pending == 4
                for stream, group, inputs in reversed(work):
                    for layer in range(4):
                        results = stream.receive()
                        for m, (q, k, v), result in zip(group, inputs,
                                                        results):
                            m.check(layer, "attend", q, k, v, result)
                assert even.pending == odd.pending == 0
        for m in models:
            assert m.session.refresh().layer_next_positions == [60] * 4
    finally:
        for m in models:
            m.session.delete()


def test_four_workers_sixteen_sessions(server: RunningServer,
                                       request: pytest.FixtureRequest
                                       ) -> None:
    """Issue 6's load: four workers, each with its own stream and client,
    drive four sessions each of four layers for 200 tokens in batches, all
    at once; every ATTEND result equals full attention."""
    tenant = tenant_for(request)
    failures: List[BaseException] = []

    def worker(index: int) -> None:
        try:
            rng = np.random.default_rng(SEED + index)
            dtypes = ["fp32", "bf16", "fp16", "bf16"]
            with kvmem.Client(server.address, tenant=tenant) as c:
                models = [Model(c.create_session(
                    shape_of(dtypes[(index + i) % 4]), POLICY,
                    session_id=f"w{index}-s{i}"), rng) for i in range(4)]
                with c.step_stream() as stream:
                    for _ in range(200):
                        inputs = [m.tokens(1) for m in models]
                        for layer in range(4):
                            results = stream.step(layer, "attend", [
                                kvmem.StepEntry(m.session, q, k, v)
                                for m, (q, k, v) in zip(models, inputs)])
                            for m, (q, k, v), result in zip(
                                    models, inputs, results):
                                m.check(layer, "attend", q, k, v, result)
                for m in models:
                    assert m.session.refresh().position == 200
                    m.session.delete()
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


# -- errors -------------------------------------------------------------------

class TwoSessions:
    """A bf16 session 3 tokens in (and an fp32 one for batches), with raw
    requests to break and a check that nothing changed."""

    def __init__(self, client: kvmem.Client, rng: np.random.Generator):
        self.client = client
        self.bf16 = Model(client.create_session(shape_of("bf16"), POLICY,
                                                session_id="bf16"), rng)
        self.fp32 = Model(client.create_session(shape_of("fp32"), POLICY,
                                                session_id="fp32"), rng)
        for model in (self.bf16, self.fp32):
            decode(model, 3, lambda layer: "attend")
        self.metadata = (("kvmem-tenant", client.tenant),)

    def entry(self, model: Model, **changes: object) -> "pb.StepEntry":
        """A valid layer-0 entry of one new token, with `changes`."""
        q, k, v = model.tokens(1)
        fields: Dict[str, object] = dict(
            session_id=model.session.id, position=model.stored(0),
            num_tokens=1, q=q.tobytes(), k=k.tobytes(), v=v.tobytes())
        fields.update(changes)
        return pb.StepEntry(**fields)

    def assert_unchanged(self) -> None:
        """Positions as before, and a valid step of every layer of both
        sessions attends over exactly the history the test sent."""
        for model in (self.bf16, self.fp32):
            stored = [model.stored(layer) for layer in range(4)]
            assert model.session.refresh().layer_next_positions == stored
        decode(self.bf16, 1, lambda layer: "attend")
        decode(self.fp32, 1, lambda layer: "attend")


@pytest.fixture
def sessions(client: kvmem.Client, rng: np.random.Generator
           ) -> Iterator[TwoSessions]:
    fixture = TwoSessions(client, rng)
    yield fixture
    for model in (fixture.bf16, fixture.fp32):
        model.session.delete()


def _bad_requests(f: TwoSessions) -> Dict[str, Tuple[
        "pb.StepRequest", grpc.StatusCode, List[str]]]:
    """name -> (request, code, words its message must hold)."""
    attend = pb.STEP_MODE_ATTEND
    one = lambda *entries, layer=0, mode=attend: pb.StepRequest(  # noqa
        layer=layer, mode=mode, entries=list(entries))
    q_bytes = 8 * 64 * 2  # one bf16 token: [1, Hq, D]
    kv_bytes = 2 * 64 * 2  # [1, H, D]
    fp32_k = np.zeros((1, 2, 64), np.float32).tobytes()  # fp32 in a bf16 one
    at = f.bf16.stored(0)
    return {
        "q_short": (one(f.entry(f.bf16, q=b"\0" * (q_bytes - 2))),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    ["entries[0].q", str(q_bytes - 2), str(q_bytes)]),
        "k_fp32_in_bf16_session": (
            one(f.entry(f.bf16, k=fp32_k)), grpc.StatusCode.INVALID_ARGUMENT,
            ["entries[0].k", str(2 * kv_bytes), str(kv_bytes)]),
        "v_long": (one(f.entry(f.bf16, v=b"\0" * (kv_bytes + 2))),
                   grpc.StatusCode.INVALID_ARGUMENT,
                   ["entries[0].v", str(kv_bytes + 2), str(kv_bytes)]),
        "q_empty_in_attend": (one(f.entry(f.bf16, q=b"")),
                              grpc.StatusCode.INVALID_ARGUMENT,
                              ["entries[0].q", "0 bytes", str(q_bytes)]),
        "num_tokens_2_for_1": (one(f.entry(f.bf16, num_tokens=2)),
                               grpc.StatusCode.INVALID_ARGUMENT,
                               ["entries[0].q", str(2 * q_bytes)]),
        "num_tokens_0": (one(f.entry(f.bf16, num_tokens=0)),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         ["entries[0].num_tokens", "0"]),
        "layer_past_last": (one(f.entry(f.bf16), layer=4),
                            grpc.StatusCode.INVALID_ARGUMENT,
                            ["layer", "4"]),
        "layer_negative": (one(f.entry(f.bf16), layer=-1),
                           grpc.StatusCode.INVALID_ARGUMENT,
                           ["layer", "-1"]),
        "mode_unspecified": (one(f.entry(f.bf16),
                                 mode=pb.STEP_MODE_UNSPECIFIED),
                             grpc.StatusCode.INVALID_ARGUMENT, ["mode"]),
        "no_entries": (one(), grpc.StatusCode.INVALID_ARGUMENT,
                       ["entries"]),
        "session_twice": (one(f.entry(f.bf16), f.entry(f.bf16)),
                          grpc.StatusCode.INVALID_ARGUMENT,
                          ["entries[1].session_id"]),
        "position_gap": (one(f.entry(f.bf16, position=at + 1)),
                         grpc.StatusCode.FAILED_PRECONDITION,
                         ["entries[0].position", f"expected {at}"]),
        "position_repeat": (one(f.entry(f.bf16, position=at - 1)),
                            grpc.StatusCode.FAILED_PRECONDITION,
                            ["entries[0].position", f"expected {at}"]),
        "unknown_session": (one(f.entry(f.bf16, session_id="no-such")),
                            grpc.StatusCode.NOT_FOUND,
                            ["entries[0].session_id", "no-such"]),
        # One bad entry rejects the request: the good one is not applied.
        "second_entry_bad": (
            one(f.entry(f.fp32), f.entry(f.bf16, position=at + 5)),
            grpc.StatusCode.FAILED_PRECONDITION,
            ["entries[1].position", f"expected {at}"]),
        "second_entry_unknown": (
            one(f.entry(f.fp32), f.entry(f.bf16, session_id="gone")),
            grpc.StatusCode.NOT_FOUND, ["entries[1].session_id"]),
    }


BAD_REQUEST_NAMES = [
    "q_short", "k_fp32_in_bf16_session", "v_long", "q_empty_in_attend",
    "num_tokens_2_for_1", "num_tokens_0", "layer_past_last",
    "layer_negative", "mode_unspecified", "no_entries", "session_twice",
    "position_gap", "position_repeat", "unknown_session",
    "second_entry_bad", "second_entry_unknown"]


@pytest.mark.parametrize("name", BAD_REQUEST_NAMES)
@pytest.mark.parametrize("rpc_kind", ["Step", "StepStream"])
def test_server_rejects_bad_request_and_changes_nothing(
        sessions: TwoSessions, stub: rpc.KvMemoryStub, name: str,
        rpc_kind: str) -> None:
    request, code, words = _bad_requests(sessions)[name]
    request.request_id = 77
    if rpc_kind == "Step":
        with pytest.raises(grpc.RpcError) as error:
            stub.Step(request, metadata=sessions.metadata, timeout=60)
        got_code, details = error.value.code(), error.value.details()
    else:
        # On a stream the error answers that request only: the stream goes
        # on and applies the next one.
        model = sessions.bf16
        q, k, v = model.tokens(1)
        at = model.stored(0)
        follow_up = pb.StepRequest(
            layer=0, mode=pb.STEP_MODE_ATTEND, request_id=78,
            entries=[pb.StepEntry(session_id=model.session.id, position=at,
                                  num_tokens=1, q=q.tobytes(),
                                  k=k.tobytes(), v=v.tobytes())])
        replies = list(stub.StepStream(iter([request, follow_up]),
                                       metadata=sessions.metadata, timeout=60))
        assert len(replies) == 2
        assert replies[0].request_id == 77
        assert not replies[0].HasField("response")
        got_code = next(c for c in grpc.StatusCode
                        if c.value[0] == replies[0].error_code)
        details = replies[0].error_message
        assert replies[1].request_id == 78
        assert replies[1].error_code == 0, replies[1].error_message
        assert replies[1].response.results[0].next_position == at + 1
        model.k_sent[0].append(k)  # checked by assert_unchanged's step
        model.v_sent[0].append(v)
    assert got_code == code, details
    for word in words:
        assert word in details, (word, details)
    sessions.assert_unchanged()


def test_wrong_tenant_is_not_found(server: RunningServer,
                                   sessions: TwoSessions,
                                   stub: rpc.KvMemoryStub) -> None:
    request = pb.StepRequest(layer=0, mode=pb.STEP_MODE_ATTEND,
                             entries=[sessions.entry(sessions.bf16)])
    with pytest.raises(grpc.RpcError) as error:
        stub.Step(request, metadata=(("kvmem-tenant", "someone-else"),),
                  timeout=60)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # Through the client: this tenant's handle, sent by another's client.
    with kvmem.Client(server.address, tenant="someone-else") as other:
        q, k, v = sessions.bf16.tokens(1)
        with pytest.raises(kvmem.NotFoundError) as mapped:
            other.step(0, "attend", [kvmem.StepEntry(sessions.bf16.session,
                                                     q, k, v)])
    assert mapped.value.code == grpc.StatusCode.NOT_FOUND
    assert "entries[0].session_id" in mapped.value.details
    sessions.assert_unchanged()


def test_client_maps_step_errors(client: kvmem.Client, sessions: TwoSessions,
                                 stub: rpc.KvMemoryStub) -> None:
    session = sessions.bf16.session
    at = sessions.bf16.stored(0)
    q, k, v = sessions.bf16.tokens(1)
    with pytest.raises(kvmem.FailedPreconditionError) as gap:
        session.step(0, q, k, v, position=at + 1)
    assert gap.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"expected {at}" in gap.value.details
    assert isinstance(gap.value.__cause__, grpc.RpcError)
    assert session.layer_next_positions[0] == at  # not advanced
    # Exactly the message the raw stub gets.
    with pytest.raises(grpc.RpcError) as raw:
        stub.Step(pb.StepRequest(layer=0, mode=pb.STEP_MODE_ATTEND, entries=[
            sessions.entry(sessions.bf16, position=at + 1)]),
            metadata=sessions.metadata, timeout=60)
    assert gap.value.details == raw.value.details()

    # A batch with one bad entry: rejected whole, no tracked position moves.
    fp32 = sessions.fp32
    with pytest.raises(kvmem.FailedPreconditionError) as batch:
        client.step(0, "attend", [
            kvmem.StepEntry(fp32.session, *fp32.tokens(1)),
            kvmem.StepEntry(session, q, k, v, position=at + 2)])
    assert "entries[1].position" in batch.value.details
    assert fp32.session.layer_next_positions[0] == fp32.stored(0)

    doomed = client.create_session(shape_of("bf16"), POLICY,
                                   session_id="doomed")
    doomed.delete()
    with pytest.raises(kvmem.NotFoundError) as missing:
        doomed.step(0, q, k, v)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "doomed" in missing.value.details
    sessions.assert_unchanged()


def test_identical_retry_is_answered_again(sessions: TwoSessions,
                                           stub: rpc.KvMemoryStub) -> None:
    """A lost reply: the worker sends the same step again and gets the same
    reply, applied once."""
    model = sessions.bf16
    q, k, v = model.tokens(1)
    at = model.stored(0)
    request = pb.StepRequest(layer=0, mode=pb.STEP_MODE_ATTEND, entries=[
        pb.StepEntry(session_id=model.session.id, position=at, num_tokens=1,
                     q=q.tobytes(), k=k.tobytes(), v=v.tobytes())])
    first = stub.Step(request, metadata=sessions.metadata, timeout=60)
    again = stub.Step(request, metadata=sessions.metadata, timeout=60)
    assert again == first
    assert first.results[0].next_position == at + 1
    model.k_sent[0].append(k)
    model.v_sent[0].append(v)
    # Through the client, which the retry leaves where the server is.
    session = model.session.refresh()
    result = session.step(0, q, k, v, position=at)
    assert result.output.tobytes() == first.results[0].output
    assert session.layer_next_positions[0] == at + 1
    # Not identical (another query): a repeat, refused.
    with pytest.raises(kvmem.FailedPreconditionError) as repeat:
        session.step(0, model.tokens(1)[0], k, v, position=at)
    assert f"expected {at + 1}" in repeat.value.details
    sessions.assert_unchanged()


def test_stream_errors_answer_their_request_only(
        client: kvmem.Client, sessions: TwoSessions) -> None:
    bf16, fp32 = sessions.bf16, sessions.fp32
    doomed = client.create_session(shape_of("fp32"), POLICY,
                                   session_id="doomed")
    doomed.delete()
    with client.step_stream() as stream:
        # Pipelined: good, a gap, unknown session, good.
        q1, k1, v1 = fp32.tokens(1)
        q, k, v = bf16.tokens(1)
        at = bf16.stored(0)
        first = stream.send(0, "attend", [
            kvmem.StepEntry(fp32.session, q1, k1, v1)])
        assert first == 1  # request ids count from 1 on each stream
        stream.send(0, "attend", [
            kvmem.StepEntry(bf16.session, q, k, v, position=at + 3)])
        stream.send(0, "attend", [kvmem.StepEntry(doomed, q1, k1, v1)])
        stream.send(0, "attend", [
            kvmem.StepEntry(bf16.session, q, k, v, position=at)])
        assert stream.pending == 4
        fp32.check(0, "attend", q1, k1, v1, stream.receive()[0])
        with pytest.raises(kvmem.FailedPreconditionError) as gap:
            stream.receive()
        assert gap.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"expected {at}" in gap.value.details
        with pytest.raises(kvmem.NotFoundError) as missing:
            stream.receive()
        assert "doomed" in missing.value.details
        bf16.check(0, "attend", q, k, v, stream.receive()[0])
        assert bf16.session.layer_next_positions[0] == at + 1
        # Tracked positions follow what was applied.
        q, k, v = bf16.tokens(1)
        bf16.check(0, "attend", q, k, v, stream.step(
            0, "attend", [kvmem.StepEntry(bf16.session, q, k, v)])[0])
    sessions.assert_unchanged()


def test_cancelled_stream(sessions: TwoSessions) -> None:
    model = sessions.fp32
    stream = sessions.client.step_stream()
    q, k, v = model.tokens(1)
    model.check(0, "attend", q, k, v, stream.step(
        0, "attend", [kvmem.StepEntry(model.session, q, k, v)])[0])
    stream.cancel()
    with pytest.raises(kvmem.KvmemError) as cancelled:
        stream.send(0, "attend", [kvmem.StepEntry(model.session,
                                                  *model.tokens(1))])
    assert cancelled.value.code == grpc.StatusCode.CANCELLED
    stream.close()  # after a cancel: nothing left to do
    sessions.assert_unchanged()


def test_oversized_request_is_resource_exhausted(
        request: pytest.FixtureRequest) -> None:
    for small in start_server(["--max_message_bytes=65536"]):
        with kvmem.Client(small.address, tenant=tenant_for(request)) as c:
            with c.create_session(shape_of("fp32"), POLICY) as session:
                model = Model(session, np.random.default_rng(SEED))
                q, k, v = model.tokens(64)  # q alone: 131072 bytes
                with pytest.raises(kvmem.ResourceExhaustedError) as error:
                    session.step(0, q, k, v)
                assert error.value.code == \
                    grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "65536" in error.value.details
                assert session.layer_next_positions == [0] * 4
                assert session.refresh().layer_next_positions == [0] * 4
                decode(model, 2, lambda layer: "attend")
