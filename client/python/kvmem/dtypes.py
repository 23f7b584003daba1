"""The session dtypes as numpy sees them, and bf16 conversions.

numpy has no bfloat16, so bf16 tensors travel as ``uint16`` arrays holding
the bf16 bit patterns (the upper 16 bits of an IEEE binary32). fp16 tensors
are ``float16`` and fp32 tensors ``float32``. On the wire every tensor is
little-endian.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import numpy.typing as npt

# Session dtype name -> the numpy dtype of its tensors on the wire.
WIRE_DTYPES: Dict[str, np.dtype] = {
    "bf16": np.dtype("<u2"),
    "fp16": np.dtype("<f2"),
    "fp32": np.dtype("<f4"),
}

_BF16_QUIET_BIT = np.uint32(0x0040)  # bf16's top mantissa bit


def wire_dtype(dtype: str) -> np.dtype:
    """Returns the numpy dtype that carries a session dtype ("bf16", "fp16"
    or "fp32"). ValueError for any other name."""
    try:
        return WIRE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, "
                         f"got {dtype!r}") from None


def to_bf16(values: npt.ArrayLike) -> np.ndarray:
    """Rounds fp32 values to bf16, to nearest with ties to even.

    Args:
        values: any shape; converted to float32 first (so float64 input is
            rounded twice: to fp32, then to bf16).

    Returns:
        uint16 array of the same shape holding bf16 bit patterns. Values too
        large for bf16 become ±inf, as IEEE rounding says; a NaN stays a
        (quiet) NaN with its sign.
    """
    fp32 = np.asarray(values, dtype=np.float32)
    # 1-D so that numpy does uint32 arithmetic modulo 2^32 without the
    # overflow warning it gives for scalars.
    bits = fp32.reshape(-1).view(np.uint32)
    # Round to nearest even: add 0x7FFF plus the lowest kept bit, then drop
    # the low 16 bits. A carry into the exponent is the correct rounding
    # (up to the next binade, or to infinity).
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lowest_kept) >> np.uint32(16)
    # NaN payloads could carry into the sign bit; keep them NaN instead.
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    nan = (bits >> np.uint32(16)) | _BF16_QUIET_BIT
    return np.where(is_nan, nan, rounded).astype(np.uint16).reshape(
        fp32.shape)


def from_bf16(bits: npt.ArrayLike) -> np.ndarray:
    """Widens bf16 bit patterns to fp32, exactly.

    Args:
        bits: uint16 array (any shape) of bf16 bit patterns.

    Returns:
        float32 array of the same shape.
    """
    array = np.asarray(bits)
    if array.dtype.kind != "u" or array.dtype.itemsize != 2:
        raise ValueError(f"from_bf16 takes uint16 bf16 bit patterns, got "
                         f"dtype {array.dtype}")
    return (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
