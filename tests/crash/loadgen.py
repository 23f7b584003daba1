"""Load generator of the kvmem crash test.

Drives several sessions of a running kvmem-server, a mix of STEP_SYNC and
ASYNC, fp32 and bf16, with decode steps and prefill chunks in every step mode,
and records what the server acknowledged in a journal that the checker reads
after the server was killed and restarted.

Everything a session is sent is a pure function of (seed, session, layer,
position):
- the step plan: a step starting at position p of session i has T tokens and
  a mode given by `planned_step(seed, i, p)`; position 0 is a 32-token prompt.
  A session's steps therefore lie on one chain of boundaries 0, T0, T0+T1, ...,
  and whoever resumes a session from a boundary re-sends identical bytes;
- q, k and v: `tensor_values(seed, i, layer, kind, positions, heads)`, hashed
  per element (splitmix64), so the checker can regenerate any token's keys and
  values and compare what a FETCH returns byte for byte.

Every reply is checked as it arrives (`SessionDriver.apply`): next_position,
durable_position monotone and never ahead of the tokens stored in every layer,
STEP_SYNC replies covering every acknowledged token, ASYNC durable_position
catching up within a bound, FETCH positions and sampled bytes, and identical
retries answered again rather than applied twice. Now and then (2% of
tokens) the load calls Checkpoint for a session: the durable_position it
returns must cover every token stored before the call.

The journal is JSON lines, appended and fsynced per record (group commit
across threads): `config`, `created`, `ack` (session, layer, position, T,
next_position, durable_position), `ckpt` (a Checkpoint's durable_position)
and `sent` (the highest end position sent per layer). Run by
crash_test.py; also usable by hand against a server:

    /usr/bin/python3 tests/crash/loadgen.py --address 127.0.0.1:50051 \\
        --journal /tmp/j.jsonl --seconds 2
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Iterator, Optional, Sequence

import grpc
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# The model shape and policy of every crash-test session.
LAYERS = 2
KV_HEADS = 2
QUERY_HEADS = 4
HEAD_DIM = 64
SINKS = 4
CASCADES = 2
WINDOW = 32
PAGE_TOKENS = 8
# Covers every token a session will ever hold, so that a FETCH returns all
# of them (the API's largest step budget).
STEP_BUDGET = 1048576
PROMPT_TOKENS = 32

# Tensor kinds, hashed into the generated values.
KIND_Q, KIND_K, KIND_V = 0, 1, 2

RPC_TIMEOUT_S = 60.0
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1),
                   ("grpc.max_receive_message_length", -1)]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def default_build() -> str:
    """The build directory: $KVMEM_BUILD, else the repo's build/release."""
    return os.environ.get("KVMEM_BUILD",
                          os.path.join(REPO, "build", "release"))


def load_stubs(build: str) -> tuple[Any, Any]:
    """Imports the generated kvmem.v1 stubs from `build`/python.

    Returns (kvmem_pb2, kvmem_pb2_grpc)."""
    path = os.path.join(os.path.abspath(build), "python")
    if path not in sys.path:
        sys.path.insert(0, path)
    # pylint: disable=import-outside-toplevel
    from kvmem.v1 import kvmem_pb2 as pb
    from kvmem.v1 import kvmem_pb2_grpc as rpc
    return pb, rpc


# ---------------------------------------------------------------------------
# Deterministic inputs
# ---------------------------------------------------------------------------

