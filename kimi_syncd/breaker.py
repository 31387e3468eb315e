"""Circuit breaker for the upstream link: closed → open → half-open → closed.

Pure: time comes from an injected clock and jitter from an injected function, so every
transition is tested without sleeping.

- closed: attempts allowed; each failure increments a consecutive counter; reaching
  `failure_threshold` (or one *fatal* failure such as 401) opens the breaker.
- open: attempts refused until `cooldown` (jittered) has passed, then half-open.
- half-open: exactly one probe is allowed; its success closes the breaker, its failure
  re-opens it for another cooldown.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def default_jitter(cooldown: float) -> float:
    # Up to +25 %: many daemons restarted together do not probe the backend in lockstep.
    return cooldown * random.uniform(1.0, 1.25)


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change, for logs and the local event stream."""

    old: BreakerState
    new: BreakerState
    reason: str | None


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float], float] = default_jitter,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be > 0")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._jitter = jitter
        self._state = BreakerState.CLOSED
        self.failures = 0  # consecutive failures
        self.total_failures = 0
        self.times_opened = 0
        self.reason: str | None = None  # why it last opened
        self._open_until = 0.0
        self._probe_in_flight = False
        self.transitions: list[Transition] = []  # drained by the owner

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN, self.reason)
        return self._state

    @property
    def next_attempt_at(self) -> float | None:
        """Clock time at which an attempt will be allowed again (None: allowed now)."""
        if self.state is BreakerState.OPEN:
            return self._open_until
        return None

    def time_until_allowed(self) -> float:
        at = self.next_attempt_at
        return 0.0 if at is None else max(0.0, at - self._clock())

    def allow(self) -> bool:
        """Whether an attempt may start now; in half-open, only the first caller gets True."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self._probe_in_flight = False
        if self._state is not BreakerState.CLOSED:
            self.reason = None
            self._move(BreakerState.CLOSED, None)

    def record_failure(self, reason: str, *, fatal: bool = False) -> None:
        """Count a failure; `fatal` (auth, wrong path, bad TLS) opens the breaker at once."""
        self.failures += 1
        self.total_failures += 1
        probing = self._state is BreakerState.HALF_OPEN or self._probe_in_flight
        self._probe_in_flight = False
        if fatal or probing or self.failures >= self.failure_threshold:
            self._open(reason)

    def _open(self, reason: str) -> None:
        self.reason = reason
        self._open_until = self._clock() + self._jitter(self.cooldown)
        self.times_opened += 1
        self._move(BreakerState.OPEN, reason)

    def _move(self, new: BreakerState, reason: str | None) -> None:
        old = self._state
        self._state = new
        if old is not new or new is BreakerState.OPEN:
            self.transitions.append(Transition(old, new, reason))

    def drain_transitions(self) -> list[Transition]:
        out, self.transitions = self.transitions, []
        return out

    def snapshot(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "failures": self.failures,
            "total_failures": self.total_failures,
            "times_opened": self.times_opened,
            "reason": self.reason,
        }
