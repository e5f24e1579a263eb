"""lorad errors -> gRPC status codes -> HTTP statuses. The only place that knows them together:
the HTTP API (lorad.server.openai_api) answers every error with the HTTP status of the gRPC code
the same error gets, so both transports always agree."""

from __future__ import annotations

import grpc

from lorad.deltas.combine import CombineCancelled
from lorad.deltas.merge import MergeCancelled, MergeVerificationError
from lorad.errors import (
    AdapterDoesNotFitError,
    AdapterExistsError,
    AdapterNotFoundError,
    BaseModelError,
    ClientTooSlowError,
    ConfigError,
    DeadlineExceededError,
    EngineStoppedError,
    InvalidAdapterError,
    IntegrityError,
    InvalidRequestError,
    LimitExceededError,
    LoradError,
    PermissionDeniedError,
    QueueFullError,
    ReadOnlyAdaptersError,
    UnauthenticatedError,
)

_CODES: list[tuple[type, grpc.StatusCode]] = [
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ClientTooSlowError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterDoesNotFitError, grpc.StatusCode.FAILED_PRECONDITION),
    (ReadOnlyAdaptersError, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    # a merge whose result does not answer like serving, a base that cannot be loaded: the
    # system is not in a state that lets it succeed, no bug of ours
    (MergeVerificationError, grpc.StatusCode.FAILED_PRECONDITION),
    (BaseModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (MergeCancelled, grpc.StatusCode.CANCELLED),
    (CombineCancelled, grpc.StatusCode.CANCELLED),
]


# gRPC code -> HTTP status, as google.rpc.Code documents the pairs (CANCELLED: nginx's 499)
_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(error: BaseException) -> int:
    """The HTTP status for an error: that of its gRPC code (500 for anything unmapped)."""
    return _HTTP.get(status_for(error), 500)


def status_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


MAX_MESSAGE_CHARS = 1000  # status details travel in a trailer, which grpc caps at 8 KiB


def message_for(error: BaseException) -> str:
    if isinstance(error, LoradError):
        text = str(error)
        return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."
    return "internal error; see the server log"
