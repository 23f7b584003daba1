"""Session configuration as plain dataclasses, and their kvmem.v1 messages.

Enumerations are lower-case strings (``"bf16"``, ``"cache_rank"``, …); a
field left ``None`` means "the server's default" (DESIGN.md § Policy
defaults); the session the server returns has every default filled in.
The server validates ranges and names the offending field in an
INVALID_ARGUMENT error; the client checks only what it must to encode a
request (enumeration names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

from kvmem._proto import pb

DTYPES: Dict[str, int] = {
    "bf16": pb.DTYPE_BF16,
    "fp16": pb.DTYPE_FP16,
    "fp32": pb.DTYPE_FP32,
}
ROTARY_SCALINGS: Dict[str, int] = {
    "none": pb.ROTARY_SCALING_NONE,
    "linear": pb.ROTARY_SCALING_LINEAR,
    "llama3": pb.ROTARY_SCALING_LLAMA3,
}
SCORE_REDUCTIONS: Dict[str, int] = {
    "max": pb.SCORE_REDUCTION_MAX,
    "mean": pb.SCORE_REDUCTION_MEAN,
}
POSITIONS_MODES: Dict[str, int] = {
    "absolute": pb.POSITIONS_MODE_ABSOLUTE,
    "cache_rank": pb.POSITIONS_MODE_CACHE_RANK,
}
DURABILITIES: Dict[str, int] = {
    "async": pb.DURABILITY_ASYNC,
    "step_sync": pb.DURABILITY_STEP_SYNC,
}


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding parameters (kvmem.v1.Rotary). Used by CACHE_RANK
    sessions, where kvmem rotates q and k itself.

    Attributes:
        base_theta: θ base, e.g. 10000.0 or 500000.0; > 1.
        rotary_dims: leading channels of a head that rotate; even; 0 = all.
        interleaved: True: pairs (2i, 2i+1); False: pairs (i, i + d/2).
        scaling: "none", "linear" or "llama3".
        scaling_factor: "linear" and "llama3": ≥ 1. 0 = unset (1).
        low_freq_factor, high_freq_factor: "llama3" only.
        original_max_positions: "llama3" only: the trained context, tokens.
    """

    base_theta: float
    rotary_dims: int = 0
    interleaved: bool = False
    scaling: str = "none"
    scaling_factor: float = 0.0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_positions: int = 0


@dataclass(frozen=True)
class ModelShape:
    """The model shape of a session (kvmem.v1.ModelShape); fixed for its
    life.

    Attributes:
        layers: L, 1..1024.
        kv_heads: H, 1..256.
        query_heads: Hq, a positive multiple of H (grouped-query attention:
            query head h uses KV head h // (Hq // H)).
        head_dim: D: 64, 128 or 256.
        dtype: of q, k, v and outputs: "bf16", "fp16" or "fp32".
        softmax_scale: multiplies q·k; None = 1/sqrt(D).
        rotary: None = no rotary parameters (ABSOLUTE sessions need none).
    """

    layers: int
    kv_heads: int
    query_heads: int
    head_dim: int
    dtype: str = "bf16"
    softmax_scale: Optional[float] = None
    rotary: Optional[Rotary] = None


@dataclass(frozen=True)
class CachePolicy:
    """How a session's KV is kept and selected (kvmem.v1.CachePolicy).
    Every field None means the server's default, given in brackets.

    Attributes:
        sinks: S, first tokens never evicted [64].
        cascades: C, cascades of `window` slots [4].
        window: W, slots per cascade, a multiple of page_tokens [1024].
        page_tokens: P, tokens per page [16].
        step_budget_tokens: B, tokens a decode step attends per stream,
            new token included [2048].
        recent_tokens: newest resident tokens always selected [P].
        ema_beta: β of the attention-score EMA, in (0, 1) [0.9999999].
        score_reduction: "max" or "mean" over a query group ["max"].
        eager_fill: fill every cascade while the cache is not full [True].
        positions_mode: "absolute" or "cache_rank" ["absolute"].
        recall: bring the best spilled pages back into selections [True].
        dense_layers: layers attending to every resident token; () = none
            [{0, 1} ∩ [0, L)].
        spill_quota_bytes: spilled bytes the session may keep; 0 = no
            quota [0].
        idle_ttl_seconds: idle time before the session is deleted; 0 =
            never [0].
    """

    sinks: Optional[int] = None
    cascades: Optional[int] = None
    window: Optional[int] = None
    page_tokens: Optional[int] = None
    step_budget_tokens: Optional[int] = None
    recent_tokens: Optional[int] = None
    ema_beta: Optional[float] = None
    score_reduction: Optional[str] = None
    eager_fill: Optional[bool] = None
    positions_mode: Optional[str] = None
    recall: Optional[bool] = None
    dense_layers: Optional[Sequence[int]] = None
    spill_quota_bytes: Optional[int] = None
    idle_ttl_seconds: Optional[int] = None


