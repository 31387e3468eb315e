"""Reconnection policy: classification of failures and the tenacity wait strategy."""

from __future__ import annotations

import ssl
from types import SimpleNamespace
from typing import Any

import pytest
from tenacity import RetryCallState
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.http11 import Response

from kimi_syncd.backoff import (
    MAX_RETRY_AFTER,
    ConnectionFailed,
    Failure,
    ReconnectWait,
    classify,
    parse_retry_after,
)


def status_error(code: int, headers: dict[str, str] | None = None) -> InvalidStatus:
    return InvalidStatus(Response(code, "Reason", Headers(headers or {}), b""))


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_client_errors_are_fatal(code: int) -> None:
    failure = classify(status_error(code))
    assert failure.fatal
    assert f"HTTP {code}" in failure.reason


def test_auth_failure_names_the_setting() -> None:
    assert "upstream.token" in classify(status_error(401)).reason


@pytest.mark.parametrize("code", [500, 502, 503, 429])
def test_server_errors_are_retried(code: int) -> None:
    assert not classify(status_error(code)).fatal


def test_retry_after_is_read_on_429_and_503() -> None:
    assert classify(status_error(429, {"Retry-After": "7"})).retry_after == 7
    assert classify(status_error(503, {"Retry-After": "30"})).retry_after == 30
    assert classify(status_error(500, {"Retry-After": "30"})).retry_after is None


def test_retry_after_forms() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("999999999") == MAX_RETRY_AFTER
    now = 1_800_000_000.0
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:00 GMT", now=now) is not None
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now=now) == 0.0


def test_other_failures() -> None:
    assert classify(InvalidURI("nope", "bad")).fatal
    assert classify(ssl.SSLCertVerificationError("bad cert")).fatal
    assert classify(ConnectionRefusedError()).reason == "connection refused"
    assert not classify(ConnectionRefusedError()).fatal
    assert classify(TimeoutError()).reason == "timed out"
    closed = ConnectionClosedError(Close(1011, "boom"), None)
    assert "1011" in classify(closed).reason and not classify(closed).fatal
    wrapped = ConnectionFailed(Failure("x", fatal=True))
    assert classify(wrapped) is wrapped.failure
    assert classify(OSError(101, "Network is unreachable")).reason == "network is unreachable"


def state_after(attempt: int, exc: BaseException | None = None) -> RetryCallState:
    outcome: Any = SimpleNamespace(failed=exc is not None, exception=lambda: exc)
    return SimpleNamespace(attempt_number=attempt, outcome=outcome)  # type: ignore[return-value]


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    wait = ReconnectWait(initial=1.0, maximum=60.0, multiplier=2.0)
    for attempt in range(1, 12):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        samples = [wait(state_after(attempt)) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        # full jitter: the spread covers most of [0, ceiling]
        assert min(samples) < ceiling * 0.2 and max(samples) > ceiling * 0.8


def test_retry_after_raises_the_wait() -> None:
    wait = ReconnectWait(initial=1.0, maximum=60.0, multiplier=2.0)
    exc = ConnectionFailed(Failure("HTTP 429", retry_after=42))
    assert wait(state_after(1, exc)) == 42


def test_breaker_wait_is_never_undercut() -> None:
    wait = ReconnectWait(initial=1.0, maximum=60.0, multiplier=2.0, extra_wait=lambda: 120.0)
    assert wait(state_after(1)) == 120.0
