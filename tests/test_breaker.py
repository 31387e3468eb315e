"""The circuit breaker's transitions, exhaustively, with a fake clock (no sleeps)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimi_syncd.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold, cooldown, clock=clock, jitter=lambda c: c), clock


def test_starts_closed_and_allows() -> None:
    b, _ = make()
    assert b.state is BreakerState.CLOSED
    assert b.allow() and b.allow()
    assert b.next_attempt_at is None
    assert b.time_until_allowed() == 0.0


def test_opens_after_threshold_consecutive_failures() -> None:
    b, _ = make(threshold=3)
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is BreakerState.CLOSED
    b.record_failure("refused")
    assert b.state is BreakerState.OPEN
    assert b.reason == "refused"
    assert not b.allow()
    assert b.times_opened == 1


def test_success_resets_consecutive_count() -> None:
    b, _ = make(threshold=3)
    b.record_failure("x")
    b.record_failure("x")
    b.record_success()
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is BreakerState.CLOSED
    assert b.failures == 2
    assert b.total_failures == 4


def test_fatal_failure_opens_at_once() -> None:
    b, clock = make(threshold=5, cooldown=60)
    b.record_failure("HTTP 401", fatal=True)
    assert b.state is BreakerState.OPEN
    assert b.time_until_allowed() == pytest.approx(60)
    clock.now += 59.9
    assert not b.allow()


def test_half_open_after_cooldown_allows_exactly_one_probe() -> None:
    b, clock = make(threshold=1, cooldown=10)
    b.record_failure("down")
    clock.now += 10
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() is True
    assert b.allow() is False  # a second caller waits for the probe's verdict
    assert b.allow() is False


def test_probe_success_closes() -> None:
    b, clock = make(threshold=1, cooldown=10)
    b.record_failure("down")
    clock.now += 10
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.reason is None
    assert b.allow() and b.allow()


def test_probe_failure_reopens_for_a_full_cooldown_even_below_threshold() -> None:
    b, clock = make(threshold=3, cooldown=10)
    for _ in range(3):
        b.record_failure("down")
    clock.now += 10
    assert b.allow()
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN
    assert b.reason == "still down"
    assert b.time_until_allowed() == pytest.approx(10)
    assert b.times_opened == 2


def test_cooldown_is_jittered_by_the_injected_function() -> None:
    clock = FakeClock()
    b = CircuitBreaker(1, 100, clock=clock, jitter=lambda c: c * 1.2)
    b.record_failure("x")
    assert b.time_until_allowed() == pytest.approx(120)


def test_default_jitter_stays_within_bounds() -> None:
    clock = FakeClock()
    for _ in range(50):
        b = CircuitBreaker(1, 100, clock=clock)
        b.record_failure("x")
        assert 100 <= b.time_until_allowed() <= 125


def test_transitions_are_reported_once_each() -> None:
    b, clock = make(threshold=1, cooldown=5)
    b.record_failure("a")
    clock.now += 5
    _ = b.state
    b.allow()
    b.record_success()
    kinds = [(t.old, t.new) for t in b.drain_transitions()]
    assert kinds == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert b.drain_transitions() == []


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0)


OPS = ("fail", "fatal", "success", "allow", "tick")


@pytest.mark.parametrize("ops", list(itertools.product(OPS, repeat=4)))
def test_every_sequence_of_four_operations_keeps_the_invariants(ops: tuple[str, ...]) -> None:
    run_and_check(ops)


@given(st.lists(st.sampled_from(OPS), max_size=40))
def test_random_sequences_keep_the_invariants(ops: list[str]) -> None:
    run_and_check(ops)


def run_and_check(ops: tuple[str, ...] | list[str]) -> None:
    """A reference model: what each state must do, checked after every operation."""
    b, clock = make(threshold=2, cooldown=10)
    for op in ops:
        before = b.state
        if op == "fail":
            b.record_failure("f")
        elif op == "fatal":
            b.record_failure("F", fatal=True)
            assert b.state is BreakerState.OPEN
        elif op == "success":
            b.record_success()
            assert b.state is BreakerState.CLOSED and b.failures == 0
        elif op == "allow":
            allowed = b.allow()
            assert allowed == (
                before is BreakerState.CLOSED or (before is BreakerState.HALF_OPEN and allowed)
            )
            if before is BreakerState.OPEN:
                assert not allowed
        else:
            clock.now += 10
        state = b.state
        if state is BreakerState.OPEN:
            assert not b.allow()
            assert 0 < b.time_until_allowed() <= 10
            assert b.reason is not None
        if state is BreakerState.CLOSED:
            assert b.failures < 2
            assert b.allow()
