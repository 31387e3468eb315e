"""The upstream link, driven in-process against the simulated backend.

Every test runs the Link and the SimBackend in the same event loop: nothing may block it, and
conditions are awaited by polling with generous timeouts. Bounds on attempts are derived from
the backoff schedule with wide margins (the machine is shared and noisy); nothing asserts on
speed except "this happened within <schedule> + slack".
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from kimi_syncd.config import Settings
from kimi_syncd.link import Link, LinkState
from kimi_syncd.sim import SimBackend
from kimi_syncd.store import NewMessage, Store

Predicate = Callable[[], bool | Awaitable[bool]]


async def until(pred: Predicate, timeout: float = 10.0, what: str = "condition") -> float:
    """Poll `pred` until true; returns the seconds it took. Fails after `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = pred()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def sections(url: str, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Small, fast defaults; a test overrides only what it is about."""
    base: dict[str, dict[str, Any]] = {
        "upstream": {
            "url": url,
            "ping_interval": 5.0,
            "ping_timeout": 5.0,
            "open_timeout": 5.0,
            "close_timeout": 1.0,
        },
        "reconnect": {"initial_delay": 0.2, "max_delay": 1.0, "multiplier": 2.0},
        "breaker": {"failure_threshold": 1000, "cooldown": 30.0, "min_healthy_seconds": 0.3},
        "store": {"batch_delay_ms": 1.0},
    }
    for name, values in overrides.items():
        base.setdefault(name, {}).update(values)
    return base


def link_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith(("link-", "upstream-link"))
    ]


class Harness:
    def __init__(self, make_settings: Callable[..., Settings]) -> None:
        self.make_settings = make_settings
        self.links: list[Link] = []
        self.stores: list[Store] = []

    async def __call__(
        self, url: str, *, link_kw: dict[str, Any] | None = None, **overrides: Any
    ) -> tuple[Link, Store]:
        settings = self.make_settings(**sections(url, **overrides))
        store = await Store.open(settings.store, settings.outbox)
        self.stores.append(store)
        link = Link(settings, store, **(link_kw or {}))
        self.links.append(link)
        link.start()
        return link, store

    async def close(self) -> None:
        for link in self.links:
            await link.stop()
        assert not link_tasks(), f"tasks left running after stop(): {link_tasks()}"
        for store in self.stores:
            await store.close()


@pytest.fixture
async def start_link(
    make_settings: Callable[..., Settings], sim: SimBackend, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Harness]:
    """`await start_link(url, section=...)` → a started (Link, Store); both closed after the
    test, then checked for leaked tasks and unretrieved task/future errors."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    harness = Harness(make_settings)
    try:
        yield harness
    finally:
        await harness.close()
        gc.collect()
        leaks = [
            r.getMessage()
            for r in caplog.records
            if r.name == "asyncio" and r.levelno >= logging.ERROR
        ]
        assert not leaks, leaks


async def enqueue(store: Store, bodies: list[dict[str, Any]], **kw: Any) -> list[int]:
    msgs = [NewMessage("x_test", json.dumps(b), kw.get("expires_at"), None) for b in bodies]
    return [r.id for r in await store.writer.enqueue(msgs)]


async def outbox(store: Store) -> dict[int, Any]:
    await store.writer.flush()
    rows = await store.reader.outbox_list(state=None, after_id=0, limit=100_000)
    return {int(r["id"]): r for r in rows}


async def link_events(store: Store) -> list[dict[str, Any]]:
    await store.writer.flush()
    rows = await store.reader.events(kind="link", limit=10_000)
    return [json.loads(r["body"]) for r in rows]


async def connection_rows(store: Store) -> list[Any]:
    await store.writer.flush()
    return list(reversed(await store.reader.connections(limit=1000)))


def received_ns(sim: SimBackend) -> list[int]:
    return [json.loads(r.text)["n"] for r in sim.received]


def connected(link: Link) -> Callable[[], bool]:
    return lambda: link.state is LinkState.CONNECTED


# -- reconnection ---------------------------------------------------------------------------


async def test_blip_reconnects_within_jittered_delay(start_link: Harness, sim: SimBackend) -> None:
    link, store = await start_link(
        sim.url,
        reconnect={"initial_delay": 0.5},
        upstream={"compression": False},
    )
    await until(connected(link), what="first connection")
    frames = await sim.step(3)
    await enqueue(store, [{"type": "x_test", "n": i} for i in range(2)])
    await until(lambda: link.delivered == 2, what="2 deliveries")
    await until(lambda: link.frames_in >= len(frames) + 1, what="frames in")
    await asyncio.sleep(0.5)  # outlive min_healthy_seconds: this is a healthy connection

    await sim.drop_all(code=1012)
    took = await until(
        lambda: link.connections == 2 and link.state is LinkState.CONNECTED,
        what="reconnection",
    )
    # After a healthy connection the pause is uniform(0, initial_delay); the rest is slack.
    assert took <= 0.5 + 3.0
    assert link.attempts == 2
    assert link.breaker.failures == 0

    conns = await connection_rows(store)
    assert len(conns) == 2
    first = conns[0]
    assert first["opened_at"] and first["closed_at"] >= first["opened_at"]
    assert first["close_code"] == 1012
    assert "1012" in first["error"]
    assert first["frames_in"] == len(frames) + 1  # init + the stepped events
    assert first["frames_out"] == 2
    assert conns[1]["closed_at"] is None  # still open

    events = await link_events(store)
    assert [e["type"] for e in events] == ["connected", "disconnected", "connected"]
    assert events[0]["connection_id"] == first["id"]
    assert events[1]["code"] == 1012 and "1012" in events[1]["error"]
    assert events[1]["lived_s"] >= 0.3
    assert sorted(received_ns(sim)) == [0, 1]

    await link.stop()  # the history is closed on a clean stop too
    conns = await connection_rows(store)
    assert conns[1]["closed_at"] is not None and conns[1]["close_code"] == 1001
    assert (await link_events(store))[-1]["type"] == "disconnected"


async def test_backend_down_attempts_follow_the_backoff_schedule(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("refuse", status=503)
    initial, maximum = 0.1, 0.8
    link, _ = await start_link(
        sim.url, reconnect={"initial_delay": initial, "max_delay": maximum, "multiplier": 2.0}
    )
    window = 3.0
    await asyncio.sleep(window)
    attempts = sim.stats.handshake_attempts
    # Full jitter: the n-th wait is uniform(0, min(max, initial * 2**(n-1))). The mean wait
    # soon reaches max/2 = 0.4 s, so ~10 attempts fit in 3 s; a tight loop would make
    # hundreds. 20 would need 17 uniform(0, 0.8) waits summing to < ~2 s: p < 1e-8.
    assert 3 <= attempts <= 20, attempts
    assert abs(link.attempts - attempts) <= 1
    times = sim.stats.handshake_times
    for i, gap in enumerate(b - a for a, b in itertools.pairwise(times)):
        assert gap <= min(maximum, initial * 2**i) + 1.0, (i, gap)  # ceiling + slack
    status = link.status()
    assert status["state"] in ("backoff", "connecting")
    assert "503" in status["last_error"]
    assert status["breaker"]["state"] == "closed"

    sim.clear_fault()  # the backend is back: reconnect within one ceiling (+ slack)
    await until(connected(link), timeout=maximum + 4.0, what="reconnection")


async def test_accept_then_close_is_a_failure_and_does_not_reset_backoff(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("accept_then_close", delay=0.05, code=1011)
    link, store = await start_link(
        sim.url,
        reconnect={"initial_delay": 0.05, "max_delay": 1.0, "multiplier": 3.0},
        breaker={"min_healthy_seconds": 1.0},
    )
    await asyncio.sleep(3.0)
    # Growing backoff (ceilings 0.05, 0.15, 0.45, 1, 1, ...): ~10 attempts in 3 s. Were
    # the backoff reset by each short-lived connection, every wait would be uniform(0,
    # 0.05) and we would see ~30.
    assert 3 <= link.attempts <= 20, link.attempts
    # Every connection died young: each one is a consecutive failure, none a success.
    assert link.connections >= 2
    assert link.breaker.failures == link.breaker.total_failures >= link.connections - 1
    conns = [c for c in await connection_rows(store) if c["closed_at"] is not None]
    assert conns and all(c["close_code"] == 1011 for c in conns)
    assert "1011" in (link.last_error or "") and "after only" in (link.last_error or "")


async def test_accept_then_close_opens_the_breaker_and_recovery_closes_it(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("accept_then_close", delay=0.05, code=1011)
    cooldown = 1.0
    link, store = await start_link(
        sim.url,
        reconnect={"initial_delay": 0.05, "max_delay": 0.2},
        breaker={"failure_threshold": 3, "cooldown": cooldown, "min_healthy_seconds": 0.5},
    )
    await until(lambda: link.state is LinkState.OPEN, what="breaker open")
    assert link.attempts == 3
    status = link.status()
    assert status["breaker"]["state"] == "open"
    assert "1011" in status["breaker"]["reason"]
    assert status["breaker"]["next_attempt_at"] is not None
    assert link.summary().startswith("breaker open")
    window = 2.5
    before = link.attempts
    await asyncio.sleep(window)
    # Open: one probe per cooldown (jittered up to +25 %), each one failing again.
    assert link.attempts - before <= window / cooldown + 1

    sim.clear_fault()
    await until(
        lambda: link.breaker.state.value == "closed" and link.state is LinkState.CONNECTED,
        timeout=cooldown * 1.25 + 0.5 + 6.0,
        what="breaker closed after a healthy probe",
    )
    types = [e["type"] for e in await link_events(store)]
    assert "breaker_open" in types and "breaker_closed" in types
    assert types.index("breaker_open") < types.index("breaker_closed")
    opened = next(e for e in await link_events(store) if e["type"] == "breaker_open")
    assert "1011" in opened["reason"] and opened["retry_in_s"] >= 0


async def test_401_opens_the_breaker_at_once_with_a_clear_reason(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("refuse", status=401)
    link, store = await start_link(
        sim.url,
        reconnect={"initial_delay": 0.05, "max_delay": 0.1},
        breaker={"failure_threshold": 5, "cooldown": 30.0},
    )
    await until(lambda: link.state is LinkState.OPEN, what="breaker open")
    await asyncio.sleep(1.0)
    assert sim.stats.handshake_attempts == 1  # no hammering
    assert link.attempts == 1
    status = link.status()
    for text in (status["last_error"], status["breaker"]["reason"]):
        assert "401" in text and "upstream.token" in text
    assert status["state"] == "open"
    assert status["next_attempt_at"] is not None
    events = await link_events(store)
    assert events[-1]["type"] == "breaker_open" and "401" in events[-1]["reason"]

    # stop() is prompt while waiting out the breaker.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await link.stop()
    assert loop.time() - started < 3.0
    assert link.state is LinkState.STOPPED
    assert not link_tasks()


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(start_link: Harness, sim: SimBackend, status: int) -> None:
    sim.set_fault("refuse", status=status, retry_after=1)
    link, _ = await start_link(sim.url, reconnect={"initial_delay": 0.05, "max_delay": 0.1})
    await until(lambda: sim.stats.handshake_attempts >= 3, what="3 attempts")
    times = sim.stats.handshake_times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Without Retry-After the backoff would be at most 0.1 s.
    assert all(gap >= 0.95 for gap in gaps), gaps
    assert str(status) in (link.last_error or "")


async def test_stalled_backend_is_detected_and_replaced(
    start_link: Harness, sim: SimBackend
) -> None:
    interval, timeout = 0.5, 1.0
    link, store = await start_link(
        sim.url,
        upstream={"ping_interval": interval, "ping_timeout": timeout},
        breaker={"min_healthy_seconds": 0.2},
    )
    await until(lambda: len(link.rtt.samples) >= 1, what="a first pong")
    first = link.conn_id
    sim.set_fault("stall")
    took = await until(lambda: link.conn_id != first, timeout=20, what="stall detected")
    assert took <= interval + timeout + 3.0
    conns = await connection_rows(store)
    assert conns[0]["close_code"] == 1006
    assert f"no pong within {timeout:g} s" in conns[0]["error"]

    sim.clear_fault()
    before = len(link.rtt.samples)
    await until(
        lambda: (
            link.state is LinkState.CONNECTED
            and link.conn_id != first
            and len(link.rtt.samples) > before
        ),
        timeout=20,
        what="a working replacement connection",
    )
    assert link.connections >= 2


async def test_stop_is_prompt_while_the_handshake_hangs(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("stall", handshake=True)
    link, _ = await start_link(sim.url, upstream={"open_timeout": 30.0})
    await until(lambda: sim.stats.handshake_attempts >= 1, what="a hanging handshake")
    await asyncio.sleep(0.1)
    assert link.state is LinkState.CONNECTING
    loop = asyncio.get_running_loop()
    started = loop.time()
    await link.stop()
    assert loop.time() - started < 3.0
    assert not link_tasks()


# -- the outbox ------------------------------------------------------------------------------


async def test_offline_messages_are_delivered_in_order_exactly_once(
    start_link: Harness, sim: SimBackend
) -> None:
    sim.set_fault("refuse", status=503)
    link, store = await start_link(
        sim.url, reconnect={"initial_delay": 0.05, "max_delay": 0.3}, outbox={"window": 100}
    )
    total = 600  # several windows and more than one outbox page
    ids = await enqueue(store, [{"type": "x_test", "n": i} for i in range(total)])
    await until(lambda: link.attempts >= 2, what="offline attempts")
    assert link.state is not LinkState.CONNECTED
    sim.clear_fault()
    await until(
        lambda: store.writer.outbox.by_state["delivered"] == total, timeout=30, what="delivery"
    )
    assert received_ns(sim) == list(range(total))  # in order, exactly once
    assert link.connections == 1
    rows = await outbox(store)
    assert all(rows[i]["state"] == "delivered" and rows[i]["attempts"] == 1 for i in ids)
    assert link.frames_out == total


async def test_drop_mid_drain_loses_nothing(start_link: Harness, sim: SimBackend) -> None:
    link, store = await start_link(
        sim.url,
        outbox={"window": 64},
        reconnect={"initial_delay": 0.1},
        breaker={"min_healthy_seconds": 0.0},
    )
    await until(connected(link), what="connected")
    total = 4000
    pad = "x" * 400
    ids = await enqueue(store, [{"type": "x_test", "n": i, "pad": pad} for i in range(total)])
    await until(lambda: link.delivered >= 64, timeout=20, what="first confirmations")
    await sim.drop_all(abnormal=True)
    at_drop = link.delivered
    assert at_drop < total, "the drain finished before the drop: make it larger"
    rows = await outbox(store)  # flushed: every confirmation made so far is committed
    acknowledged = {i for i in ids if rows[i]["state"] == "delivered"}
    assert len(acknowledged) >= 64

    await until(
        lambda: store.writer.outbox.by_state["delivered"] == total, timeout=40, what="delivery"
    )
    assert link.connections >= 2
    got = received_ns(sim)
    counts: dict[int, int] = {}
    for n in got:
        counts[n] = counts.get(n, 0) + 1
    assert set(counts) == set(range(total))  # nothing lost
    by_id = dict(zip(ids, range(total), strict=True))
    # Duplicates only for messages that were not confirmed when the connection dropped.
    assert all(counts[by_id[i]] == 1 for i in acknowledged)
    # FIFO on each connection, and first deliveries in order overall.
    for conn in {r.conn for r in sim.received}:
        ns = [json.loads(r.text)["n"] for r in sim.received if r.conn == conn]
        assert ns == sorted(ns)
    first_seen = list(dict.fromkeys(got))
    assert first_seen == sorted(first_seen)
    rows = await outbox(store)
    assert all(r["state"] == "delivered" for r in rows.values())
    resent = [i for i in ids if rows[i]["attempts"] > 1]
    assert not set(resent) & acknowledged
    conns = await connection_rows(store)
    assert conns[0]["close_code"] == 1006


async def test_expired_and_dead_messages_are_skipped_with_a_reason(
    start_link: Harness, sim: SimBackend
) -> None:
    link, store = await start_link(
        sim.url,
        outbox={"window": 1, "max_attempts": 1},
        upstream={"ping_interval": 10.0, "ping_timeout": 10.0},
        breaker={"min_healthy_seconds": 0.0},
    )
    await until(connected(link), what="connected")
    sim.set_fault("stop_reading")  # the doomed message's first send is never confirmed
    now = time.time()
    [expired] = await enqueue(store, [{"type": "x_test", "n": 0}], expires_at=now - 1)
    doomed, after1, after2 = await enqueue(store, [{"type": "x_test", "n": n} for n in (1, 2, 3)])

    async def doomed_sent() -> bool:
        return bool((await outbox(store))[doomed]["state"] == "sent")

    await until(doomed_sent, what="the doomed message sent")
    rows = await outbox(store)
    assert rows[expired]["state"] == "expired"
    assert rows[after1]["state"] == "queued"  # the window (1) is full
    await sim.drop_all(abnormal=True)  # the connection dies before any pong
    sim.clear_fault()
    await until(lambda: store.writer.outbox.by_state["delivered"] == 2, timeout=15, what="delivery")
    rows = await outbox(store)
    assert rows[expired]["state"] == "expired"
    assert "TTL" in rows[expired]["last_error"]
    assert rows[doomed]["state"] == "dead"
    assert "attempts" in rows[doomed]["last_error"]
    assert rows[after1]["state"] == rows[after2]["state"] == "delivered"
    got = received_ns(sim)
    assert 0 not in got
    assert got.count(2) == 1 and got.count(3) == 1 and got.index(2) < got.index(3)
    assert store.writer.outbox.pending == 0


async def test_confirmation_timeout_ends_the_connection_and_resends(
    start_link: Harness, sim: SimBackend
) -> None:
    link, store = await start_link(
        sim.url,
        upstream={"ping_interval": 30.0, "ping_timeout": 0.5},
        breaker={"min_healthy_seconds": 0.0},
    )
    await until(connected(link), what="connected")
    first = link.conn_id
    sim.set_fault("stop_reading")
    [msg] = await enqueue(store, [{"type": "x_test", "n": 7}])
    # The heartbeat would only notice after 30 s: the confirmer's own timeout must end it.
    took = await until(lambda: link.conn_id != first, timeout=15, what="confirm timeout")
    assert took <= 0.5 + 3.0
    conns = await connection_rows(store)
    assert "after sending" in conns[0]["error"]
    sim.clear_fault()
    await until(
        lambda: store.writer.outbox.by_state["delivered"] == 1, timeout=15, what="re-delivery"
    )
    row = (await outbox(store))[msg]
    assert row["attempts"] == 2  # re-sent after the reconnect
    assert row["conn_id"] != first
    assert received_ns(sim).count(7) >= 1


async def test_poison_message_goes_dead_without_blocking_the_queue(
    start_link: Harness, make_settings: Callable[..., Settings]
) -> None:
    # A backend that drops the connection whenever it reads this message (too big for it):
    # its attempts must still be counted, or it would be re-sent forever.
    async with SimBackend(seed=7, rate=None, max_size=16 * 1024) as picky:
        link, store = await start_link(
            picky.url,
            outbox={"max_attempts": 2},
            upstream={"compression": False},
            reconnect={"initial_delay": 0.05},
            breaker={"min_healthy_seconds": 0.0},
        )
        poison, fine = await enqueue(
            store, [{"type": "x_test", "n": 0, "pad": "x" * 8_000_000}, {"type": "x_test", "n": 1}]
        )

        async def settled() -> bool:
            rows = await outbox(store)
            return bool(rows[poison]["state"] == "dead" and rows[fine]["state"] == "delivered")

        await until(settled, timeout=30, what="poison dead, next one delivered")
        rows = await outbox(store)
        assert rows[poison]["attempts"] == 2
        assert "attempts" in rows[poison]["last_error"]
        assert [json.loads(r.text)["n"] for r in picky.received] == [1]
        assert link.connections == 3
        await link.stop()


# -- heartbeat -------------------------------------------------------------------------------


async def test_rtt_is_recorded(start_link: Harness, sim: SimBackend) -> None:
    link, _ = await start_link(sim.url, upstream={"ping_interval": 0.1})
    await until(connected(link), what="connected")
    await asyncio.sleep(1.5)
    # A ping every 0.1 s: ~14 in the window. (3 proves the interval is honoured even below
    # the heartbeat's 1 s clock-jump tick, with a wide margin for a busy machine.)
    assert len(link.rtt.samples) >= 3
    status = link.status()
    rtt = status["rtt"]
    assert rtt["samples"] >= 3
    for key in ("last", "avg", "p50", "p99"):
        assert isinstance(rtt[key], float) and rtt[key] > 0, (key, rtt)
    assert rtt["p50"] <= rtt["p99"]
    assert status["rtt_ms"] == rtt["last"]
    assert "rtt" in link.summary()


async def test_wall_clock_jump_and_poke_ping_at_once(start_link: Harness, sim: SimBackend) -> None:
    offset = 0.0

    def wall() -> float:
        return time.time() + offset

    link, _ = await start_link(
        sim.url, upstream={"ping_interval": 60.0}, link_kw={"wall_clock": wall}
    )
    await until(connected(link), what="connected")
    await asyncio.sleep(0.2)  # the heartbeat has taken its first clock readings
    assert len(link.rtt.samples) == 0  # next regular ping only in 60 s
    offset = 3600.0  # the laptop slept for an hour
    took = await until(lambda: len(link.rtt.samples) == 1, what="ping after the jump")
    assert took <= 1.0 + 3.0  # one heartbeat tick + slack
    link.poke()
    await until(lambda: len(link.rtt.samples) == 2, what="ping after poke()")


# -- back-pressure ---------------------------------------------------------------------------


async def test_slow_writer_blocks_the_receive_loop(
    start_link: Harness, sim: SimBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_queue = 100
    link, store = await start_link(
        sim.url,
        store={"ingest_queue": ingest_queue, "batch_max": 50},
        upstream={"compression": False, "ping_timeout": 30.0},
    )
    await until(connected(link), what="connected")
    writer = store.writer
    slow = asyncio.Event()
    slow.set()
    real_commit = writer._commit

    async def slow_commit(*args: Any, **kwargs: Any) -> None:
        if slow.is_set():
            await asyncio.sleep(0.05)  # at most ~1000 frames/s
        await real_commit(*args, **kwargs)

    monkeypatch.setattr(writer, "_commit", slow_commit)
    n = 30_000  # ~15 MB: far more than the kernel's socket buffers hold
    blast = asyncio.create_task(sim.blast(n, size=500))
    ws = link._ws
    assert ws is not None
    deepest_ingest = deepest_recv = 0
    for _ in range(150):  # ~1.5 s of sampling while the writer is slow
        await asyncio.sleep(0.01)
        deepest_ingest = max(deepest_ingest, writer.ingest_depth)
        deepest_recv = max(deepest_recv, len(ws.recv_messages.frames))
    # The receive loop waits for the writer instead of buffering: the writer's queue stays
    # at its bound, websockets' queue near its high-water mark (64 frames, plus what one
    # 256 KiB socket read parsed), and the backend is held up by TCP.
    assert deepest_ingest >= ingest_queue * 0.5  # the writer really was the bottleneck
    assert deepest_ingest <= ingest_queue + 5  # (+ local link events, never blocked)
    assert deepest_recv <= 64 + 256 * 1024 // 500 + 64
    assert not blast.done(), "the backend was never pushed back"
    assert link.frames_in < n

    slow.clear()
    assert await asyncio.wait_for(blast, 60) == n
    await until(lambda: link.frames_in >= n, timeout=60, what="all frames received")
    await writer.flush()
    assert link.connections == 1  # slow, not dead: the connection survived


async def test_backend_that_stops_reading_blocks_our_sends(
    start_link: Harness, sim: SimBackend
) -> None:
    link, store = await start_link(
        sim.url,
        outbox={"window": 10_000},
        upstream={"compression": False, "ping_interval": 30.0, "ping_timeout": 30.0},
    )
    await until(connected(link), what="connected")
    sim.set_fault("stop_reading")
    total, size = 200, 64 * 1024  # ~13 MB: more than the socket buffers hold
    pad = "x" * size
    for start in range(0, total, 50):
        await enqueue(
            store, [{"type": "x_test", "n": i, "pad": pad} for i in range(start, start + 50)]
        )
    ws = link._ws
    assert ws is not None

    last = -1
    stable_since = asyncio.get_running_loop().time()
    biggest_buffer = 0

    def sends_stuck() -> bool:
        nonlocal last, stable_since, biggest_buffer
        biggest_buffer = max(biggest_buffer, ws.transport.get_write_buffer_size())
        now = asyncio.get_running_loop().time()
        if link.frames_out != last:
            last, stable_since = link.frames_out, now
        return link.frames_out > 0 and now - stable_since >= 0.5

    await until(sends_stuck, timeout=20, what="sends to block")
    assert link.frames_out < total  # blocked, not buffered in our process
    # What we hold for the backend: websockets' write buffer (32 KiB high-water mark) plus
    # the one message being written.
    assert biggest_buffer <= 32 * 1024 + size + 1024
    assert ws.transport.get_write_buffer_size() <= 32 * 1024 + size + 1024

    sim.clear_fault()
    await until(
        lambda: store.writer.outbox.by_state["delivered"] == total, timeout=40, what="delivery"
    )
    assert received_ns(sim) == list(range(total))
    assert link.connections == 1


async def test_backend_that_stops_reading_is_detected_even_with_sends_blocked(
    start_link: Harness, sim: SimBackend
) -> None:
    interval, timeout = 0.5, 1.0
    link, store = await start_link(
        sim.url,
        outbox={"window": 10_000},
        upstream={"compression": False, "ping_interval": interval, "ping_timeout": timeout},
        breaker={"min_healthy_seconds": 0.0},
    )
    await until(connected(link), what="connected")
    first = link.conn_id
    sim.set_fault("stop_reading")
    total, pad = 200, "x" * 64 * 1024  # fills every buffer: even a ping can't be written
    for start in range(0, total, 50):
        await enqueue(
            store, [{"type": "x_test", "n": i, "pad": pad} for i in range(start, start + 50)]
        )
    started = asyncio.get_running_loop().time()
    await until(lambda: link.conn_id != first, timeout=20, what="detection")
    assert asyncio.get_running_loop().time() - started <= interval + timeout + 3.0
    conns = await connection_rows(store)
    assert f"no pong within {timeout:g} s" in conns[0]["error"]
    sim.clear_fault()
    await until(
        lambda: store.writer.outbox.by_state["delivered"] == total, timeout=40, what="delivery"
    )
    assert set(received_ns(sim)) == set(range(total))
