"""StepStream: one bidirectional stream of a worker's decode loop."""
from __future__ import annotations

import collections
import queue
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Deque, Iterator, List, Optional, Sequence, Type

import grpc

from kvmem.errors import (KvmemError, ProtocolError, error_from_rpc,
                          error_from_status_number)
from kvmem.session import apply_results
from kvmem.step import (PlannedEntry, StepEntry, StepResult, build_request,
                        decode_results)

_END = object()  # ends the request iterator: half-closes the stream


@dataclass
class _Pending:
    request_id: int
    layer: int
    mode: str
    planned: List[PlannedEntry]


class StepStream:
    """One StepStream call: requests go out in order, replies come back in
    the same order, and an error answers its own request only.

    ``send`` may run ahead of ``receive`` (pipelining): positions of
    entries sent with position=None advance when they are sent, and go
    back when their request is rejected.

    Use as a context manager: a normal exit closes the stream (half-close,
    then waits for the replies still due); an exception cancels it.

    Not thread-safe: one thread sends and receives.
    """

    def __init__(self, stub: Any, metadata: Sequence[tuple],
                 timeout: Optional[float]) -> None:
        self._requests: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._responses: Iterator[Any] = stub.StepStream(
            iter(self._requests.get, _END), metadata=metadata,
            timeout=timeout)
        self._pending: Deque[_Pending] = collections.deque()
        self._next_request_id = 1
        self._closed = False
        self._broken: Optional[KvmemError] = None

    @property
    def pending(self) -> int:
        """Requests sent whose reply has not been received yet."""
        return len(self._pending)

    def send(self, layer: int, mode: str, entries: Sequence[StepEntry]) -> int:
        """Sends one step request of `entries` (one per session) for
        `layer` in `mode` ("attend", "fetch" or "append"). Returns its
        request id. ValueError before sending for invalid input (see
        :func:`kvmem.step.build_request`); the stream's own error if it
        broke."""
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise ValueError("send on a closed StepStream")
        request, planned = build_request(layer, mode, entries)
        request.request_id = self._next_request_id
        self._next_request_id += 1
        for sent in planned:
            sent.session._advance(layer, sent.position + sent.num_tokens)
        self._pending.append(_Pending(request.request_id, layer, mode,
                                      planned))
        self._requests.put(request)
        return request.request_id

    def receive(self) -> List[StepResult]:
        """Waits for the reply to the oldest request not yet received.

        Returns:
            one StepResult per entry, in the request's order.

        Raises:
            KvmemError subclass: the server rejected this request (nothing
                of it was applied; its sessions' positions go back); the
                stream goes on. If the stream itself failed, every later
                call raises the same error; call Session.refresh() to learn
                where the server stands.
            ValueError: nothing is pending.
        """
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            raise ValueError("receive with no request pending")
        pending = self._pending.popleft()
        try:
            reply = next(self._responses)
        except StopIteration:
            raise self._fail(ProtocolError(
                "the server ended the stream with requests unanswered"),
                pending) from None
        except grpc.RpcError as error:
            raise self._fail(error_from_rpc(error), pending) from error
        request_id = reply.request_id or reply.response.request_id
        if request_id != pending.request_id:
            raise self._fail(ProtocolError(
                f"reply for request {request_id}, want "
                f"{pending.request_id}"), pending)
        if reply.error_code:
            self._rewind(pending)
            raise error_from_status_number(reply.error_code,
                                           reply.error_message)
        try:
            results = decode_results(reply.response, pending.mode,
                                     pending.planned)
        except ProtocolError as error:
            raise self._fail(error, pending) from None
        apply_results(pending.layer, pending.planned, results)
        return results

    def step(self, layer: int, mode: str,
             entries: Sequence[StepEntry]) -> List[StepResult]:
        """send() then receive(); requires nothing else pending."""
        if self._pending:
            raise ValueError(f"step with {len(self._pending)} replies still "
                             f"to receive; receive them first")
        self.send(layer, mode, entries)
        return self.receive()

    def close(self) -> None:
        """Half-closes the stream and waits for the replies still due
        (their results are dropped, but tracked positions follow them), then
        for the server to end the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        while self._pending and self._broken is None:
            try:
                self.receive()
            except KvmemError:
                pass  # that request's rejection: nothing to undo any more
        if self._broken is None:
            try:
                for _ in self._responses:
                    raise ProtocolError("reply to no request")
            except grpc.RpcError as error:
                raise error_from_rpc(error) from error

    def cancel(self) -> None:
        """Cancels the stream at once. Requests without a reply may or may
        not have been applied (each wholly or not at all): refresh their
        sessions before stepping them again."""
        if not self._closed:
            self._closed = True
            self._requests.put(_END)  # frees gRPC's request-reading thread
        if self._broken is None:
            self._responses.cancel()  # type: ignore[attr-defined]
            self._broken = KvmemError(grpc.StatusCode.CANCELLED,
                                      "the StepStream was cancelled")
            for pending in self._pending:
                self._rewind(pending)
            self._pending.clear()

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    @staticmethod
    def _rewind(pending: _Pending) -> None:
        for sent in pending.planned:
            sent.session._rewind(pending.layer, sent.position)

    def _fail(self, error: KvmemError, pending: _Pending) -> KvmemError:
        """Marks the stream failed by `error` (which the caller raises),
        rewinding what had no reply."""
        self._broken = error
        for unanswered in [pending, *self._pending]:
            self._rewind(unanswered)
        self._pending.clear()
        if not self._closed:
            self._closed = True
            self._requests.put(_END)
        return error
