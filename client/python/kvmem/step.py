"""The step: numpy tensors in, kvmem.v1 StepRequest out, and back.

Tensors (DESIGN.md § Contract), in the session's dtype convention
(:mod:`kvmem.dtypes`: bf16 = uint16 bit patterns, fp16 = float16,
fp32 = float32):
    q       [T, Hq, D]  (or [Hq, D] for one token; None in APPEND mode)
    k, v    [T, H, D]   (or [H, D])
    output  [T, Hq, D]  ATTEND
    lse     [T, Hq]     ATTEND, float32 natural logarithms
Query head h uses KV head h // (Hq // H).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

from kvmem._proto import pb
from kvmem.dtypes import wire_dtype
from kvmem.errors import ProtocolError

if TYPE_CHECKING:
    from kvmem.session import Session

STEP_MODES: Dict[str, int] = {
    "fetch": pb.STEP_MODE_FETCH,
    "attend": pb.STEP_MODE_ATTEND,
    "append": pb.STEP_MODE_APPEND,
}

# The server's limit on tokens per entry (kvmem.v1.StepEntry.num_tokens).
MAX_TOKENS_PER_ENTRY = 65536


@dataclass
class StepEntry:
    """One session's tokens for one layer of a batched step.

    Attributes:
        session: the session handle (its shape decides dtypes and shapes;
            its tracked positions advance when the step succeeds).
        q: [T, Hq, D] or [Hq, D]; may be None in APPEND mode.
        k: [T, H, D] or [H, D].
        v: [T, H, D] or [H, D].
        position: of the first token; None = the session's tracked next
            position for the layer.
    """

    session: "Session"
    q: Optional[npt.ArrayLike]
    k: npt.ArrayLike
    v: npt.ArrayLike
    position: Optional[int] = None


@dataclass
class FetchedHead:
    """One KV head's selection (FETCH mode), in ascending position.

    Attributes:
        positions: [N] int64, the selected tokens' original positions.
        k: [N, D] in the session's dtype convention.
        v: [N, D].
        query_rotary_positions: [T] int64; CACHE_RANK sessions only (the
            position at which to rotate each query token), else empty.
    """

    positions: np.ndarray
    k: np.ndarray
    v: np.ndarray
    query_rotary_positions: np.ndarray


@dataclass
class StepResult:
    """One entry's reply.

    Attributes:
        session_id: the entry's session.
        next_position: the layer's next position after this step.
        durable_position: tokens of the session durable in every layer.
        output: ATTEND: [T, Hq, D] in the session's dtype convention.
        lse: ATTEND: [T, Hq] float32, natural log of the softmax
            denominator over the scaled logits.
        heads: FETCH: one per KV head, in head order.
    """

    session_id: str
    next_position: int
    durable_position: int
    output: Optional[np.ndarray] = None
    lse: Optional[np.ndarray] = None
    heads: List[FetchedHead] = field(default_factory=list)


@dataclass
class PlannedEntry:
    """What the client sent for one entry, to check and apply the reply."""

    session: "Session"
    position: int
    num_tokens: int


def _tensor_bytes(where: str, array: npt.ArrayLike, want: np.dtype,
                  dtype_name: str, heads: int,
                  head_dim: int) -> Tuple[int, bytes]:
    """Checks one tensor against [T, heads, head_dim] in `want`; returns T
    and its little-endian bytes."""
    values = np.asarray(array)
    if (values.dtype.kind, values.dtype.itemsize) != (want.kind,
                                                      want.itemsize):
        hint = (" holding bf16 bits (see kvmem.to_bf16)"
                if dtype_name == "bf16" else "")
        raise ValueError(
            f"{where}: dtype {values.dtype}, want {want.newbyteorder('=')}"
            f"{hint} (session dtype {dtype_name})")
    if values.ndim == 2:
        values = values[np.newaxis]
    if values.ndim != 3 or values.shape[1:] != (heads, head_dim):
        raise ValueError(f"{where}: shape {list(np.shape(array))}, want "
                         f"[T, {heads}, {head_dim}] or [{heads}, {head_dim}]")
    tokens = values.shape[0]
    if not 1 <= tokens <= MAX_TOKENS_PER_ENTRY:
        raise ValueError(f"{where}: {tokens} tokens, want 1.."
                         f"{MAX_TOKENS_PER_ENTRY}")
    return tokens, np.ascontiguousarray(values, dtype=want).tobytes()


def build_request(layer: int, mode: str, entries: Sequence[StepEntry],
                  name_entries: bool = True
                  ) -> Tuple["pb.StepRequest", List[PlannedEntry]]:
    """Validates `entries` and encodes them as one StepRequest.

    Raises ValueError, naming the entry and field, for an unknown mode, an
    empty batch, a session twice, a layer out of range, a wrong dtype or
    shape, or tokens counts that differ between q, k and v. Nothing is
    sent and no session changes when it raises.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {list(STEP_MODES)}, got "
                         f"{mode!r}")
    if not entries:
        raise ValueError("a step needs at least one entry")
    request = pb.StepRequest(layer=layer, mode=STEP_MODES[mode])
    planned: List[PlannedEntry] = []
    seen: Dict[str, int] = {}
    for i, entry in enumerate(entries):
        prefix = f"entries[{i}]." if name_entries else ""
        session = entry.session
        if session.id in seen:
            raise ValueError(f"{prefix}session: {session.id!r} is also "
                             f"entries[{seen[session.id]}]; one entry per "
                             f"session")
        seen[session.id] = i
        shape = session.shape
        if not 0 <= layer < shape.layers:
            raise ValueError(f"layer {layer} out of range [0, {shape.layers})"
                             f" of session {session.id!r}")
        want = wire_dtype(shape.dtype)
        q_bytes = b""
        tokens: Optional[int] = None
        first = ""
        if entry.q is not None:
            tokens, q_bytes = _tensor_bytes(prefix + "q", entry.q, want,
                                            shape.dtype, shape.query_heads,
                                            shape.head_dim)
            first = "q"
        elif mode != "append":
            raise ValueError(f"{prefix}q: required in {mode} mode")
        kv_bytes = []
        for name, tensor in (("k", entry.k), ("v", entry.v)):
            count, raw = _tensor_bytes(prefix + name, tensor, want,
                                       shape.dtype, shape.kv_heads,
                                       shape.head_dim)
            if tokens is None:
                tokens, first = count, name
            elif count != tokens:
                raise ValueError(f"{prefix}{name}: {count} tokens, {first} "
                                 f"has {tokens}")
            kv_bytes.append(raw)
        k_bytes, v_bytes = kv_bytes
        position = (session.layer_next_positions[layer]
                    if entry.position is None else int(entry.position))
        if position < 0:
            raise ValueError(f"{prefix}position: {position}, want >= 0")
        request.entries.append(pb.StepEntry(
            session_id=session.id, position=position, num_tokens=tokens,
            q=q_bytes, k=k_bytes, v=v_bytes))
        planned.append(PlannedEntry(session, position, tokens))
    return request, planned


