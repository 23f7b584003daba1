"""kvmem.Client: one channel to a kvmem server, for one tenant."""
from __future__ import annotations

from dataclasses import dataclass, fields
from types import TracebackType
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Type, TypeVar)

import grpc

from kvmem._proto import pb, rpc
from kvmem.config import (DURABILITIES, CachePolicy, ModelShape, enum_number,
                          policy_to_proto, shape_to_proto)
from kvmem.errors import error_from_rpc
from kvmem.session import Session, apply_results
from kvmem.step import StepEntry, StepResult, build_request, decode_results
from kvmem.stream import StepStream

_Reply = TypeVar("_Reply")

# Message sizes are the server's to limit (--max_message_bytes): it answers
# RESOURCE_EXHAUSTED naming the limit. The client takes any size.
_DEFAULT_CHANNEL_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


@dataclass(frozen=True)
class ServerStats:
    """Server-wide figures (kvmem.v1.GetStatsResponse); bytes in bytes."""

    version: str
    backend: str  # "cpu" or "cuda"
    device: str
    uptime_seconds: int
    sessions: int  # all tenants
    steps: int
    tokens_appended: int
    resident_bytes: int
    spilled_bytes: int
    spill_queue_bytes: int
    device_pool_bytes: int
    device_pool_used_bytes: int
    hibernations: int  # idle sessions checkpointed and dropped for room
    device_fallbacks: int  # decode steps the CPU took for a full pool
    device_policy_steps: int  # steps whose policy ran on the device
    device_side_bytes: int  # device memory beside the pool (state, staging)
    device_attend_steps: int  # decode steps attended there, policy on host
    # Seconds Step requests spent per phase since start ("lock", "plan",
    # "recall", "device_rows", "device", "apply", "device_write", "write",
    # "device_wait", "device_spill", "sessions"; around the engine "queue"
    # and "convert").
    step_phase_seconds: Dict[str, float]


