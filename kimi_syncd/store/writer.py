"""The single writer: owns the only write connection and group-commits everything.

Producers (the link, the API) hand items over without touching SQLite. The writer takes
whatever is waiting, applies it — events are decoded already, the reducer updates the
per-session state — and commits events, session rows, outbox changes and connection history
in ONE transaction. So the log and the derived state can never disagree, and one fsync
covers a whole batch: that is what makes durable acknowledgement cheap.

Back-pressure: frames wait in a bounded buffer (`store.ingest_queue`); when it is full,
`ingest()` blocks, which stops the link's receive loop, which lets TCP push back on the
backend. Control items (enqueue, outbox transitions) have their own queue and go first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import aiosqlite

from kimi_syncd import protocol
from kimi_syncd.state import State, apply
from kimi_syncd.store.db import StoreUnavailable, fault_code, is_corrupt, is_transient

log = logging.getLogger(__name__)

PENDING_STATES = ("queued", "sent")
OUTBOX_STATES = ("queued", "sent", "delivered", "expired", "dead", "cancelled")


# ---------------------------------------------------------------------------------------
# Items handed to the writer


@dataclasses.dataclass(slots=True)
class Frame:
    decoded: protocol.Event | protocol.Rejected
    received_at: float
    conn_id: int | None


@dataclasses.dataclass(slots=True)
class LinkEvent:
    type: str
    body: dict[str, Any]
    received_at: float
    conn_id: int | None = None


@dataclasses.dataclass(slots=True)
class NewMessage:
    type: str
    body: str
    expires_at: float | None
    caller_uid: int | None
    idem_key: str | None = None
    idem_hash: str | None = None


@dataclasses.dataclass(slots=True)
class EnqueueResult:
    id: int
    state: str
    created: bool  # False: an earlier message with the same Idempotency-Key


class OutboxFull(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # "outbox_full_messages" (429) or "outbox_full_bytes" (507)


class IdempotencyConflict(Exception):
    pass


@dataclasses.dataclass(slots=True)
class _Enqueue:
    messages: list[NewMessage]
    future: asyncio.Future[list[EnqueueResult]]


@dataclasses.dataclass(slots=True)
class _Transition:
    ids: list[int]
    to: str  # sent, delivered, expired, dead, cancelled
    at: float
    reason: str | None = None
    conn_id: int | None = None
    future: asyncio.Future[list[int]] | None = None


@dataclasses.dataclass(slots=True)
class _ConnOpened:
    url: str
    at: float
    future: asyncio.Future[int]


@dataclasses.dataclass(slots=True)
class _ConnClosed:
    conn_id: int
    at: float
    code: int | None
    reason: str | None
    error: str | None
    frames_in: int
    frames_out: int


@dataclasses.dataclass(slots=True)
class _Call:
    """Run a coroutine function with exclusive use of the write connection."""

    name: str
    future: asyncio.Future[Any]
    args: tuple[Any, ...] = ()


_Control = _Enqueue | _Transition | _ConnOpened | _ConnClosed | _Call


def _bookkeeping(item: _Control) -> bool:
    """Link progress records: kept and retried across a transient fault, never failed."""
    if isinstance(item, _Transition):
        return item.to != "cancelled"  # a cancel() has a caller to answer now
    return isinstance(item, (_ConnOpened, _ConnClosed))


@dataclasses.dataclass(frozen=True, slots=True)
class Committed:
    """One committed log record, as published to followers."""

    seq: int
    kind: str
    type: str
    session_id: int | None
    received_at: float
    body: str


class Subscription:
    """A follower's bounded buffer of committed records; overflow cuts it off."""

    def __init__(self, maxlen: int) -> None:
        self.buffer: collections.deque[Committed] = collections.deque()
        self.maxlen = maxlen
        self.overflowed = False
        self.closed = False
        self._ready = asyncio.Event()

    def push(self, record: Committed) -> None:
        if self.overflowed:
            return
        if len(self.buffer) >= self.maxlen:
            self.overflowed = True  # the reader is too slow: stop buffering for it
        else:
            self.buffer.append(record)
        self._ready.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until records (or an overflow) arrive; False on timeout."""
        if self.buffer or self.overflowed or self.closed:
            return True
        self._ready.clear()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.closed = True
        self._ready.set()


@dataclasses.dataclass(slots=True)
class _BatchDelta:
    """What the control items of the open transaction changed so far."""

    states: collections.Counter[str]  # outbox rows per state
    pending_bytes: int
    seq: int  # the last event seq of this batch
    rebuilt: tuple[State, CommittedSessions, dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class OutboxCounts:
    by_state: dict[str, int]
    pending_bytes: int

    @property
    def pending(self) -> int:
        return sum(self.by_state.get(s, 0) for s in PENDING_STATES)


class CommittedSessions(Mapping[int, dict[str, Any]]):
    """Every session's committed state, kept as the JSON text of its `sessions` row.

    The text is written anyway; kept as text it takes a fraction of the memory of the parsed
    dicts (1,000 sessions with their recent metrics: ~4 MB instead of ~26 MiB), and the API
    sends it as is. Reading one as a dict parses it.
    """

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.flags: dict[int, tuple[bool, bool]] = {}  # (active, deleted), for list filters

    def put(self, sid: int, session: dict[str, Any], text: str) -> None:
        self.texts[sid] = text
        self.flags[sid] = (bool(session.get("active")), bool(session.get("deleted")))

    def __getitem__(self, sid: int) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.texts[sid])
        return value

    def __iter__(self) -> Iterator[int]:
        return iter(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, sid: int) -> str | None:
        return self.texts.get(sid)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Writer:
    def __init__(
        self,
        db: aiosqlite.Connection,
        *,
        batch_max: int = 1000,
        batch_delay: float = 0.002,
        ingest_queue: int = 10_000,
        max_messages: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.batch_max = batch_max
        self.batch_delay = batch_delay
        self.ingest_max = ingest_queue
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.state = State()
        self.last_seq = 0
        self.first_seq = 0
        self.committed_sessions = CommittedSessions()
        self.committed_global: dict[str, Any] = {}
        self.rejected_by_reason: collections.Counter[str] = collections.Counter()
        self.outbox = OutboxCounts(dict.fromkeys(OUTBOX_STATES, 0), 0)
        self.fault: str | None = None  # why writes are failing right now
        self.fault_code: str | None = None
        self.fatal: BaseException | None = None
        self.outbox_changed = asyncio.Event()
        self.subscribers: set[Subscription] = set()
        # Metrics hooks (the daemon plugs prometheus in); kept as plain counters here.
        self.batches = 0
        self.last_batch_size = 0
        self.last_commit_seconds = 0.0
        self.commit_observer: Any = None  # callable(batch_size, seconds) or None

        self._ingest: collections.deque[Frame | LinkEvent] = collections.deque()
        self._control: collections.deque[_Control] = collections.deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # The in-memory state ran ahead of a transaction that was rolled back and could not be
        # reloaded yet (the reload itself failed): reload before applying anything else.
        self._needs_reload = False
        # Frames handed over / committed so far, for `flush()`: FIFO makes counts enough.
        self._frames_handed = 0
        self._frames_done = 0
        self._progress = asyncio.Event()  # set after every commit or failed attempt

    # -- lifecycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the committed state, counters and sequence numbers (once, at start)."""
        async with self.db.execute("SELECT min(seq), max(seq) FROM events") as cur:
            row = await cur.fetchone()
        self.first_seq = (row[0] or 0) if row else 0
        self.last_seq = (row[1] or 0) if row else 0
        async with self.db.execute("SELECT value FROM meta WHERE key='last_seq'") as cur:
            row = await cur.fetchone()
        if row is not None:
            # Retention may have pruned the newest rows' predecessors, never the counter.
            self.last_seq = max(self.last_seq, int(row[0]))
        await self._reload_state()
        async with self.db.execute(
            "SELECT reason, count(*) FROM rejected_frames GROUP BY reason"
        ) as cur:
            self.rejected_by_reason = collections.Counter(
                {str(r[0]): int(r[1]) for r in await cur.fetchall()}
            )
        async with self.db.execute("SELECT value FROM meta WHERE key='rejected_pruned'") as cur:
            row = await cur.fetchone()
        if row is not None:
            self.rejected_by_reason.update(json.loads(row[0]))
        async with self.db.execute(
            "SELECT state, count(*), coalesce(sum(size), 0) FROM outbox GROUP BY state"
        ) as cur:
            rows = list(await cur.fetchall())
        self.outbox = OutboxCounts(dict.fromkeys(OUTBOX_STATES, 0), 0)
        for state, count, size in rows:
            self.outbox.by_state[str(state)] = int(count)
            if state in PENDING_STATES:
                self.outbox.pending_bytes += int(size)

    async def _reload_state(self) -> None:
        async with self.db.execute("SELECT state FROM sessions") as cur:
            texts = [str(r[0]) for r in await cur.fetchall()]
        sessions = [json.loads(t) for t in texts]
        async with self.db.execute("SELECT value FROM meta WHERE key='global'") as cur:
            row = await cur.fetchone()
        global_ = json.loads(row[0]) if row else None
        self.state = State.load(sessions, global_)
        committed = CommittedSessions()
        for session, text in zip(sessions, texts, strict=True):
            committed.put(session["id"], session, text)
        self.committed_sessions = committed
        self.committed_global = global_ or self.state.global_dict()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        """Commit everything already handed over, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in list(self.subscribers):
            sub.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- producers -----------------------------------------------------------------------

    async def ingest(self, item: Frame | LinkEvent) -> None:
        """Hand over a received frame; waits while the buffer is full (back-pressure)."""
        while len(self._ingest) >= self.ingest_max:
            self._space.clear()
            await self._space.wait()
        self._ingest.append(item)
        self._frames_handed += 1
        self._idle.clear()
        self._wake.set()

    def ingest_nowait(self, item: Frame | LinkEvent) -> None:
        """For rare local records (link events): never blocks, may exceed the bound."""
        self._ingest.append(item)
        self._frames_handed += 1
        self._idle.clear()
        self._wake.set()

    @property
    def ingest_depth(self) -> int:
        return len(self._ingest)

    def _submit(self, item: _Control) -> None:
        if self.fatal is not None:
            raise StoreUnavailable(f"store stopped: {self.fatal}", "store_failed")
        if self._task is not None and self._task.done():
            # Nobody would ever answer: fail now instead of leaving the caller waiting.
            raise StoreUnavailable("store closed", "store_closed")
        self._control.append(item)
        self._idle.clear()
        self._wake.set()

    async def enqueue(self, messages: list[NewMessage]) -> list[EnqueueResult]:
        """Durably add messages to the outbox; returns only after the commit is on disk."""
        if self.fault is not None:
            raise StoreUnavailable(self.fault, self.fault_code or "store_unavailable")
        fut: asyncio.Future[list[EnqueueResult]] = asyncio.get_running_loop().create_future()
        self._submit(_Enqueue(messages, fut))
        return await fut

    def transition(
        self,
        ids: Sequence[int],
        to: str,
        *,
        reason: str | None = None,
        conn_id: int | None = None,
        wait: bool = False,
    ) -> asyncio.Future[list[int]] | None:
        """Record outbox progress (sent, delivered, expired, dead).

        With `wait`, returns a future resolved once the change is committed (it survives
        transient faults: it is retried, not failed); otherwise nothing to wait for.
        """
        if not ids:
            return None
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._submit(_Transition(list(ids), to, time.time(), reason, conn_id, future=fut))
        return fut

    async def cancel(self, message_id: int) -> bool:
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._submit(
            _Transition([message_id], "cancelled", time.time(), "cancelled by caller", future=fut)
        )
        return bool(await fut)

    async def connection_opened(self, url: str) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(_ConnOpened(url, time.time(), fut))
        return await fut

    def connection_closed(
        self,
        conn_id: int,
        *,
        code: int | None,
        reason: str | None,
        error: str | None,
        frames_in: int,
        frames_out: int,
    ) -> None:
        self._submit(_ConnClosed(conn_id, time.time(), code, reason, error, frames_in, frames_out))

    async def call(self, name: str, *args: Any) -> Any:
        """Run a maintenance job ("prune", "rebuild", "flush") inside the writer."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._submit(_Call(name, fut, args))
        return await fut

    async def flush(self) -> None:
        """Wait until everything handed over so far is committed; StoreUnavailable if not.

        Checking the queues is not enough: a batch the writer has already taken may still be
        in flight, and frames beyond one batch are committed after a control item submitted
        now. So: a control barrier, then wait for the frame counter.
        """
        target = self._frames_handed
        await self.call("flush")
        while self._frames_done < target:
            if self.fault is not None or self.fatal is not None or not self.running:
                raise StoreUnavailable(
                    self.fault or "store closed", self.fault_code or "store_unavailable"
                )
            self._progress.clear()
            await self._progress.wait()

    def subscribe(self, maxlen: int) -> Subscription:
        sub = Subscription(maxlen)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)
        sub.close()

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            # Whatever still waits will never be written by this writer: answer it now.
            leftover = list(self._control)
            self._control.clear()
            self._fail_control(
                leftover,
                StoreUnavailable(self.fault or "store closed", self.fault_code or "store_closed"),
            )
            self._idle.set()
            self._progress.set()

    async def _loop(self) -> None:
        retry_delay = 0.25
        pending_frames: list[Frame | LinkEvent] = []
        # After a batch failed on one item SQLite cannot store (an integer beyond 64 bits,
        # say), this many items are committed one per transaction to find the offender.
        isolate = 0
        while True:
            probe = False
            if not (self._ingest or self._control or pending_frames):
                self._idle.set()
                if self._stopping:
                    return
                if self.fault is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # A fault and nothing to retry: enqueue is refused while the fault lasts, so
                # nothing would ever find out that space came back. Probe on our own (the
                # failure path has just waited `retry_delay`, so this is not a busy loop).
                probe = True
            if (
                self.batch_delay > 0
                and not self._control
                and not pending_frames
                and len(self._ingest) < self.batch_max
                and not self._stopping
                and not probe
            ):
                # Only frames waiting: give the batch a moment to fill (fewer fsyncs).
                await asyncio.sleep(self.batch_delay)
            if isolate > 0 and not probe:
                control, frames = [], []
                if self._control:
                    control = [self._control.popleft()]
                elif pending_frames:
                    frames, pending_frames = pending_frames[:1], pending_frames[1:]
                elif self._ingest:
                    frames = [self._ingest.popleft()]
            else:
                control = [
                    self._control.popleft() for _ in range(min(len(self._control), self.batch_max))
                ]
                room = max(self.batch_max - len(control) - len(pending_frames), 0)
                frames = pending_frames + [
                    self._ingest.popleft() for _ in range(min(len(self._ingest), room))
                ]
                pending_frames = []
            if len(self._ingest) < self.ingest_max:
                self._space.set()
            try:
                if probe:
                    await self._probe_write()
                else:
                    await self._commit(frames, control)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                await self._rollback()
                self._progress.set()
                if _is_bad_data(exc):
                    if len(frames) + len(control) > 1:
                        log.warning("a batch could not be stored (%s); retrying item by item", exc)
                        self._control.extendleft(reversed(control))
                        pending_frames = frames + pending_frames
                        isolate = len(frames) + len(control)
                        continue
                    pending_frames = [self._unstorable(f, exc) for f in frames] + pending_frames
                    self._fail_control(
                        control,
                        StoreUnavailable(f"this request cannot be stored: {exc}", "unstorable"),
                    )
                    continue
                if is_corrupt(exc) or not is_transient(exc):
                    self.fatal = exc
                    self.fault = f"database error: {exc}"
                    self.fault_code = "store_failed"
                    log.error("database failure, stopping writes: %s", exc)
                    self._fail_control(control, StoreUnavailable(self.fault, "store_failed"))
                    return
                code = fault_code(exc)
                message = {"disk_full": "disk full", "read_only": "database is read-only"}.get(
                    code, "I/O error"
                )
                if self.fault is None:
                    log.error("cannot commit (%s: %s); ingest paused, retrying", message, exc)
                self.fault = f"{message}: {exc}"
                self.fault_code = code
                if code == "disk_full":
                    await self._checkpoint_for_space()
                # Callers waiting for an acknowledgement get an error now; nothing of theirs
                # was acknowledged. Received frames and bookkeeping are kept and retried.
                self._fail_control(control, StoreUnavailable(self.fault, code), keep_progress=True)
                pending_frames = frames + pending_frames
                if self._stopping and retry_delay > 2:
                    log.error(
                        "stopping with %d received frames uncommitted (%s)",
                        len(frames) + len(self._ingest),
                        self.fault,
                    )
                    return
                await asyncio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, 5.0)
                continue
            self._progress.set()
            if isolate > 0 and not probe:
                isolate -= 1
            if self.fault is not None:
                log.warning("database writable again; ingest resumed")
                self.fault = None
                self.fault_code = None
            retry_delay = 0.25

    @staticmethod
    def _unstorable(item: Frame | LinkEvent, exc: BaseException) -> Frame | LinkEvent:
        """The frame SQLite refused becomes a rejected frame: recorded with why, never fatal."""
        if isinstance(item, LinkEvent):
            return LinkEvent(item.type, {"error": "unstorable"}, item.received_at, item.conn_id)
        decoded = item.decoded
        text = decoded.text if isinstance(decoded, protocol.Event) else decoded.excerpt
        log.warning("rejected a frame SQLite cannot store: %s", exc)
        return Frame(
            protocol.Rejected(
                "unstorable", f"{type(exc).__name__}: {exc}", protocol.redact_excerpt(text[:200])
            ),
            item.received_at,
            item.conn_id,
        )

    def _fail_control(
        self, control: list[_Control], exc: Exception, *, keep_progress: bool = False
    ) -> None:
        kept: list[_Control] = []
        for item in control:
            if keep_progress and _bookkeeping(item):
                # Nobody can act on an error for it (the link would only die of one): retry
                # it with the next batch; a connection_opened() caller simply waits until the
                # store is writable again.
                kept.append(item)
                continue
            fut = getattr(item, "future", None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        # Back at the FRONT, in their order: a "delivered" submitted during the failure must
        # not overtake the "sent" it depends on (delivered only moves rows that are 'sent').
        self._control.extendleft(reversed(kept))

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error, ValueError):
            if self.db.in_transaction:
                await self.db.rollback()
        # The in-memory state ran ahead of the database: go back to what is committed. If
        # even that fails (I/O error), remember it: applying the retried frames on top of the
        # half-applied state would count them twice.
        self._needs_reload = True
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._reload_committed()

    async def _checkpoint_for_space(self) -> None:
        """On a full disk, copy the WAL into the database and truncate it.

        The WAL only grows until a commit triggers the automatic checkpoint (4000 pages); on a
        small disk it can fill the disk first, and then no commit ever succeeds to trigger
        it. Checkpointing here gives its space back (pages mostly overwrite existing ones in
        the database file), so the writer may recover even if nothing else frees space.
        """
        with contextlib.suppress(sqlite3.Error, ValueError):
            async with self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                await cur.fetchall()

    async def _reload_committed(self) -> None:
        await self._reload_state()
        async with self.db.execute("SELECT value FROM meta WHERE key='last_seq'") as cur:
            row = await cur.fetchone()
        self.last_seq = int(row[0]) if row else 0
        self._needs_reload = False

    async def _probe_write(self) -> None:
        """A write that needs room in the WAL like any real one, and leaves nothing behind."""
        await self.db.execute("BEGIN IMMEDIATE")
        await self.db.execute("INSERT OR REPLACE INTO meta VALUES ('write_probe', '1')")
        await self.db.execute("DELETE FROM meta WHERE key='write_probe'")
        await self.db.commit()

    async def _commit(self, frames: list[Frame | LinkEvent], control: list[_Control]) -> None:
        started = time.perf_counter()
        if self._needs_reload:
            await self._reload_committed()
        state = self.state
        seq = self.last_seq
        event_rows: list[tuple[Any, ...]] = []
        rejected_rows: list[tuple[Any, ...]] = []
        published: list[Committed] = []
        touched: set[int] = set()
        rejected_new: collections.Counter[str] = collections.Counter()
        for item in frames:
            if isinstance(item, LinkEvent):
                seq += 1
                body = _dumps({"type": item.type, **item.body})
                event_rows.append(
                    (seq, item.received_at, item.conn_id, "link", item.type, None, None, body)
                )
                published.append(Committed(seq, "link", item.type, None, item.received_at, body))
                continue
            decoded = item.decoded
            if isinstance(decoded, protocol.Rejected):
                rejected_rows.append(
                    (
                        item.received_at,
                        item.conn_id,
                        decoded.reason,
                        decoded.detail,
                        decoded.excerpt,
                    )
                )
                rejected_new[decoded.reason] += 1
                continue
            seq += 1
            result = apply(state, decoded, seq, item.received_at)
            touched.update(result.session_ids)
            event_rows.append(
                (
                    seq,
                    item.received_at,
                    item.conn_id,
                    "event",
                    decoded.type,
                    decoded.session_id,
                    decoded.invalid,
                    decoded.text,
                )
            )
            if self.subscribers:
                published.append(
                    Committed(
                        seq,
                        "event",
                        decoded.type,
                        decoded.session_id,
                        item.received_at,
                        decoded.text,
                    )
                )

        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        if event_rows:
            await db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", event_rows)
        if rejected_rows:
            await db.executemany(
                "INSERT INTO rejected_frames (received_at, conn_id, reason, detail, excerpt) "
                "VALUES (?,?,?,?,?)",
                rejected_rows,
            )
        session_dicts: dict[int, dict[str, Any]] = {}
        session_texts: dict[int, str] = {}
        if touched:
            for sid in touched:
                session = state.sessions.get(sid)
                if session is not None:
                    session_dicts[sid] = session.to_dict()
                    session_texts[sid] = _dumps(session_dicts[sid])
            await db.executemany(
                "INSERT INTO sessions (id, state, updated_seq) VALUES (?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET state=excluded.state, "
                "updated_seq=excluded.updated_seq",
                [(sid, text, seq) for sid, text in session_texts.items()],
            )
        global_dict: dict[str, Any] | None = None
        if event_rows:
            global_dict = state.global_dict()
            await db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("global", _dumps(global_dict)),
                    ("last_seq", str(seq)),
                ],
            )
        batch = _BatchDelta(collections.Counter(), 0, seq)
        results: list[tuple[Any, Any]] = []
        for ctl_item in control:
            res, d_state, d_bytes = await self._apply_control(ctl_item, batch)
            results.append((ctl_item, res))
            for key, value in d_state.items():
                batch.states[key] += value
            batch.pending_bytes += d_bytes
        await db.commit()

        # Durable: now publish and acknowledge.
        self.last_seq = seq
        if self.first_seq == 0 and event_rows:
            self.first_seq = event_rows[0][0]
        if batch.rebuilt is not None:
            # A rebuild in this batch replayed the log including this batch's events: its
            # state replaces the incrementally applied one (only now that it is committed).
            self.state, self.committed_sessions, self.committed_global = batch.rebuilt
        else:
            for sid, d in session_dicts.items():
                self.committed_sessions.put(sid, d, session_texts[sid])
            if global_dict is not None:
                self.committed_global = global_dict
        self.rejected_by_reason.update(rejected_new)
        for key, value in batch.states.items():
            self.outbox.by_state[key] = self.outbox.by_state.get(key, 0) + value
        self.outbox.pending_bytes += batch.pending_bytes
        for sub in list(self.subscribers):
            for record in published:
                sub.push(record)
        enqueued = False
        for item, res in results:
            fut = getattr(item, "future", None)
            if fut is not None and not fut.done():
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
            if isinstance(item, _Enqueue) and not isinstance(res, BaseException):
                enqueued = True
            if isinstance(item, _Call) and item.name == "prune" and isinstance(res, dict):
                self.first_seq = max(self.first_seq, int(res["first_seq"]))
        if enqueued:
            self.outbox_changed.set()
        self._frames_done += len(frames)
        self.batches += 1
        self.last_batch_size = len(frames) + len(control)
        self.last_commit_seconds = time.perf_counter() - started
        if self.commit_observer is not None:
            # Metrics only: a bug there must not be taken for a database failure (which
            # would stop all writes) after everything was committed and acknowledged.
            try:
                self.commit_observer(self.last_batch_size, self.last_commit_seconds)
            except Exception:
                log.exception("commit observer failed")

    async def _apply_control(
        self, item: _Control, batch: _BatchDelta
    ) -> tuple[Any, dict[str, int], int]:
        """Execute one control item inside the open transaction.

        Returns (result or exception for the waiter, outbox state deltas, pending byte delta).
        """
        db = self.db
        if isinstance(item, _Enqueue):
            # No savepoint here (it would cost two more round trips per acknowledged message):
            # every refusal (conflict, full, duplicate key) is decided before the first INSERT.
            return await self._enqueue_rows(item.messages, batch)
        if isinstance(item, _Call):
            # Maintenance jobs can fail on their own (a bug in a replay, a job that gives up
            # half-way): a savepoint confines that to their caller instead of failing the
            # whole batch and everybody else's acknowledgement. Disk full, I/O errors and
            # corruption still abort the whole transaction: retried or fatal for everyone.
            await db.execute("SAVEPOINT item")
            try:
                result = await self._run_call(item, batch)
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) and (is_transient(exc) or is_corrupt(exc)):
                    raise
                log.warning("writer job %s failed: %r", type(item).__name__, exc)
                await db.execute("ROLLBACK TO item")
                await db.execute("RELEASE item")
                return exc, {}, 0
            if isinstance(result[0], BaseException):
                await db.execute("ROLLBACK TO item")
            await db.execute("RELEASE item")
            return result
        if isinstance(item, _Transition):
            return await self._transition_rows(item)
        if isinstance(item, _ConnOpened):
            cur = await db.execute(
                "INSERT INTO connections (url, opened_at) VALUES (?, ?)", (item.url, item.at)
            )
            return int(cur.lastrowid or 0), {}, 0
        if isinstance(item, _ConnClosed):
            await db.execute(
                "UPDATE connections SET closed_at=?, close_code=?, close_reason=?, error=?, "
                "frames_in=?, frames_out=? WHERE id=?",
                (
                    item.at,
                    item.code,
                    item.reason,
                    item.error,
                    item.frames_in,
                    item.frames_out,
                    item.conn_id,
                ),
            )
            return None, {}, 0
        raise TypeError(f"unknown control item {item!r}")  # pragma: no cover

    async def _enqueue_rows(
        self, messages: list[NewMessage], batch: _BatchDelta
    ) -> tuple[Any, dict[str, int], int]:
        db = self.db
        now = time.time()
        results: list[EnqueueResult] = []
        new_rows: list[NewMessage] = []
        keys = [m.idem_key for m in messages if m.idem_key is not None]
        if len(keys) != len(set(keys)):
            return ValueError("the same Idempotency-Key twice in one request"), {}, 0
        for msg in messages:
            if msg.idem_key is not None:
                async with db.execute(
                    "SELECT id, state, idem_hash FROM outbox WHERE idem_key=?", (msg.idem_key,)
                ) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    if row[2] != msg.idem_hash:
                        return (
                            IdempotencyConflict(
                                f"Idempotency-Key {msg.idem_key!r} was used for a different "
                                f"message (id {row[0]})"
                            ),
                            {},
                            0,
                        )
                    results.append(EnqueueResult(int(row[0]), str(row[1]), False))
                    continue
            new_rows.append(msg)
            results.append(EnqueueResult(0, "queued", True))
        # The limits count what earlier items of this same batch added (or finished):
        # otherwise many concurrent enqueues committed together could all pass the check.
        pending = self.outbox.pending + sum(batch.states.get(s, 0) for s in PENDING_STATES)
        if pending + len(new_rows) > self.max_messages:
            return (
                OutboxFull(
                    f"outbox full: {pending} pending messages, limit {self.max_messages} "
                    "(outbox.max_messages)",
                    "outbox_full_messages",
                ),
                {},
                0,
            )
        added_bytes = sum(len(m.body.encode()) for m in new_rows)
        pending_bytes = self.outbox.pending_bytes + batch.pending_bytes
        if new_rows and pending_bytes + added_bytes > self.max_bytes:
            return (
                OutboxFull(
                    f"outbox full: {pending_bytes} pending bytes + {added_bytes}, "
                    f"limit {self.max_bytes} (outbox.max_bytes)",
                    "outbox_full_bytes",
                ),
                {},
                0,
            )
        ids: Iterator[int] = iter([])
        insert = (
            "INSERT INTO outbox (type, body, size, state, created_at, updated_at, "
            "expires_at, caller_uid, idem_key, idem_hash) VALUES (?,?,?,'queued',?,?,?,?,?,?)"
        )
        rows = [
            (
                m.type,
                m.body,
                len(m.body.encode()),
                now,
                now,
                m.expires_at,
                m.caller_uid,
                m.idem_key,
                m.idem_hash,
            )
            for m in new_rows
        ]
        if len(rows) == 1:  # the common case: one round trip to the writer thread, not two
            cur = await db.execute(insert, rows[0])
            ids = iter([int(cur.lastrowid or 0)])
        elif rows:
            await db.executemany(insert, rows)
            # Rowids of one statement in one transaction are consecutive (max(rowid) + 1 each).
            async with db.execute("SELECT last_insert_rowid()") as cur:
                row = await cur.fetchone()
            last = int(row[0]) if row else 0
            ids = iter(range(last - len(rows) + 1, last + 1))
        for result in results:
            if result.created:
                result.id = next(ids)
        return results, {"queued": len(new_rows)}, added_bytes

    async def _transition_rows(self, item: _Transition) -> tuple[Any, dict[str, int], int]:
        db = self.db
        marks = ",".join("?" * len(item.ids))
        sources = {
            "sent": ("queued", "sent"),
            "delivered": ("sent",),
            "expired": PENDING_STATES,
            "dead": PENDING_STATES,
            "cancelled": PENDING_STATES,
        }[item.to]
        async with db.execute(
            f"SELECT id, state, size FROM outbox WHERE id IN ({marks})", item.ids
        ) as cur:
            rows = [(int(r[0]), str(r[1]), int(r[2])) for r in await cur.fetchall()]
        moving = [r for r in rows if r[1] in sources]
        delta: dict[str, int] = collections.Counter()
        bytes_delta = 0
        for _id, old, size in moving:
            delta[old] -= 1
            delta[item.to] += 1
            if item.to not in PENDING_STATES:
                bytes_delta -= size
        if moving:
            params = [m[0] for m in moving]
            pm = ",".join("?" * len(params))
            if item.to == "sent":
                await db.execute(
                    f"UPDATE outbox SET state='sent', attempts=attempts+1, sent_at=?, "
                    f"updated_at=?, conn_id=? WHERE id IN ({pm})",
                    [item.at, item.at, item.conn_id, *params],
                )
            elif item.to == "delivered":
                await db.execute(
                    f"UPDATE outbox SET state='delivered', delivered_at=?, updated_at=? "
                    f"WHERE id IN ({pm})",
                    [item.at, item.at, *params],
                )
            else:
                await db.execute(
                    f"UPDATE outbox SET state=?, last_error=?, updated_at=? WHERE id IN ({pm})",
                    [item.to, item.reason, item.at, *params],
                )
        return [m[0] for m in moving], delta, bytes_delta

    async def _run_call(self, item: _Call, batch: _BatchDelta) -> tuple[Any, dict[str, int], int]:
        if item.name == "flush":
            return None, {}, 0
        if item.name == "rebuild":
            return await self._rebuild_rows(batch), {}, 0
        if item.name == "prune":
            return await self._prune_rows(*item.args)
        return ValueError(f"unknown writer call {item.name!r}"), {}, 0

    # -- maintenance -----------------------------------------------------------------------

    async def _rebuild_rows(self, batch: _BatchDelta) -> dict[str, Any]:
        """Replay the whole event log into fresh state (inside the current transaction).

        The new state is installed by `_commit` once the transaction is durable (until then
        readers keep seeing the committed state).
        """
        fresh = State()
        count = 0
        last_received = None
        async with self.db.execute(
            "SELECT seq, received_at, body FROM events WHERE kind='event' ORDER BY seq"
        ) as cur:
            while True:
                rows = await cur.fetchmany(2000)
                if not rows:
                    break
                for seq, received_at, body in rows:
                    decoded = protocol.decode(body, max_bytes=1 << 62)
                    if isinstance(decoded, protocol.Event):
                        apply(fresh, decoded, int(seq), float(received_at))
                        count += 1
                        last_received = received_at
                await asyncio.sleep(0)  # let the API breathe during a long replay
        await self.db.execute("DELETE FROM sessions")
        committed = CommittedSessions()
        for sid, session in fresh.sessions.items():
            as_dict = session.to_dict()
            committed.put(sid, as_dict, _dumps(as_dict))
        await self.db.executemany(
            "INSERT INTO sessions (id, state, updated_seq) VALUES (?,?,?)",
            [(sid, text, batch.seq) for sid, text in committed.texts.items()],
        )
        global_dict = fresh.global_dict()
        await self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('global', ?)", (_dumps(global_dict),)
        )
        batch.rebuilt = (fresh, committed, global_dict)
        return {
            "events_replayed": count,
            "sessions": len(fresh.sessions),
            "last_received_at": last_received,
        }

    async def prune(
        self,
        *,
        retention_days: float,
        max_events: int,
        step: int = 2000,
        max_rejected: int = 100_000,
    ) -> int:
        """Delete one small step of old records; returns rows deleted (0: nothing to do).

        Small steps keep each transaction short, so ingest never stalls behind retention.
        Pending outbox messages are never touched.
        """
        if self.fault is not None or self.fatal is not None:
            return 0
        result = await self.call("prune", retention_days, max_events, step, max_rejected)
        return int(result["deleted"])

    async def _prune_rows(
        self, retention_days: float, max_events: int, step: int, max_rejected: int
    ) -> tuple[Any, dict[str, int], int]:
        """One retention step; returns ({"deleted", "first_seq"}, outbox deltas, 0)."""
        db = self.db
        deleted = 0
        first_seq = self.first_seq
        limit_seq = 0
        if max_events > 0:
            limit_seq = self.last_seq - max_events
        cutoff = time.time() - retention_days * 86400 if retention_days > 0 else None
        if cutoff is not None:
            # Only look at the oldest `step` rows: seq order is arrival order.
            async with db.execute(
                "SELECT max(seq) FROM (SELECT seq, received_at FROM events WHERE seq >= ? "
                "ORDER BY seq LIMIT ?) WHERE received_at < ?",
                (first_seq, step, cutoff),
            ) as cur:
                row = await cur.fetchone()
            if row and row[0]:
                limit_seq = max(limit_seq, int(row[0]))
        if first_seq > 0 and limit_seq >= first_seq:
            upto = min(limit_seq, first_seq + step - 1)
            cur = await db.execute("DELETE FROM events WHERE seq <= ?", (upto,))
            deleted += max(cur.rowcount, 0)
            first_seq = upto + 1
        # Rejected frames: keep a bounded sample; their counts survive in meta.
        async with db.execute("SELECT count(*) FROM rejected_frames") as cur:
            row = await cur.fetchone()
        excess = (int(row[0]) if row else 0) - max_rejected
        if excess > 0:
            n = min(excess, step)
            async with db.execute(
                "SELECT reason, count(*) FROM (SELECT reason FROM rejected_frames ORDER BY id "
                "LIMIT ?) GROUP BY reason",
                (n,),
            ) as cur:
                gone = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
            async with db.execute("SELECT value FROM meta WHERE key='rejected_pruned'") as cur:
                row = await cur.fetchone()
            total = collections.Counter(json.loads(row[0]) if row else {})
            total.update(gone)
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('rejected_pruned', ?)", (json.dumps(total),)
            )
            cur = await db.execute(
                "DELETE FROM rejected_frames WHERE id IN (SELECT id FROM rejected_frames "
                "ORDER BY id LIMIT ?)",
                (n,),
            )
            deleted += max(cur.rowcount, 0)
        # Finished outbox messages (never pending ones) age out like events.
        delta: dict[str, int] = collections.Counter()
        if cutoff is not None:
            # Never the newest row, whatever its state: outbox ids are rowids without
            # AUTOINCREMENT, so deleting the highest one would hand its id to the next
            # message, and an id a caller was given must never name another message.
            async with db.execute(
                "SELECT id, state FROM outbox WHERE state IN "
                "('delivered','expired','dead','cancelled') AND updated_at < ? "
                "AND id < (SELECT max(id) FROM outbox) ORDER BY id LIMIT ?",
                (cutoff, step),
            ) as cur:
                old = [(int(r[0]), str(r[1])) for r in await cur.fetchall()]
            if old:
                ids = [r[0] for r in old]
                await db.execute(
                    f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids
                )
                for _id, state in old:
                    delta[state] -= 1
                deleted += len(old)
        return {"deleted": deleted, "first_seq": first_seq}, delta, 0


def rows_to_dicts(rows: Iterable[sqlite3.Row]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def _is_bad_data(exc: BaseException) -> bool:
    """Errors caused by one item's values (not by the database): isolate, never fatal."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError)):
        return True
    return isinstance(exc, (OverflowError, UnicodeEncodeError, TypeError)) and not isinstance(
        exc, sqlite3.Error
    )