def _array(where: str, raw: bytes, dtype: np.dtype,
           shape: Tuple[int, ...]) -> np.ndarray:
    want_bytes = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != want_bytes:
        raise ProtocolError(f"reply {where}: {len(raw)} bytes, want "
                            f"{want_bytes}")
    # A copy: arrays over the reply's bytes would be read-only.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(
        dtype.newbyteorder("="))


def decode_results(response: "pb.StepResponse", mode: str,
                   planned: Sequence[PlannedEntry]) -> List[StepResult]:
    """Checks a StepResponse against what was sent and decodes it. Raises
    ProtocolError where they disagree."""
    if len(response.results) != len(planned):
        raise ProtocolError(f"reply has {len(response.results)} results for "
                            f"{len(planned)} entries")
    results = []
    for i, (message, sent) in enumerate(zip(response.results, planned)):
        shape = sent.session.shape
        if message.session_id != sent.session.id:
            raise ProtocolError(f"reply results[{i}] is for session "
                                f"{message.session_id!r}, sent "
                                f"{sent.session.id!r}")
        result = StepResult(session_id=message.session_id,
                            next_position=message.next_position,
                            durable_position=message.durable_position)
        dtype = wire_dtype(shape.dtype)
        tokens = sent.num_tokens
        if mode == "attend":
            result.output = _array(
                f"results[{i}].output", message.output, dtype,
                (tokens, shape.query_heads, shape.head_dim))
            result.lse = _array(f"results[{i}].lse", message.lse,
                                np.dtype("<f4"), (tokens, shape.query_heads))
        elif mode == "fetch":
            if len(message.heads) != shape.kv_heads:
                raise ProtocolError(f"reply results[{i}]: "
                                    f"{len(message.heads)} heads, want "
                                    f"{shape.kv_heads}")
            for h, head in enumerate(message.heads):
                count = len(head.positions)
                where = f"results[{i}].heads[{h}]"
                result.heads.append(FetchedHead(
                    positions=np.array(head.positions, dtype=np.int64),
                    k=_array(where + ".k", head.k, dtype,
                             (count, shape.head_dim)),
                    v=_array(where + ".v", head.v, dtype,
                             (count, shape.head_dim)),
                    query_rotary_positions=np.array(
                        head.query_rotary_positions, dtype=np.int64)))
        results.append(result)
    return results