def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers."""
    h = 0x243F6A8885A308D3
    for part in parts:
        h = _mix64(h ^ _mix64((part + _GOLDEN) & _M64))
    return h


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
    return x ^ (x >> np.uint64(31))


def tensor_values(seed: int, session: int, layer: int, kind: int,
                  positions: np.ndarray, heads: int) -> np.ndarray:
    """The float32 values [N, heads, HEAD_DIM] of tensor `kind` at the given
    positions: uniform in [-1, 1) with 24 significant bits, one hash per
    element of (seed, session, layer, kind, position, head, channel)."""
    base = np.uint64(hash64(seed, session, layer, kind))
    pos = np.asarray(positions, dtype=np.uint64)
    counter = ((pos[:, None, None] * np.uint64(heads)
                + np.arange(heads, dtype=np.uint64)[None, :, None])
               * np.uint64(HEAD_DIM)
               + np.arange(HEAD_DIM, dtype=np.uint64)[None, None, :])
    bits = _mix64_array(counter * np.uint64(_GOLDEN) + base) >> np.uint64(40)
    return bits.astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)


def encode(values: np.ndarray, bf16: bool) -> bytes:
    """Wire bytes of float32 values: fp32 as is, bf16 as their upper 16 bits
    (exact, since the generator's values are then defined by those bits)."""
    values = np.ascontiguousarray(values, dtype="<f4")
    if bf16:
        return (values.view("<u4") >> np.uint32(16)).astype("<u2").tobytes()
    return values.tobytes()


@dataclasses.dataclass(frozen=True)
class SessionSpec:
    """One crash-test session: index, id, durability and dtype."""

    index: int
    session_id: str
    sync: bool   # STEP_SYNC, else ASYNC
    bf16: bool   # bf16, else fp32

    @property
    def label(self) -> str:
        """A short name for summaries, e.g. `s2:S/bf16`."""
        return "s%d:%s/%s" % (self.index, "S" if self.sync else "A",
                              "bf16" if self.bf16 else "fp32")

    @property
    def elem_bytes(self) -> int:
        """Bytes per tensor element on the wire."""
        return 2 if self.bf16 else 4


def session_specs(count: int) -> list[SessionSpec]:
    """Sessions crash-s0.. : even ones STEP_SYNC, odd ones ASYNC; dtype fp32,
    fp32, bf16, bf16, ... so that each durability has both dtypes."""
    return [SessionSpec(i, "crash-s%d" % i, i % 2 == 0, (i // 2) % 2 == 1)
            for i in range(count)]


def planned_step(pb: Any, seed: int, session: int,
                 position: int) -> tuple[int, int]:
    """(T, mode) of the step that starts at `position`: position 0 is a
    prompt (ATTEND, PROMPT_TOKENS); then 5% prefill chunks of 8..48 tokens
    (ATTEND or APPEND), else decode steps: 10% FETCH, 60% ATTEND, 30%
    APPEND."""
    if position == 0:
        return PROMPT_TOKENS, pb.STEP_MODE_ATTEND
    h = hash64(seed, session, position, 0x5EED)
    if h % 100 < 5:
        mode = pb.STEP_MODE_ATTEND if (h >> 20) & 1 else pb.STEP_MODE_APPEND
        return 8 + (h >> 8) % 41, mode
    r = (h >> 24) % 100
    if r < 10:
        return 1, pb.STEP_MODE_FETCH
    return 1, pb.STEP_MODE_ATTEND if r < 70 else pb.STEP_MODE_APPEND


def checkpoint_planned(seed: int, session: int, position: int) -> bool:
    """Whether the load calls Checkpoint for the session once every layer
    reached `position` (2%)."""
    return hash64(seed, session, position, 0xC4EC) % 100 < 2


def retry_planned(seed: int, session: int, layer: int, position: int) -> bool:
    """Whether the step of (session, layer) at `position` is sent twice
    (4%), as a worker does after a lost reply."""
    return hash64(seed, session, layer, position, 0xAE7) % 100 < 4


class Chain:
    """The step boundaries of one session's plan: 0, T0, T0+T1, ..."""

    def __init__(self, pb: Any, seed: int, session: int) -> None:
        self._pb = pb
        self._seed = seed
        self._session = session
        self._ends: list[int] = [0]
        self._start_of: dict[int, int] = {}

    def _extend(self, position: int) -> None:
        while self._ends[-1] < position:
            start = self._ends[-1]
            tokens, _ = planned_step(self._pb, self._seed, self._session,
                                     start)
            self._ends.append(start + tokens)
            self._start_of[start + tokens] = start

    def is_boundary(self, position: int) -> bool:
        """Whether a step of the plan starts (and one ends) at `position`."""
        self._extend(position)
        return position == 0 or position in self._start_of

    def step_ending_at(self, position: int) -> Optional[tuple[int, int, int]]:
        """(start, T, mode) of the planned step ending at `position`."""
        if not self.is_boundary(position) or position == 0:
            return None
        start = self._start_of[position]
        tokens, mode = planned_step(self._pb, self._seed, self._session, start)
        return start, tokens, mode


# ---------------------------------------------------------------------------
# Journal and report
# ---------------------------------------------------------------------------

class Journal:
    """An append-only JSON-lines file; `append` returns once its record is
    fsynced. Concurrent appenders share fsyncs (group commit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._cond = threading.Condition()
        self._written = 0
        self._synced = 0
        self._syncing = False

    def append(self, record: dict[str, Any]) -> None:
        """Appends one record and waits until it is on disk."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._cond:
            os.write(self._fd, line)
            self._written += 1
            mine = self._written
            while self._synced < mine:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._written
                self._cond.release()
                try:
                    os.fsync(self._fd)
                finally:
                    self._cond.acquire()
                    self._syncing = False
                self._synced = max(self._synced, target)
                self._cond.notify_all()

    def close(self) -> None:
        """Closes the file."""
        os.close(self._fd)

    @staticmethod
    def read(path: str) -> list[dict[str, Any]]:
        """Every complete record of a journal (a torn last line is ignored)."""
        records = []
        if not os.path.exists(path):
            return records
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    records.append(json.loads(line))
        return records


class Report:
    """Violations (contract broken: the run fails) and notes (worth telling,
    not failing; violations too when strict), aggregated by (category,
    session) with the first message and a count; plus named counters."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._lock = threading.Lock()
        self.cycle = 0
        self.violations: dict[tuple[str, str], list[Any]] = {}
        self.notes: dict[tuple[str, str], list[Any]] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.cycle_violations = 0

    def violation(self, category: str, session: str, message: str) -> None:
        """Records a broken contract."""
        with self._lock:
            self._add(self.violations, category, session, message)
            self.cycle_violations += 1

    def note(self, category: str, session: str, message: str) -> None:
        """Records something worth telling that is not a failure (unless
        strict)."""
        if self.strict:
            self.violation(category, session, message)
            return
        with self._lock:
            self._add(self.notes, category, session, message)

    def count(self, name: str, n: int = 1) -> None:
        """Adds to a counter."""
        with self._lock:
            self.counters[name] += n

    def _add(self, table: dict[tuple[str, str], list[Any]], category: str,
             session: str, message: str) -> None:
        entry = table.get((category, session))
        if entry is None:
            table[(category, session)] = [1, self.cycle, message]
            print("  %s [cycle %d] %s %s: %s" % (
                "VIOLATION" if table is self.violations else "note",
                self.cycle, category, session, message), flush=True)
        else:
            entry[0] += 1

    def violation_count(self) -> int:
        """Violations recorded so far, repeats included."""
        with self._lock:
            return sum(e[0] for e in self.violations.values())

    def lines(self, table: dict[tuple[str, str], list[Any]]) -> list[str]:
        """One line per (category, session): count, first cycle, message."""
        with self._lock:
            return ["%s %s: %d time(s), first in cycle %d: %s"
                    % (category, session, e[0], e[1], e[2])
                    for (category, session), e in sorted(table.items())]


# ---------------------------------------------------------------------------
# Talking to the server
# ---------------------------------------------------------------------------

class StepFailed(Exception):
    """A step, session call or stream request answered with an error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__("%s: %s" % (code.name, details))
        self.code = code
        self.details = details

    @staticmethod
    def from_rpc(error: grpc.RpcError) -> "StepFailed":
        """From a grpc.RpcError."""
        return StepFailed(error.code(), error.details() or "")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class UnaryTransport:
    """Sends each StepRequest with the unary Step RPC."""

    name = "Step"

    def __init__(self, stub: Any, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    def step(self, request: Any) -> Any:
        """One request, one StepResponse; StepFailed on an error."""
        try:
            return self._stub.Step(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise StepFailed.from_rpc(error) from None

    def close(self) -> None:
        """Nothing to close."""


class StreamTransport:
    """Sends StepRequests one at a time on a StepStream (a worker's stream),
    waiting for each reply."""

    name = "StepStream"

    def __init__(self, stub: Any, timeout: float) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call = stub.StepStream(iter(self._requests.get, None),
                                     timeout=timeout)
        self._replies: Iterator[Any] = iter(self._call)

    def step(self, request: Any) -> Any:
        """One request, one StepResponse; StepFailed on an error reply or a
        broken stream."""
        self._requests.put(request)
        try:
            reply = next(self._replies)
        except grpc.RpcError as error:
            raise StepFailed.from_rpc(error) from None
        except StopIteration:
            raise StepFailed(grpc.StatusCode.UNAVAILABLE,
                             "StepStream ended") from None
        if reply.error_code:
            raise StepFailed(_CODES.get(reply.error_code,
                                        grpc.StatusCode.UNKNOWN),
                             reply.error_message)
        if reply.response.request_id != request.request_id:
            raise StepFailed(grpc.StatusCode.INTERNAL,
                             "StepStream reply to request %d answered %d"
                             % (request.request_id,
                                reply.response.request_id))
        return reply.response

    def close(self) -> None:
        """Ends the request stream and the call."""
        self._requests.put(None)
        self._call.cancel()


@dataclasses.dataclass
class Context:
    """What every driver of one phase (a load run or a check) shares."""

    pb: Any
    rpc: Any
    seed: int
    journal: Journal
    report: Report
    phase: str                 # "load" or "check"
    cycle: int
    specs: list[SessionSpec]
    created: set[str]          # sessions whose creation was acknowledged
    full_verify: bool = False  # FETCH replies compared whole, not sampled
    async_lag_s: float = 1.0   # ASYNC durable_position may lag this long
    chains: dict[int, Chain] = dataclasses.field(default_factory=dict)
    killing: threading.Event = dataclasses.field(
        default_factory=threading.Event)
    _request_ids: Iterator[int] = dataclasses.field(
        default_factory=lambda: iter(range(1, 1 << 62)))
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for spec in self.specs:
            self.chains[spec.index] = Chain(self.pb, self.seed, spec.index)

    def request_id(self) -> int:
        """A fresh request id."""
        with self._lock:
            return next(self._request_ids)

    def new_session_request(self, spec: SessionSpec) -> Any:
        """The CreateSessionRequest of a crash-test session."""
        pb = self.pb
        return pb.CreateSessionRequest(
            session_id=spec.session_id,
            shape=pb.ModelShape(
                layers=LAYERS, kv_heads=KV_HEADS, query_heads=QUERY_HEADS,
                head_dim=HEAD_DIM,
                dtype=pb.DTYPE_BF16 if spec.bf16 else pb.DTYPE_FP32),
            policy=pb.CachePolicy(
                sinks=SINKS, cascades=CASCADES, window=WINDOW,
                page_tokens=PAGE_TOKENS, step_budget_tokens=STEP_BUDGET,
                recall=True, dense_layers_set=True),
            durability=(pb.DURABILITY_STEP_SYNC if spec.sync
                        else pb.DURABILITY_ASYNC),
            labels={"test": "crash"})

    def entry(self, spec: SessionSpec, layer: int, position: int,
              tokens: int, mode: int) -> Any:
        """The StepEntry of a planned step: identical bytes every time."""
        positions = np.arange(position, position + tokens)

        def tensor(kind: int, heads: int) -> bytes:
            return encode(tensor_values(self.seed, spec.index, layer, kind,
                                        positions, heads), spec.bf16)

        q = b"" if mode == self.pb.STEP_MODE_APPEND else tensor(
            KIND_Q, QUERY_HEADS)
        return self.pb.StepEntry(
            session_id=spec.session_id, position=position, num_tokens=tokens,
            q=q, k=tensor(KIND_K, KV_HEADS), v=tensor(KIND_V, KV_HEADS))


def mode_name(pb: Any, mode: int) -> str:
    """FETCH, ATTEND or APPEND."""
    return pb.StepMode.Name(mode).replace("STEP_MODE_", "")


def open_session(ctx: Context, stub: Any, spec: SessionSpec) -> Any:
    """GetSession, or CreateSession when it does not exist yet (a session
    that was acknowledged as created and is gone is a violation, and is
    created again so that the run goes on)."""
    try:
        return stub.GetSession(ctx.pb.GetSessionRequest(
            session_id=spec.session_id), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise StepFailed.from_rpc(error) from None
    if spec.session_id in ctx.created:
        ctx.report.violation(
            "session-lost", spec.label,
            "cycle %d %s: GetSession(%s) is NOT_FOUND after its creation was "
            "acknowledged" % (ctx.cycle, ctx.phase, spec.session_id))
    return create_session(ctx, stub, spec)


def create_session(ctx: Context, stub: Any, spec: SessionSpec) -> Any:
    """CreateSession, journaled once acknowledged."""
    try:
        session = stub.CreateSession(ctx.new_session_request(spec),
                                     timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as error:
        raise StepFailed.from_rpc(error) from None
    ctx.journal.append({"e": "created", "c": ctx.cycle, "s": spec.session_id})
    ctx.created.add(spec.session_id)
    return session


# ---------------------------------------------------------------------------
# One session's steps
# ---------------------------------------------------------------------------

class SessionDriver:
    """Steps one session along its plan and checks every reply. Only one
    driver steps a session at a time, so its view of the layers' positions
    is exact."""

    def __init__(self, ctx: Context, spec: SessionSpec, session: Any) -> None:
        self.ctx = ctx
        self.spec = spec
        self.next = [int(x) for x in session.layer_next_positions]
        if len(self.next) != LAYERS:
            raise StepFailed(grpc.StatusCode.INTERNAL,
                             "%s: layer_next_positions has %d entries, want %d"
                             % (spec.session_id, len(self.next), LAYERS))
        self.start_next = list(self.next)
        self.durable = int(session.durable_position)
        self.start_durable = self.durable
        self.max_sent = list(self.next)
        self.steps = 0
        # (time, tokens stored in every layer) after each reply, for the
        # ASYNC lag bound.
        self._history: collections.deque[tuple[float, int]] = (
            collections.deque([(time.monotonic(), min(self.next))]))

    @property
    def position(self) -> int:
        """Tokens stored in every layer."""
        return min(self.next)

    def planned(self, position: int) -> tuple[int, int]:
        """(T, mode) of the planned step at `position`."""
        return planned_step(self.ctx.pb, self.ctx.seed, self.spec.index,
                            position)

    def entry(self, layer: int, tokens: int, mode: int) -> Any:
        """The entry of this layer's next step (noting what is sent)."""
        position = self.next[layer]
        self.max_sent[layer] = max(self.max_sent[layer], position + tokens)
        return self.ctx.entry(self.spec, layer, position, tokens, mode)

    def apply(self, layer: int, entry: Any, mode: int, result: Any) -> None:
        """Checks one StepResult of `entry`; journals the acknowledgement."""
        ctx, spec = self.ctx, self.spec
        position, tokens = entry.position, entry.num_tokens
        where = "cycle %d %s layer %d step [%d, %d) %s" % (
            ctx.cycle, ctx.phase, layer, position, position + tokens,
            mode_name(ctx.pb, mode))
        if result.session_id != spec.session_id:
            ctx.report.violation("reply-mismatch", spec.label,
                                 "%s: result for %r" % (where,
                                                        result.session_id))
        if result.next_position != position + tokens:
            ctx.report.violation(
                "next-position", spec.label, "%s: next_position %d, want %d"
                % (where, result.next_position, position + tokens))
        self.next[layer] = position + tokens
        self.steps += 1
        durable = int(result.durable_position)
        if durable < self.durable:
            ctx.report.violation(
                "durable-regressed", spec.label,
                "%s: durable_position %d after an earlier reply said %d"
                % (where, durable, self.durable))
        stored = self.position
        if durable > max(stored, self.durable):
            ctx.report.violation(
                "durable-ahead", spec.label,
                "%s: durable_position %d but only %d tokens are stored in "
                "every layer" % (where, durable, stored))
        now = time.monotonic()
        if spec.sync:
            if durable < stored:
                ctx.report.violation(
                    "sync-not-durable", spec.label,
                    "%s: STEP_SYNC reply says durable_position %d, want >= %d "
                    "(every layer acknowledged up to %d)"
                    % (where, durable, stored, stored))
        else:
            floor = None
            horizon = now - ctx.async_lag_s
            while self._history and self._history[0][0] <= horizon:
                floor = self._history.popleft()
            if floor is not None:
                self._history.appendleft(floor)
                if durable < floor[1]:
                    ctx.report.violation(
                        "async-lag", spec.label,
                        "%s: ASYNC durable_position %d, but %d tokens were "
                        "stored in every layer %.2f s earlier (bound %.1f s)"
                        % (where, durable, floor[1], now - floor[0],
                           ctx.async_lag_s))
            self._history.append((now, stored))
        self.durable = max(self.durable, durable)
        ctx.journal.append({"e": "ack", "c": ctx.cycle, "ph": ctx.phase,
                            "s": spec.session_id, "l": layer, "p": position,
                            "t": tokens, "n": position + tokens,
                            "d": durable})
        if mode == ctx.pb.STEP_MODE_FETCH:
            verify_fetch(ctx, spec, layer, position, tokens, result, where,
                         ctx.full_verify)

    def flush_sent(self) -> None:
        """Journals the highest end position sent per layer."""
        for layer, end in enumerate(self.max_sent):
            self.ctx.journal.append({"e": "sent", "c": self.ctx.cycle,
                                     "s": self.spec.session_id, "l": layer,
                                     "end": end})


def verify_fetch(ctx: Context, spec: SessionSpec, layer: int, position: int,
                 tokens: int, result: Any, where: str, full: bool) -> bool:
    """Checks a FETCH result of a session whose budget covers every token:
    per KV head, positions 0..position+T-1 in order, and keys and values
    equal to the generator's bytes (all of them, or a sample of 40 tokens).
    Returns whether it matched."""
    end = position + tokens
    if len(result.heads) != KV_HEADS:
        ctx.report.violation("fetch-heads", spec.label, "%s: %d heads, want %d"
                             % (where, len(result.heads), KV_HEADS))
        return False
    row = HEAD_DIM * spec.elem_bytes
    ok = True
    if full:
        sample = np.arange(end)
    else:
        rng = np.random.default_rng(hash64(ctx.seed, spec.index, layer, end))
        sample = np.unique(np.concatenate([
            np.arange(min(4, end)), np.arange(max(0, end - 4), end),
            rng.integers(0, end, size=32)]))
    for kind, name in ((KIND_K, "k"), (KIND_V, "v")):
        want_all = tensor_values(ctx.seed, spec.index, layer, kind, sample,
                                 KV_HEADS)
        for h, head in enumerate(result.heads):
            if kind == KIND_K:
                got_pos = np.array(head.positions, dtype=np.int64)
                if got_pos.shape != (end,) or not np.array_equal(
                        got_pos, np.arange(end)):
                    ctx.report.violation(
                        "fetch-positions", spec.label,
                        "%s KV head %d: %s" % (where, h,
                                               describe_positions(got_pos,
                                                                  end)))
                    ok = False
                    continue
            data = getattr(head, name)
            if len(data) != end * row:
                ctx.report.violation(
                    "fetch-bytes", spec.label,
                    "%s KV head %d: %s is %d bytes, want %d (%d tokens)"
                    % (where, h, name, len(data), end * row, end))
                ok = False
                continue
            got = np.frombuffer(data, dtype=np.uint8).reshape(end, row)[sample]
            want = np.frombuffer(encode(want_all[:, h, :], spec.bf16),
                                 dtype=np.uint8).reshape(len(sample), row)
            bad = np.nonzero((got != want).any(axis=1))[0]
            if len(bad):
                ctx.report.violation(
                    "data-mismatch", spec.label,
                    "%s KV head %d: %s of %d of %d checked tokens differ from "
                    "what was sent, first at positions %s"
                    % (where, h, name, len(bad), len(sample),
                       [int(sample[i]) for i in bad[:8]]))
                ok = False
    ctx.report.count("fetch_tokens_verified", len(sample) * KV_HEADS)
    return ok


def describe_positions(got: np.ndarray, end: int) -> str:
    """What is wrong with a FETCH's positions, given it should be 0..end-1."""
    got_set = set(int(x) for x in got)
    missing = sorted(set(range(end)) - got_set)
    extra = sorted(got_set - set(range(end)))
    duplicates = len(got) - len(got_set)
    unordered = bool(len(got) > 1 and (np.diff(got) <= 0).any())
    return ("%d positions, want 0..%d (%d): missing %d %s, unexpected %d %s, "
            "%d duplicates%s" % (len(got), end - 1, end, len(missing),
                                 missing[:8], len(extra), extra[:8],
                                 duplicates,
                                 ", not ascending" if unordered else ""))


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------

def step_group(ctx: Context, transport: Any, drivers: Sequence[SessionDriver],
               layer: int, mode: int, tokens: Sequence[int],
               retry_ok: bool = True) -> None:
    """Sends one request with one entry per driver (all in `mode`, each at
    its layer's next position with its T), applies the results, and sends
    the identical request again where the plan says to, expecting the same
    answer without a second application."""
    entries = [d.entry(layer, t, mode) for d, t in zip(drivers, tokens)]
    request = ctx.pb.StepRequest(layer=layer, mode=mode, entries=entries,
                                 request_id=ctx.request_id())
    response = transport.step(request)
    if len(response.results) != len(entries):
        raise StepFailed(grpc.StatusCode.INTERNAL,
                         "%d results for %d entries" % (len(response.results),
                                                        len(entries)))
    for driver, entry, result in zip(drivers, entries, response.results):
        driver.apply(layer, entry, mode, result)
    if retry_ok and any(retry_planned(ctx.seed, d.spec.index, layer,
                                      e.position)
                        for d, e in zip(drivers, entries)):
        retry(ctx, transport, drivers, request, response)


def _without_durable(result: Any) -> bytes:
    copy = type(result)()
    copy.CopyFrom(result)
    copy.durable_position = 0
    return copy.SerializeToString(deterministic=True)


def retry(ctx: Context, transport: Any, drivers: Sequence[SessionDriver],
          request: Any, response: Any) -> None:
    """Sends `request` again (a fresh request id, identical entries): every
    entry must be answered again with the same result (durable_position
    may have advanced), not applied a second time."""
    again = ctx.pb.StepRequest()
    again.CopyFrom(request)
    again.request_id = ctx.request_id()
    label = ",".join(d.spec.label for d in drivers)
    where = "cycle %d %s layer %d %s retry of %s" % (
        ctx.cycle, ctx.phase, request.layer, mode_name(ctx.pb, request.mode),
        ", ".join("[%d, %d)" % (e.position, e.position + e.num_tokens)
                  for e in request.entries))
    try:
        reply = transport.step(again)
    except StepFailed as failure:
        if (failure.code == grpc.StatusCode.FAILED_PRECONDITION
                and request.mode == ctx.pb.STEP_MODE_FETCH
                and "too large to keep" in failure.details):
            ctx.report.count("retries_refused_too_large")
            return
        if failure.code == grpc.StatusCode.UNAVAILABLE or ctx.killing.is_set():
            raise
        ctx.report.violation("retry", label, "%s: %s" % (where, failure))
        return
    ctx.report.count("retries_answered")
    for driver, entry, first, second in zip(drivers, request.entries,
                                            response.results, reply.results):
        if second.next_position != entry.position + entry.num_tokens:
            ctx.report.violation(
                "retry-applied-twice", driver.spec.label,
                "%s: next_position %d, want %d" % (
                    where, second.next_position,
                    entry.position + entry.num_tokens))
        elif _without_durable(first) != _without_durable(second):
            ctx.report.violation(
                "retry-differs", driver.spec.label,
                "%s: the answer to the repeat differs from the first answer"
                % where)
        if second.durable_position < first.durable_position:
            ctx.report.violation(
                "durable-regressed", driver.spec.label,
                "%s: durable_position %d after the first answer said %d"
                % (where, second.durable_position, first.durable_position))


def level_layers(ctx: Context, transport: Any, driver: SessionDriver) -> None:
    """Brings every layer to the furthest layer's position along the plan
    (after a restart, layers may resume at different positions)."""
    target = max(driver.next)
    for layer in range(LAYERS):
        while driver.next[layer] < target:
            tokens, mode = driver.planned(driver.next[layer])
            tokens = min(tokens, target - driver.next[layer])
            step_group(ctx, transport, [driver], layer, mode, [tokens])


def step_token(ctx: Context, transport: Any,
               drivers: Sequence[SessionDriver]) -> None:
    """One planned step (every layer, in order) of each driver: one request
    per layer and mode (a request has one mode)."""
    plans = [d.planned(d.position) for d in drivers]
    for layer in range(LAYERS):
        by_mode: dict[int, list[int]] = {}
        for i, (_, mode) in enumerate(plans):
            by_mode.setdefault(mode, []).append(i)
        for mode, members in sorted(by_mode.items()):
            step_group(ctx, transport, [drivers[i] for i in members], layer,
                       mode, [plans[i][0] for i in members])


def checkpoint(ctx: Context, stub: Any, driver: SessionDriver) -> bool:
    """Calls Checkpoint for the driver's session: the durable_position it
    returns is an acknowledgement (journaled) and must cover every token
    stored before the call. False when the server does not implement it."""
    spec = driver.spec
    try:
        reply = stub.Checkpoint(ctx.pb.CheckpointRequest(
            session_id=spec.session_id), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            ctx.report.note("checkpoint", spec.label,
                            "Checkpoint is UNIMPLEMENTED")
            return False
        raise StepFailed.from_rpc(error) from None
    ctx.report.count("checkpoints")
    found = [d for d in reply.sessions if d.session_id == spec.session_id]
    where = "cycle %d %s Checkpoint at position %d" % (ctx.cycle, ctx.phase,
                                                       driver.position)
    if len(found) != 1:
        ctx.report.violation("checkpoint", spec.label, "%s: %d entries for "
                             "the session" % (where, len(found)))
        return True
    durable = int(found[0].durable_position)
    ctx.journal.append({"e": "ckpt", "c": ctx.cycle, "ph": ctx.phase,
                        "s": spec.session_id, "d": durable})
    if durable < driver.position or durable < driver.durable:
        ctx.report.violation(
            "checkpoint", spec.label, "%s: durable_position %d, want >= %d "
            "(stored in every layer) and >= %d (acknowledged before)"
            % (where, durable, driver.position, driver.durable))
    driver.durable = max(driver.durable, durable)
    return True


class Worker(threading.Thread):
    """One inference worker: owns some sessions and steps them until told to
    stop or the server goes away."""

    def __init__(self, ctx: Context, address: str,
                 specs: Sequence[SessionSpec], stream: bool,
                 stop: threading.Event) -> None:
        super().__init__(name="worker-" + "-".join(
            str(s.index) for s in specs), daemon=True)
        self.ctx = ctx
        self.address = address
        self.specs = list(specs)
        self.stream = stream
        self.stop = stop
        self.drivers: list[SessionDriver] = []
        self.cut_by_kill = False
        self.error: Optional[str] = None

    def run(self) -> None:
        ctx = self.ctx
        channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        stub = ctx.rpc.KvMemoryStub(channel)
        transport: Any = None
        try:
            transport = (StreamTransport(stub, 3600.0) if self.stream
                         else UnaryTransport(stub, RPC_TIMEOUT_S))
            for spec in self.specs:
                self.drivers.append(SessionDriver(
                    ctx, spec, open_session(ctx, stub, spec)))
            for driver in self.drivers:
                level_layers(ctx, transport, driver)
            checkpoints = True
            while not self.stop.is_set():
                step_token(ctx, transport, self.drivers)
                for driver in self.drivers:
                    if checkpoints and checkpoint_planned(
                            ctx.seed, driver.spec.index, driver.position):
                        checkpoints = checkpoint(ctx, stub, driver)
        except StepFailed as failure:
            if ctx.killing.is_set():
                self.cut_by_kill = True
            else:
                category = ("data-loss"
                            if failure.code == grpc.StatusCode.DATA_LOSS
                            else "unexpected-status")
                label = ",".join(s.label for s in self.specs)
                self.error = str(failure)
                ctx.report.violation(category, label, "cycle %d %s: %s"
                                     % (ctx.cycle, ctx.phase, failure))
        except Exception:  # pylint: disable=broad-except
            # A bug of the harness: fail the run loudly, never silently.
            self.error = traceback.format_exc()
            ctx.report.violation("harness-error", self.name, self.error)
        finally:
            if transport is not None:
                transport.close()
            channel.close()
            for driver in self.drivers:
                driver.flush_sent()


def worker_layout(specs: Sequence[SessionSpec]
                  ) -> list[tuple[list[SessionSpec], bool]]:
    """Which sessions each worker owns, and whether it uses StepStream: the
    last two sessions share one streaming worker (batched requests, both
    durabilities in one request), every other session has its own worker on
    the unary Step."""
    if len(specs) < 3:
        return [([s], False) for s in specs]
    return [([s], False) for s in specs[:-2]] + [(list(specs[-2:]), True)]


class LoadGenerator:
    """The workers of one load phase."""

    def __init__(self, ctx: Context, address: str) -> None:
        self.ctx = ctx
        self.stop = threading.Event()
        self.workers = [Worker(ctx, address, specs, stream, self.stop)
                        for specs, stream in worker_layout(ctx.specs)]
        self.started = 0.0

    def start(self) -> None:
        """Starts every worker."""
        self.started = time.monotonic()
        for worker in self.workers:
            worker.start()

    def join(self, timeout: float) -> bool:
        """Waits for the workers; False if one is still running."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in self.workers)

    def drivers(self) -> list[SessionDriver]:
        """Every session driver (those that opened their session)."""
        return [d for w in self.workers for d in w.drivers]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the load generator against a server for some seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None,
                        help="data seed (default: the journal's, else 1)")
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--build", default=default_build())
    args = parser.parse_args(argv)
    pb, rpc = load_stubs(args.build)
    records = Journal.read(args.journal)
    seed = next((r["seed"] for r in records if r["e"] == "config"), None)
    journal = Journal(args.journal)
    if seed is None:
        seed = 1 if args.seed is None else args.seed
        journal.append({"e": "config", "seed": seed,
                        "sessions": args.sessions})
    print("data seed %d" % seed)
    report = Report()
    ctx = Context(pb, rpc, seed, journal, report, "load", 0,
                  session_specs(args.sessions),
                  {r["s"] for r in records if r["e"] == "created"})
    load = LoadGenerator(ctx, args.address)
    load.start()
    load.stop.wait(args.seconds)
    load.stop.set()
    load.join(120)
    for d in load.drivers():
        print("%s: %d steps, position %d -> %d, durable %d"
              % (d.spec.label, d.steps, min(d.start_next), d.position,
                 d.durable))
    print("\n".join(report.lines(report.violations)) or "no violations")
    journal.close()
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
