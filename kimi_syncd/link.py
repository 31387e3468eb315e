"""The upstream link: one WebSocket client connection to the backend, kept alive forever.

- Reconnection: tenacity drives the attempts with full-jitter exponential backoff
  (`backoff.ReconnectWait`); the circuit breaker (`breaker`) stops a failing or fatal
  backend from being hammered. A connection that dies within `min_healthy_seconds` of
  opening counts as a failure and does not reset the backoff.
- Heartbeat: our own ping loop (not websockets' keepalive) so that RTT is measured, a stalled
  peer is detected within `ping_interval + ping_timeout`, and a wall-clock jump (the laptop
  slept) triggers a ping at once.
- Receiving: every frame is decoded (pure `protocol`) and handed to the writer, which blocks
  us when its buffer is full: back-pressure reaches the backend through TCP.
- Sending: the outbox, FIFO, at-least-once. The backend never acknowledges, so a message is
  *delivered* only when a pong arrives for a ping sent after it; until then it stays pending
  and is re-sent after a reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from kimi_syncd import __version__, protocol
from kimi_syncd.backoff import ConnectionFailed, Failure, ReconnectWait, classify
from kimi_syncd.breaker import BreakerState, CircuitBreaker
from kimi_syncd.config import Settings
from kimi_syncd.store import Frame, LinkEvent, Store, StoreUnavailable
from kimi_syncd.timefmt import iso

log = logging.getLogger(__name__)

PAGE = 256  # outbox rows fetched per query
CLOCK_JUMP = 5.0  # seconds of wall-clock vs monotonic drift that mean "we slept"
TICK = 1.0  # heartbeat granularity for clock-jump detection


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    OPEN = "open"  # the breaker is open
    STOPPED = "stopped"


@dataclass
class RttStats:
    """Ping round-trip times: last, moving average, and percentiles over a window."""

    window: int = 200
    last: float | None = None
    ewma: float | None = None
    samples: collections.deque[float] = field(default_factory=collections.deque)

    def record(self, seconds: float) -> None:
        self.last = seconds
        self.ewma = seconds if self.ewma is None else 0.8 * self.ewma + 0.2 * seconds
        self.samples.append(seconds)
        if len(self.samples) > self.window:
            self.samples.popleft()

    def percentile(self, q: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def snapshot_ms(self) -> dict[str, float | None]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        return {
            "last": ms(self.last),
            "avg": ms(self.ewma),
            "p50": ms(self.percentile(0.5)),
            "p99": ms(self.percentile(0.99)),
            "samples": len(self.samples),
        }


class _SessionEnded(Exception):
    """One connection ended; carries how, for the history and the breaker."""

    def __init__(self, failure: Failure, code: int | None, reason: str | None) -> None:
        super().__init__(failure.reason)
        self.failure = failure
        self.code = code
        self.reason = reason


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """System CAs plus `ca_file`; verification is never turned off."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class Link:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.url = settings.upstream.url
        self.store = store
        self.writer = store.writer
        self.reader = store.reader
        self._token = token
        self._clock = clock
        # Only compared with `clock` to notice suspend/resume; injectable for tests.
        self._wall_clock = wall_clock
        self._on_change = on_change
        self.breaker = CircuitBreaker(
            settings.breaker.failure_threshold, settings.breaker.cooldown, clock=clock
        )
        self.state = LinkState.CONNECTING
        self.since = time.time()
        self.last_error: str | None = None
        self.next_attempt_at: float | None = None  # wall clock
        self.rtt = RttStats()
        self.attempts = 0
        self.connections = 0
        self.conn_id: int | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.delivered = 0
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._ping_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.observe_frame: Callable[[str], None] | None = None

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        breaker = self.breaker
        next_at = self.next_attempt_at
        if breaker.state is BreakerState.OPEN:
            wait = breaker.time_until_allowed()
            next_at = time.time() + wait
        return {
            "state": str(self.state),
            "url": self.url,
            "since": iso(self.since),
            "last_error": self.last_error,
            "rtt_ms": self.rtt.snapshot_ms()["last"],
            "rtt": self.rtt.snapshot_ms(),
            "next_attempt_at": iso(next_at) if self.state is not LinkState.CONNECTED else None,
            "connection_id": self.conn_id,
            "attempts": self.attempts,
            "connections": self.connections,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "breaker": {
                "state": str(breaker.state),
                "failures": breaker.failures,
                "total_failures": breaker.total_failures,
                "times_opened": breaker.times_opened,
                "reason": breaker.reason,
                "next_attempt_at": iso(next_at) if breaker.state is BreakerState.OPEN else None,
            },
        }

    def summary(self) -> str:
        """One line for systemd's STATUS= and the logs."""
        pending = self.writer.outbox.pending
        if self.state is LinkState.CONNECTED:
            rtt = self.rtt.last
            rtt_text = f", rtt {rtt * 1000:.0f} ms" if rtt is not None else ""
            return f"connected to {self.url}, {pending} queued{rtt_text}"
        if self.state is LinkState.OPEN:
            return f"breaker open: {self.breaker.reason or self.last_error}, {pending} queued"
        if self.state is LinkState.BACKOFF:
            wait = max(0.0, (self.next_attempt_at or time.time()) - time.time())
            return f"backoff {wait:.0f} s: {self.last_error}, {pending} queued"
        return f"{self.state} {self.url}, {pending} queued"

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            self.since = time.time()
            if self._on_change is not None:
                self._on_change()

    def _publish(self, type_: str, **body: Any) -> None:
        self.writer.ingest_nowait(LinkEvent(type_, body, time.time(), self.conn_id))

    def _publish_breaker(self) -> None:
        for tr in self.breaker.drain_transitions():
            if tr.new is BreakerState.OPEN and tr.old is BreakerState.CLOSED:
                log.warning(
                    "circuit breaker opened: %s (next probe in %.0f s)",
                    tr.reason,
                    self.breaker.time_until_allowed(),
                )
                self._publish(
                    "breaker_open",
                    reason=tr.reason,
                    retry_in_s=round(self.breaker.time_until_allowed(), 1),
                )
            elif tr.new is BreakerState.CLOSED:
                log.info("circuit breaker closed")
                self._publish("breaker_closed")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="upstream-link")

    async def stop(self) -> None:
        """Close the connection politely (bounded by close_timeout), then end the task.

        Prompt in every state: a backoff sleep, a hung handshake or a breaker wait is simply
        cancelled; the connection history is still closed by `_attempt`'s cleanup.
        """
        self._stopping = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    ws.close(1001, "kimi-syncd stopping"), self.settings.upstream.close_timeout
                )
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._set_state(LinkState.STOPPED)

    def poke(self) -> None:
        """Something changed (clock jump, SIGHUP): ping now instead of waiting."""
        self._ping_now.set()

    async def run(self) -> None:
        rc = self.settings.reconnect
        first = True
        while not self._stopping:
            if not first:
                # After a healthy session: a short jittered pause, so a restarted backend
                # is not hit by every client at the same instant.
                pause = random.uniform(0, rc.initial_delay)
                self.next_attempt_at = time.time() + pause
                self._set_state(LinkState.BACKOFF)
                await asyncio.sleep(pause)
            first = False
            retrying = AsyncRetrying(
                wait=ReconnectWait(
                    rc.initial_delay, rc.max_delay, rc.multiplier, self.breaker.time_until_allowed
                ),
                retry=retry_if_exception_type(ConnectionFailed),
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._attempt()
            except Exception as exc:
                # Only a bug gets here; it must not end the link silently and for good.
                log.exception("upstream link failed unexpectedly; starting over")
                # Recorded as a failure: it also settles a half-open probe left in flight.
                self._fail(Failure(f"internal error: {type(exc).__name__}: {exc}"))
                await asyncio.sleep(rc.max_delay)

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        delay = retry_state.upcoming_sleep
        self.next_attempt_at = time.time() + delay
        self._publish_breaker()
        if self.breaker.state is BreakerState.CLOSED:
            self._set_state(LinkState.BACKOFF)
        else:
            self._set_state(LinkState.OPEN)
        log.info("upstream %s: %s; next attempt in %.1f s", self.url, self.last_error, delay)

    async def _attempt(self) -> None:
        """One connection attempt and, if it opens, the whole connection.

        Returns after a healthy connection ended (the caller starts a fresh backoff); raises
        `ConnectionFailed` when the attempt failed or the connection died young.
        """
        while not self.breaker.allow():  # the wait normally covers this; be exact anyway
            await asyncio.sleep(max(self.breaker.time_until_allowed(), 0.05))
        self._set_state(LinkState.CONNECTING)
        self.attempts += 1
        up = self.settings.upstream
        headers = dict(up.headers)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        kwargs: dict[str, Any] = {}
        try:
            if self.url.startswith("wss://"):  # inside the try: a bad CA file is a failure too
                kwargs["ssl"] = tls_context(str(up.ca_file) if up.ca_file else None)
            ws = await connect(
                self.url,
                additional_headers=headers,
                user_agent_header=f"kimi-syncd/{__version__}",
                compression="deflate" if up.compression else None,
                open_timeout=up.open_timeout,
                close_timeout=up.close_timeout,
                ping_interval=None,  # our heartbeat measures RTT and handles sleep/resume
                ping_timeout=None,
                max_size=up.max_frame_bytes,
                max_queue=64,
                proxy=None,
                **kwargs,
            )
        except Exception as exc:
            failure = classify(exc)
            self._fail(failure)
            raise ConnectionFailed(failure) from exc
        try:
            ended, lived = await self._connection(ws)
        finally:
            # Whatever happened (including cancellation by stop()), never leak the socket.
            self._ws = None
            if ws.state is not State.CLOSED:
                ws.transport.abort()
        if self._stopping:
            return
        log.warning("disconnected from %s after %.1f s: %s", self.url, lived, ended.failure.reason)
        if lived < self.settings.breaker.min_healthy_seconds:
            # Died young (accept-then-close, a crash loop): a failure for the breaker, and
            # the backoff keeps growing because we stay inside the same tenacity run.
            failure = Failure(
                f"{ended.failure.reason} after only {lived:.1f} s",
                fatal=ended.failure.fatal,
                retry_after=ended.failure.retry_after,
            )
            self._fail(failure)
            raise ConnectionFailed(failure)
        # Healthy. `_healthy_after` normally recorded the success already, but the session
        # may have ended in the same instant, before that task ran: record it here too
        # (idempotent), or a half-open probe would never be settled.
        self.breaker.record_success()
        self._publish_breaker()
        self.last_error = ended.failure.reason

    async def _connection(self, ws: ClientConnection) -> tuple[_SessionEnded, float]:
        """Book-keep one open connection around `_session`; returns how and after how long
        it ended. The history row is closed even when we are cancelled."""
        opened = self._clock()
        self.connections += 1
        self._ws = ws
        try:
            conn_id = await self.writer.connection_opened(self.url)
        except Exception as exc:  # the store is failing: do not run a connection we can't log
            failure = Failure(f"cannot record the connection: {exc}")
            self._fail(failure)
            raise ConnectionFailed(failure) from exc
        self.conn_id = conn_id
        self.next_attempt_at = None
        self._set_state(LinkState.CONNECTED)
        log.info("connected to %s (connection %d)", self.url, conn_id)
        self._publish("connected", url=self.url, connection_id=conn_id)
        counters = {"in": 0, "out": 0}
        ended: _SessionEnded | None = None
        try:
            await self._session(ws, opened, counters)
            ended = _SessionEnded(Failure(_close_text(ws)), ws.close_code, ws.close_reason)
        except _SessionEnded as exc:
            ended = exc
        finally:
            if ended is None:  # cancelled (stop) or an unexpected error
                ended = _SessionEnded(
                    Failure("stopped" if self._stopping else "link task ended"),
                    ws.close_code if ws.close_code is not None else 1001,
                    ws.close_reason or "kimi-syncd stopping",
                )
            lived = self._clock() - opened
            self._record_close(conn_id, ended, counters, lived)
        return ended, lived

    def _record_close(
        self, conn_id: int, ended: _SessionEnded, counters: dict[str, int], lived: float
    ) -> None:
        """Synchronous on purpose: it runs in a `finally`, possibly while being cancelled."""
        try:
            self.writer.connection_closed(
                conn_id,
                code=ended.code,
                reason=ended.reason,
                error=ended.failure.reason,
                frames_in=counters["in"],
                frames_out=counters["out"],
            )
        except Exception as exc:  # the store stopped; the link must not die of it
            log.error("cannot record the end of connection %d: %s", conn_id, exc)
        self._publish(
            "disconnected",
            code=ended.code,
            reason=ended.reason,
            error=ended.failure.reason,
            lived_s=round(lived, 3),
        )
        self.conn_id = None

    def _fail(self, failure: Failure) -> None:
        self.last_error = failure.reason
        self.breaker.record_failure(failure.reason, fatal=failure.fatal)
        if failure.fatal:
            log.error(
                "upstream %s refused us: %s; retrying only every %.0f s",
                self.url,
                failure.reason,
                self.settings.breaker.cooldown,
            )

    # -- one connection ------------------------------------------------------------------

    async def _session(self, ws: ClientConnection, opened: float, counters: dict[str, int]) -> None:
        """Run receive, heartbeat, outbox and health tasks until the connection ends.

        Every task is a direct child here, so the first one to fail (including the outbox
        confirmer) ends the whole connection at once.
        """
        window = _Window(self.settings.outbox.window)
        tasks = [
            asyncio.create_task(self._receive(ws, counters), name="link-receive"),
            asyncio.create_task(self._heartbeat(ws), name="link-heartbeat"),
            asyncio.create_task(self._send_outbox(ws, counters, window), name="link-outbox"),
            asyncio.create_task(self._confirm_outbox(window), name="link-confirm"),
            asyncio.create_task(self._healthy_after(opened), name="link-healthy"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if ws.state is not State.CLOSED:
                ws.transport.abort()
        failures = [t.exception() for t in done if not t.cancelled()]
        # Prefer our own diagnosis (keepalive timeout) over the ConnectionClosed it caused.
        failures.sort(key=lambda e: not isinstance(e, _SessionEnded))
        for exc in failures:
            if isinstance(exc, _SessionEnded):
                raise exc
            if exc is not None:
                failure = classify(exc)
                raise _SessionEnded(failure, ws.close_code, ws.close_reason) from exc

    async def _healthy_after(self, opened: float) -> None:
        delay = self.settings.breaker.min_healthy_seconds - (self._clock() - opened)
        if delay > 0:
            await asyncio.sleep(delay)
        self.breaker.record_success()
        self._publish_breaker()
        self.last_error = None
        await asyncio.Event().wait()  # keep the task alive until the session ends

    async def _receive(self, ws: ClientConnection, counters: dict[str, int]) -> None:
        max_bytes = self.settings.upstream.max_frame_bytes
        writer = self.writer
        observe = self.observe_frame
        try:
            async for message in ws:
                decoded = protocol.decode(message, max_bytes=max_bytes)
                counters["in"] += 1
                self.frames_in += 1
                if observe is not None:
                    observe(decoded.type if isinstance(decoded, protocol.Event) else "")
                # Blocks while the writer's buffer is full: we stop reading, websockets'
                # bounded queue fills and pauses the socket, TCP pushes back on the backend.
                await writer.ingest(Frame(decoded, time.time(), self.conn_id))
        except ConnectionClosed as exc:
            self._record_protocol_rejection(exc)
            raise _SessionEnded(classify(exc), ws.close_code, ws.close_reason) from exc
        raise _SessionEnded(Failure(_close_text(ws)), ws.close_code, ws.close_reason)

    def _record_protocol_rejection(self, exc: ConnectionClosed) -> None:
        """Frames websockets refused itself (bad UTF-8, too big) still get a rejected row."""
        sent = exc.sent
        if sent is None:
            return
        reason = {1007: "not_utf8", 1009: "too_large"}.get(sent.code)
        if reason is not None:
            self.writer.ingest_nowait(
                Frame(
                    protocol.Rejected(reason, f"connection failed by us: {sent.reason}", ""),
                    time.time(),
                    self.conn_id,
                )
            )

    async def _ping(self, ws: ClientConnection, after: str = "") -> float:
        """Ping and wait for the pong; the round-trip time in seconds.

        The timeout covers sending the ping too: `ws.ping()` waits for the write buffer to
        drain, which never happens when the backend stopped reading.
        """
        timeout = self.settings.upstream.ping_timeout
        try:
            async with asyncio.timeout(timeout):
                waiter = await ws.ping()
                return await waiter
        except TimeoutError:
            raise _timeout_ended(timeout, after) from None

    async def _heartbeat(self, ws: ClientConnection) -> None:
        up = self.settings.upstream
        clock, wall_clock = self._clock, self._wall_clock
        last_ping = clock()
        wall, mono = wall_clock(), clock()
        while True:
            # Wake at least every TICK (clock-jump detection) and exactly when a ping is due
            # (a ping_interval below TICK must still be honoured).
            due = max(0.0, min(TICK, last_ping + up.ping_interval - clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ping_now.wait(), due)
            now_wall, now_mono = wall_clock(), clock()
            jumped = abs((now_wall - wall) - (now_mono - mono)) > CLOCK_JUMP
            wall, mono = now_wall, now_mono
            if jumped:
                log.info("wall clock jumped (suspend/resume?): checking the connection now")
            if not (jumped or self._ping_now.is_set() or now_mono - last_ping >= up.ping_interval):
                continue
            self._ping_now.clear()
            self.rtt.record(await self._ping(ws))
            # The interval runs from the pong: a slow pong does not cause back-to-back pings.
            last_ping = clock()

    async def _send_outbox(
        self, ws: ClientConnection, counters: dict[str, int], window: _Window
    ) -> None:
        """Send pending messages FIFO; after each group a ping whose pong confirms it."""
        ob = self.settings.outbox
        writer = self.writer
        # Transitions from the previous connection (deliveries confirmed just before it
        # died) must be committed before we read the outbox, or confirmed messages would
        # be sent again.
        with contextlib.suppress(StoreUnavailable):  # a failing store only risks duplicates
            await writer.flush()
        cursor = 0  # highest id handled on this connection; the rest are fetched later
        alone = False  # a re-send is in flight alone: wait for its pong before going on
        while True:
            if window.unconfirmed and (alone or window.unconfirmed >= window.size):
                window.room.clear()
                await window.room.wait()
                continue
            alone = False
            room = window.size - window.unconfirmed
            writer.outbox_changed.clear()
            rows = await self.reader.outbox_pending(cursor, min(PAGE, room))
            if not rows:
                await writer.outbox_changed.wait()
                continue
            group: list[int] = []
            now = time.time()
            try:
                for row in rows:
                    msg_id = int(row["id"])
                    if row["expires_at"] is not None and row["expires_at"] <= now:
                        cursor = msg_id
                        writer.transition([msg_id], "expired", reason="TTL passed before delivery")
                        continue
                    if row["attempts"] >= ob.max_attempts:
                        cursor = msg_id
                        writer.transition(
                            [msg_id],
                            "dead",
                            reason=(
                                f"{row['attempts']} attempts without confirmation "
                                f"(outbox.max_attempts)"
                            ),
                        )
                        continue
                    if row["attempts"] > 0:
                        # Sent before, never confirmed: it may be the message that kills our
                        # connections. It goes alone, with nothing else in flight, so it
                        # cannot take others down with it (and use up their attempts).
                        alone = True
                        if group or window.unconfirmed:
                            break  # cursor stays below it: fetched again once all is confirmed
                    cursor = msg_id
                    # Counted as an attempt before the send: a message that kills the
                    # connection every time must still reach max_attempts and go dead.
                    group.append(msg_id)
                    await ws.send(row["body"])
                    counters["out"] += 1
                    self.frames_out += 1
                    if alone or len(group) >= room:
                        break
            finally:
                # Also when the send failed or we are cancelled: what was (maybe) sent is
                # recorded as such, so its attempts count and it is re-sent later.
                writer.transition(group, "sent", conn_id=self.conn_id)
            if group:
                window.unconfirmed += len(group)
                waiter = await self._ping_sent(ws)
                window.outstanding.put_nowait((waiter, group))

    async def _ping_sent(self, ws: ClientConnection) -> Awaitable[float]:
        """The confirmation ping after a group (its pong is awaited by the confirmer)."""
        timeout = self.settings.upstream.ping_timeout
        try:
            async with asyncio.timeout(timeout):
                return await ws.ping()
        except TimeoutError:
            raise _timeout_ended(timeout, " after sending") from None

    async def _confirm_outbox(self, window: _Window) -> None:
        timeout = self.settings.upstream.ping_timeout
        while True:
            waiter, ids = await window.outstanding.get()
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise _timeout_ended(timeout, " after sending") from None
            committed = self.writer.transition(ids, "delivered", wait=True)
            self.delivered += len(ids)
            if committed is not None:
                # Free the window only once "delivered" is on disk: after a crash, at most
                # one window of messages is sent again.
                await committed
            window.unconfirmed -= len(ids)
            window.room.set()


@dataclass
class _Window:
    """Messages sent on this connection and not yet confirmed by a pong."""

    size: int
    unconfirmed: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: asyncio.Queue[tuple[Awaitable[float], list[int]]] = field(
        default_factory=asyncio.Queue
    )


def _timeout_ended(timeout: float, after: str) -> _SessionEnded:
    return _SessionEnded(
        Failure(f"no pong within {timeout:g} s{after} (backend stalled or network gone)"),
        1006,
        "keepalive timeout",
    )


def _close_text(ws: ClientConnection) -> str:
    code = ws.close_code
    reason = ws.close_reason
    return f"connection closed (code {code}{': ' + reason if reason else ''})"


__all__ = ["Link", "LinkState", "RttStats"]
