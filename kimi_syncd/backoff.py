"""Reconnection policy: which failures are retried, which are fatal, and how long to wait.

Pure (no I/O): `classify` maps an exception from a connection attempt to a `Failure`, and
`ReconnectWait` is a tenacity wait strategy — full-jitter exponential backoff that honours
`Retry-After` and never undercuts an open circuit breaker.
"""

from __future__ import annotations

import email.utils
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_random_exponential
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
    PayloadTooBig,
)

# Statuses that mean "the server is there but we are wrong": retrying fast cannot help.
FATAL_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 426})
# A Retry-After beyond this is treated as this: a buggy header must not silence us for days.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a connection attempt (or an established connection) ended."""

    reason: str
    fatal: bool = False
    retry_after: float | None = None


class ConnectionFailed(Exception):
    """Raised by the link for one failed attempt; carries the classified failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        # Not RFC delta-seconds, but servers (and our simulator) send "1.5": honour it
        # rather than fall back to a short backoff.
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER)


def classify(exc: BaseException) -> Failure:
    """Turn whatever a connection attempt raised into a retryable or fatal `Failure`."""
    if isinstance(exc, ConnectionFailed):
        return exc.failure
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        phrase = exc.response.reason_phrase or ""
        reason = f"HTTP {status} {phrase}".strip()
        if status in FATAL_STATUSES:
            hint = {
                401: "check upstream.token",
                403: "check upstream.token",
                404: "check the path in upstream.url",
            }.get(status)
            return Failure(f"{reason} ({hint})" if hint else reason, fatal=True)
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
        return Failure(reason, retry_after=retry_after)
    if isinstance(exc, InvalidURI):
        return Failure(f"malformed URL: {exc}", fatal=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure(
            f"TLS verification failed: {getattr(exc, 'verify_message', None) or exc}", fatal=True
        )
    if isinstance(exc, ssl.SSLError):
        return Failure(f"TLS error: {exc}")
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        why = exc.rcvd.reason if exc.rcvd is not None and exc.rcvd.reason else ""
        return Failure(f"connection closed (code {code}{': ' + why if why else ''})")
    if isinstance(exc, PayloadTooBig):
        return Failure(f"frame too large: {exc}")
    if isinstance(exc, (InvalidMessage, InvalidHandshake)):
        cause = exc.__cause__
        if isinstance(cause, BaseException) and not isinstance(cause, InvalidHandshake):
            return classify(cause)
        return Failure(f"handshake failed: {exc}")
    if isinstance(exc, TimeoutError):
        return Failure("timed out")
    if isinstance(exc, ConnectionRefusedError):
        return Failure("connection refused")
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        return Failure(text[0].lower() + text[1:] if text else type(exc).__name__)
    if isinstance(exc, EOFError):
        return Failure("connection closed during handshake")
    return Failure(f"{type(exc).__name__}: {exc}")


class ReconnectWait(wait_base):
    """Full-jitter exponential backoff (tenacity), raised to Retry-After and the breaker's wait.

    `extra_wait` returns the seconds some other authority requires (the breaker's cooldown);
    the wait is never shorter than that.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        multiplier: float,
        extra_wait: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._jittered = wait_random_exponential(
            multiplier=initial, max=maximum, exp_base=multiplier
        )
        self._extra_wait = extra_wait

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = float(self._jittered(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if exc is not None:
            retry_after = classify(exc).retry_after
            if retry_after is not None and math.isfinite(retry_after):
                delay = max(delay, retry_after)
        return max(delay, self._extra_wait())
