"""Errors raised by the kvmem client.

Every error the server returns becomes a :class:`KvmemError` (or one of its
subclasses) that keeps the gRPC status code and the server's message
unchanged. Problems the client finds itself before sending anything (a wrong
dtype, a shape that does not match the session) are plain ``ValueError``s:
nothing was sent, so nothing changed on the server.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class KvmemError(Exception):
    """A call the server answered with an error status.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        details: the server's message, unchanged, e.g.
            ``entries[3].k: 1024 bytes, want 2048``.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(KvmemError):
    """INVALID_ARGUMENT: a field broke a rule; the message names it."""


class NotFoundError(KvmemError):
    """NOT_FOUND: no such session for this tenant."""


class AlreadyExistsError(KvmemError):
    """ALREADY_EXISTS: the session id is taken within the tenant."""


class FailedPreconditionError(KvmemError):
    """FAILED_PRECONDITION: a position gap or repeat; the message names the
    expected position."""


class ResourceExhaustedError(KvmemError):
    """RESOURCE_EXHAUSTED: memory, message size or spill quota, with the
    limit in the message."""


class DeadlineExceededError(KvmemError):
    """DEADLINE_EXCEEDED: the call ran past its timeout; a step is either
    wholly applied or not at all."""


class UnavailableError(KvmemError):
    """UNAVAILABLE: the server is shutting down or its storage is failing."""


class DataLossError(KvmemError):
    """DATA_LOSS: stored data failed its checksum."""


class ProtocolError(KvmemError):
    """The server's reply does not match the request (a byte length, a
    request id). Carries ``grpc.StatusCode.INTERNAL``; indicates a bug on
    one side, never a problem with the caller's input."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, details)


_ERROR_CLASSES: Dict[grpc.StatusCode, Type[KvmemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}

# grpc.StatusCode members carry (number, name) as their value.
_CODES_BY_NUMBER: Dict[int, grpc.StatusCode] = {
    code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode, details: str) -> KvmemError:
    """Returns the KvmemError subclass instance for `code`."""
    return _ERROR_CLASSES.get(code, KvmemError)(code, details)


def error_from_rpc(error: grpc.RpcError) -> KvmemError:
    """Translates a failed grpc call (a ``grpc.Call``) into a KvmemError."""
    code: Optional[grpc.StatusCode] = None
    details: Optional[str] = None
    if isinstance(error, grpc.Call):
        code = error.code()
        details = error.details()
    return error_for(code or grpc.StatusCode.UNKNOWN,
                     details if details is not None else str(error))


def error_from_status_number(number: int, details: str) -> KvmemError:
    """Translates a numeric status code (as StepStreamResponse.error_code
    carries it) into a KvmemError."""
    return error_for(_CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN),
                     details)