class Client:
    """A channel to one kvmem server, acting for one tenant.

    Args:
        address: "host:port".
        tenant: sent as the `kvmem-tenant` metadata on every call;
            None = the server's `default` tenant.
        timeout: seconds allowed for each unary call (DEADLINE_EXCEEDED
            past it); None = no deadline. Streams take their own.
        channel_options: extra grpc channel options.

    Every method raises a :class:`kvmem.KvmemError` subclass carrying the
    gRPC code and the server's message when the server rejects the call;
    a rejected call changes nothing. Use as a context manager to close the
    channel. Thread-safe (grpc channels are); Session and StepStream
    objects are not.
    """

    def __init__(self, address: str, tenant: Optional[str] = None,
                 timeout: Optional[float] = 60.0,
                 channel_options: Sequence[Tuple[str, Any]] = ()) -> None:
        self.address = address
        self.tenant = tenant
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address, options=[*_DEFAULT_CHANNEL_OPTIONS, *channel_options])
        self._stub = rpc.KvMemoryStub(self._channel)
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("kvmem-tenant", tenant),) if tenant is not None else ())

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.close()

    def _call(self, method: Callable[..., _Reply], request: Any,
              timeout: Optional[float] = None) -> _Reply:
        try:
            return method(request, metadata=self._metadata,
                          timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    # -- sessions ----------------------------------------------------------

    def create_session(self, shape: ModelShape,
                       policy: Optional[CachePolicy] = None,
                       durability: Optional[str] = None,
                       session_id: Optional[str] = None,
                       labels: Optional[Mapping[str, str]] = None,
                       delete_on_exit: bool = True) -> Session:
        """Creates a session.

        Args:
            shape: the model shape (dtype "bf16", "fp16" or "fp32").
            policy: None = every default.
            durability: "async" or "step_sync"; None = "async".
            session_id: None lets the server choose one.
            labels: at most 64; keys of [a-z0-9._-].
            delete_on_exit: whether `with session:` deletes it on exit.

        Returns:
            the Session with every policy default filled in.

        Raises:
            ValueError: an unknown dtype or enumeration name (not sent).
            InvalidArgumentError naming the field (e.g. `shape.head_dim must
            be one of 64, 128, 256, got 96`); AlreadyExistsError.
        """
        request = pb.CreateSessionRequest(
            session_id=session_id or "",
            shape=shape_to_proto(shape),
            policy=policy_to_proto(policy or CachePolicy()),
            labels=dict(labels or {}))
        if durability is not None:
            request.durability = enum_number("durability", DURABILITIES,
                                             durability)
        message = self._call(self._stub.CreateSession, request)
        return Session(self, message, delete_on_exit)

    def _get_session_message(self, session_id: str) -> "pb.Session":
        return self._call(self._stub.GetSession,
                          pb.GetSessionRequest(session_id=session_id))

    def get_session(self, session_id: str) -> Session:
        """Describes a session. NotFoundError if this tenant has none of
        that id; InvalidArgumentError for a malformed id."""
        return Session(self, self._get_session_message(session_id))

    def list_sessions(self, label_filter: Optional[Mapping[str, str]] = None,
                      page_size: int = 0) -> Iterator[Session]:
        """Yields this tenant's sessions in id order, fetching page after
        page (`page_size` per call; 0 = the server's 100) until the last.

        Args:
            label_filter: only sessions having every label given, with the
                same value.
        """
        token = ""
        while True:
            page = self._call(self._stub.ListSessions, pb.ListSessionsRequest(
                page_size=page_size, page_token=token,
                label_filter=dict(label_filter or {})))
            for message in page.sessions:
                yield Session(self, message)
            token = page.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> None:
        """Removes a session with all its data. NotFoundError if absent."""
        self._call(self._stub.DeleteSession,
                   pb.DeleteSessionRequest(session_id=session_id))

    def stats(self) -> ServerStats:
        """Server-wide figures."""
        reply = self._call(self._stub.GetStats, pb.GetStatsRequest())
        values = {f.name: getattr(reply, f.name) for f in fields(ServerStats)}
        values["step_phase_seconds"] = dict(reply.step_phase_seconds)
        return ServerStats(**values)

    def checkpoint(self, session_id: Optional[str] = None) -> Dict[str, int]:
        """Makes one session (None: every session of the tenant) durable
        now. Returns {session_id: durable_position}."""
        reply = self._call(self._stub.Checkpoint,
                           pb.CheckpointRequest(session_id=session_id or ""))
        return {s.session_id: s.durable_position for s in reply.sessions}

    # -- steps -------------------------------------------------------------

    def step(self, layer: int, mode: str, entries: Sequence[StepEntry],
             timeout: Optional[float] = None) -> List[StepResult]:
        """One layer of a batch of sessions, as one unary Step request.

        Args:
            layer: 0..L-1 of every entry's session.
            mode: "attend", "fetch" or "append".
            entries: at most one per session; see :class:`StepEntry` for
                shapes and dtypes.
            timeout: seconds; None = the client's.

        Returns:
            one StepResult per entry, in order; each session's tracked
            position for `layer` advances to its next_position.

        Raises:
            ValueError before sending (naming `entries[i].field`).
            KvmemError subclasses: the whole request was rejected and no
            session changed (InvalidArgumentError, NotFoundError,
            FailedPreconditionError naming the expected position,
            ResourceExhaustedError, ...).
        """
        return self._step(entries, layer, mode, timeout, name_entries=True)

    def _step(self, entries: Sequence[StepEntry], layer: int, mode: str,
              timeout: Optional[float], name_entries: bool
              ) -> List[StepResult]:
        request, planned = build_request(layer, mode, entries, name_entries)
        reply = self._call(self._stub.Step, request, timeout)
        results = decode_results(reply, mode, planned)
        apply_results(layer, planned, results)
        return results

    def step_stream(self, timeout: Optional[float] = None) -> StepStream:
        """Opens a StepStream for a worker's decode loop.

        Args:
            timeout: seconds for the whole stream; None = no deadline.
        """
        return StepStream(self._stub, self._metadata, timeout)