def enum_number(field: str, names: Mapping[str, int], name: str) -> int:
    """Returns the wire number of enumeration value `name`; ValueError
    naming `field` if it is not one of `names`."""
    try:
        return names[name]
    except KeyError:
        raise ValueError(f"{field} must be one of {list(names)}, got "
                         f"{name!r}") from None


def enum_name(names: Mapping[str, int], number: int) -> str:
    """Returns the name of wire number `number`; "unspecified" for 0 and
    "unknown(N)" for a value this client does not know."""
    for name, value in names.items():
        if value == number:
            return name
    return "unspecified" if number == 0 else f"unknown({number})"


def rotary_to_proto(rotary: Rotary) -> "pb.Rotary":
    return pb.Rotary(
        base_theta=rotary.base_theta,
        rotary_dims=rotary.rotary_dims,
        interleaved=rotary.interleaved,
        scaling=enum_number("rotary.scaling", ROTARY_SCALINGS,
                            rotary.scaling),
        scaling_factor=rotary.scaling_factor,
        low_freq_factor=rotary.low_freq_factor,
        high_freq_factor=rotary.high_freq_factor,
        original_max_positions=rotary.original_max_positions)


def rotary_from_proto(message: "pb.Rotary") -> Optional[Rotary]:
    """None when no θ base is set: the session has no rotary parameters."""
    if message.base_theta == 0:
        return None
    return Rotary(
        base_theta=message.base_theta,
        rotary_dims=message.rotary_dims,
        interleaved=message.interleaved,
        scaling=enum_name(ROTARY_SCALINGS, message.scaling),
        scaling_factor=message.scaling_factor,
        low_freq_factor=message.low_freq_factor,
        high_freq_factor=message.high_freq_factor,
        original_max_positions=message.original_max_positions)


def shape_to_proto(shape: ModelShape) -> "pb.ModelShape":
    message = pb.ModelShape(
        layers=shape.layers,
        kv_heads=shape.kv_heads,
        query_heads=shape.query_heads,
        head_dim=shape.head_dim,
        dtype=enum_number("shape.dtype", DTYPES, shape.dtype))
    if shape.softmax_scale is not None:
        message.softmax_scale = shape.softmax_scale
    if shape.rotary is not None:
        message.rotary.CopyFrom(rotary_to_proto(shape.rotary))
    return message


def shape_from_proto(message: "pb.ModelShape") -> ModelShape:
    return ModelShape(
        layers=message.layers,
        kv_heads=message.kv_heads,
        query_heads=message.query_heads,
        head_dim=message.head_dim,
        dtype=enum_name(DTYPES, message.dtype),
        softmax_scale=(message.softmax_scale
                       if message.HasField("softmax_scale") else None),
        rotary=(rotary_from_proto(message.rotary)
                if message.HasField("rotary") else None))


# CachePolicy fields that are proto3 `optional` scalars (set = not None).
_OPTIONAL_POLICY_FIELDS = (
    "sinks", "cascades", "window", "page_tokens", "step_budget_tokens",
    "recent_tokens", "ema_beta", "eager_fill", "recall")


def policy_to_proto(policy: CachePolicy) -> "pb.CachePolicy":
    message = pb.CachePolicy()
    for name in _OPTIONAL_POLICY_FIELDS:
        value = getattr(policy, name)
        if value is not None:
            setattr(message, name, value)
    if policy.score_reduction is not None:
        message.score_reduction = enum_number(
            "policy.score_reduction", SCORE_REDUCTIONS,
            policy.score_reduction)
    if policy.positions_mode is not None:
        message.positions_mode = enum_number(
            "policy.positions_mode", POSITIONS_MODES, policy.positions_mode)
    if policy.dense_layers is not None:
        message.dense_layers.extend(policy.dense_layers)
        message.dense_layers_set = True
    if policy.spill_quota_bytes is not None:
        message.spill_quota_bytes = policy.spill_quota_bytes
    if policy.idle_ttl_seconds is not None:
        message.idle_ttl_seconds = policy.idle_ttl_seconds
    return message


def policy_from_proto(message: "pb.CachePolicy") -> CachePolicy:
    values = {name: (getattr(message, name) if message.HasField(name)
                     else None)
              for name in _OPTIONAL_POLICY_FIELDS}
    dense: Optional[Sequence[int]] = None
    if message.dense_layers_set or message.dense_layers:
        dense = tuple(message.dense_layers)
    return CachePolicy(
        score_reduction=(enum_name(SCORE_REDUCTIONS, message.score_reduction)
                         if message.score_reduction else None),
        positions_mode=(enum_name(POSITIONS_MODES, message.positions_mode)
                        if message.positions_mode else None),
        dense_layers=dense,
        spill_quota_bytes=message.spill_quota_bytes,
        idle_ttl_seconds=message.idle_ttl_seconds,
        **values)
