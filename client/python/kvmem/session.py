"""A session handle: what the server said about a session, plus the
per-layer positions this client will step at next."""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Type

import numpy.typing as npt

from kvmem._proto import pb
from kvmem.config import (DURABILITIES, CachePolicy, ModelShape, enum_name,
                          policy_from_proto, shape_from_proto)
from kvmem.errors import NotFoundError
from kvmem.step import PlannedEntry, StepEntry, StepResult

if TYPE_CHECKING:
    from kvmem.client import Client


class Session:
    """One session of the server, as of the last reply that described it.

    Attributes (from the server, refreshed by :meth:`refresh`):
        id, tenant: the session id and its tenant.
        shape: :class:`ModelShape`; policy: :class:`CachePolicy` with every
            default filled in; durability: "async" or "step_sync";
            labels: dict.
        resident_tokens, spilled_pages, spilled_bytes: summed over the
            session's streams.
        create_time_unix_micros, last_used_unix_micros.
    Attributes the client also advances after each successful step:
        layer_next_positions: list, per layer, of the next position that
            layer accepts; a step with position=None uses it.
        position: tokens stored in every layer (the minimum of the above).
        durable_position: tokens durable in every layer.

    Use as a context manager to delete the session on exit (unless
    `delete_on_exit` is False). Not thread-safe: step one session from one
    thread at a time. Made by Client (create_session, get_session,
    list_sessions), not directly.
    """

    def __init__(self, client: "Client", message: "pb.Session",
                 delete_on_exit: bool = True) -> None:
        self._client = client
        self.delete_on_exit = delete_on_exit
        self._update(message)

    def _update(self, message: "pb.Session") -> None:
        self.id: str = message.session_id
        self.tenant: str = message.tenant
        self.shape: ModelShape = shape_from_proto(message.shape)
        self.policy: CachePolicy = policy_from_proto(message.policy)
        self.durability: str = enum_name(DURABILITIES, message.durability)
        self.labels: Dict[str, str] = dict(message.labels)
        self.position: int = message.position
        self.layer_next_positions: List[int] = list(
            message.layer_next_positions)
        self.durable_position: int = message.durable_position
        self.resident_tokens: int = message.resident_tokens
        # [sinks, cascade 0, cascade 1, ...], summed over streams.
        self.resident_tokens_per_cascade: List[int] = list(
            message.resident_tokens_per_cascade)
        self.spilled_pages: int = message.spilled_pages
        self.spilled_bytes: int = message.spilled_bytes
        self.create_time_unix_micros: int = message.create_time_unix_micros
        self.last_used_unix_micros: int = message.last_used_unix_micros

    def __repr__(self) -> str:
        return (f"Session(id={self.id!r}, tenant={self.tenant!r}, "
                f"position={self.position}, shape={self.shape})")

    def refresh(self) -> "Session":
        """Reloads everything from the server, including the positions (use
        it after a FAILED_PRECONDITION or a broken stream). Returns self.
        Raises NotFoundError if the session is gone."""
        self._update(self._client._get_session_message(self.id))
        return self

    def delete(self) -> None:
        """Deletes the session and all its data. NotFoundError if it is
        already gone."""
        self._client.delete_session(self.id)

    def step(self, layer: int, q: Optional[npt.ArrayLike],
             k: npt.ArrayLike, v: npt.ArrayLike, mode: str = "attend",
             position: Optional[int] = None,
             timeout: Optional[float] = None) -> StepResult:
        """Steps this session alone for one layer (unary Step).

        Args:
            layer: 0..L-1.
            q: [T, Hq, D] or [Hq, D]; None allowed in "append" mode.
            k, v: [T, H, D] or [H, D]. Dtypes: bf16 sessions take uint16
                (bf16 bits), fp16 float16, fp32 float32.
            mode: "attend", "fetch" or "append".
            position: of the first token; None = layer_next_positions[layer].
            timeout: seconds; None = the client's.

        Returns:
            StepResult: output [T, Hq, D] and lse [T, Hq] (attend), heads
            (fetch), next_position and durable_position (always).

        Raises:
            ValueError before sending anything (dtype, shape, layer, mode).
            KvmemError subclasses for the server's errors; the session is
            then unchanged.
        """
        return self._client._step([StepEntry(self, q, k, v, position)],
                                   layer, mode, timeout,
                                   name_entries=False)[0]

    def _advance(self, layer: int, next_position: int,
                 durable_position: Optional[int] = None) -> None:
        self.layer_next_positions[layer] = next_position
        self.position = min(self.layer_next_positions)
        if durable_position is not None:
            self.durable_position = durable_position

    def _rewind(self, layer: int, position: int) -> None:
        """Undoes an optimistic advance: a request sent at `position` was
        rejected, so the layer is back at `position` at most."""
        if position < self.layer_next_positions[layer]:
            self._advance(layer, position)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if self.delete_on_exit:
            try:
                self.delete()
            except NotFoundError:
                pass  # deleted already: the goal of the exit is met


def apply_results(layer: int, planned: Sequence[PlannedEntry],
                  results: Sequence[StepResult]) -> None:
    """Advances each session's tracked position to what the server
    reported."""
    for sent, result in zip(planned, results):
        sent.session._advance(layer, result.next_position,
                              result.durable_position)
