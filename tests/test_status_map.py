"""The error map at the edge (lorad.server.status): every typed error the management half raises
gets its own code and HTTP status; only a bug (an untyped exception) is INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from lorad.deltas.combine import CombineCancelled
from lorad.deltas.merge import MergeCancelled, MergeVerificationError
from lorad.errors import BaseModelError, DeadlineExceededError
from lorad.server.status import http_status_for, message_for, status_for


@pytest.mark.parametrize("error, code, http", [
    (MergeVerificationError("merged answers differ"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (BaseModelError("the base cannot be loaded"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (MergeCancelled("cancelled"), grpc.StatusCode.CANCELLED, 499),
    (CombineCancelled("cancelled"), grpc.StatusCode.CANCELLED, 499),
    (DeadlineExceededError("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
])
def test_typed_errors_are_not_internal(error, code, http):
    assert status_for(error) == code and http_status_for(error) == http
    assert message_for(error) == str(error)  # the sentence travels, not "see the server log"


def test_an_untyped_error_is_internal():
    assert status_for(KeyError("x")) == grpc.StatusCode.INTERNAL and "server log" in message_for(KeyError("x"))
