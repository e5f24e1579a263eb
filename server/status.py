"""lorad errors -> gRPC status codes. The only place that knows both."""

from __future__ import annotations

import grpc

from lorad.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
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
    UnauthenticatedError,
)

_CODES: list[tuple[type, grpc.StatusCode]] = [
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ClientTooSlowError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
]


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
