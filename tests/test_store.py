"""The store: schema and refusals, group commit, one transaction per batch, durable
acknowledgement, outbox bookkeeping, retention, faults (injected and real) and the offline
rebuild.

In-process tests drive `Store` directly; the daemon-level ones run a real `kimi-syncd`
process. Real faults use what root can do on this VM: a size-limited tmpfs for a full disk
and a read-only tmpfs for a read-only state directory (skipped, with the reason, where
mounting is not permitted). Nothing asserts on speed: group commit is asserted as a count of
transactions, which the writer's design makes deterministic when all work is handed over in
one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, SimProcess, free_port, settings_for

from kimi_syncd import protocol
from kimi_syncd.config import Settings
from kimi_syncd.errors import EX_CANTCREAT, EX_DATAERR, EX_TEMPFAIL, FatalError
from kimi_syncd.sim import Scenario
from kimi_syncd.state import State, replay
from kimi_syncd.store import (
    Frame,
    IdempotencyConflict,
    NewMessage,
    OutboxFull,
    Store,
    StoreUnavailable,
)
from kimi_syncd.store.schema import APPLICATION_ID, SCHEMA_VERSION
from kimi_syncd.store.writer import OUTBOX_STATES, Writer

# ---------------------------------------------------------------------------------------
# helpers


def scenario_frames(seed: int, n: int, *, received_at: float | None = None) -> list[Frame]:
    """`n` realistic frames from the simulator's seeded model (with an init now and then)."""
    sc = Scenario(seed=seed)
    now = time.time() if received_at is None else received_at
    out = []
    for i in range(n):
        frame = sc.init_frame() if i % 97 == 0 and sc.active_session_id else sc.next_frame()
        text = json.dumps(frame, separators=(",", ":"))
        out.append(Frame(protocol.decode(text), now, None))
    return out


def rejected(reason: str, n: int) -> list[Frame]:
    return [Frame(protocol.Rejected(reason, "test", f"x{i}"), time.time(), None) for i in range(n)]


def msg(body: dict[str, Any] | None = None, *, key: str | None = None) -> NewMessage:
    text = json.dumps(body or {"type": "t", "n": random.random()}, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest() if key else None
    return NewMessage("t", text, None, 0, key, digest)


async def feed(writer: Writer, frames: list[Frame]) -> None:
    for f in frames:
        await writer.ingest(f)


async def db_sessions(store: Store) -> dict[int, dict[str, Any]]:
    rows = await store.reader.fetchall("SELECT id, state FROM sessions")
    return {int(r[0]): json.loads(r[1]) for r in rows}


async def replayed(store: Store) -> State:
    """state.replay over the stored log: what a rebuild must produce."""
    rows = await store.reader.fetchall(
        "SELECT seq, received_at, body FROM events WHERE kind='event' ORDER BY seq"
    )
    events = []
    for seq, received_at, body in rows:
        ev = protocol.decode(body, max_bytes=1 << 40)
        assert isinstance(ev, protocol.Event)
        events.append((int(seq), float(received_at), ev))
    return replay(events)


async def assert_state_consistent(store: Store) -> None:
    """Incremental state == the sessions table == a replay of the stored events."""
    w = store.writer
    fresh = await replayed(store)
    expected = {sid: s.to_dict() for sid, s in fresh.sessions.items()}
    assert w.committed_sessions == expected
    assert await db_sessions(store) == expected
    assert {sid: s.to_dict() for sid, s in w.state.sessions.items()} == expected
    assert w.committed_global == fresh.global_dict() or not expected
    row = await store.reader.fetchone("SELECT max(seq) FROM events")
    assert w.last_seq == (row[0] or 0 if row else 0)


async def outbox_counts_db(store: Store) -> tuple[dict[str, int], int]:
    rows = await store.reader.fetchall("SELECT state, count(*) FROM outbox GROUP BY state")
    counts = dict.fromkeys(OUTBOX_STATES, 0)
    counts.update({str(r[0]): int(r[1]) for r in rows})
    row = await store.reader.fetchone(
        "SELECT coalesce(sum(size), 0) FROM outbox WHERE state IN ('queued','sent')"
    )
    return counts, int(row[0]) if row else 0


def full_error() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = 13  # type: ignore[attr-defined]  # SQLITE_FULL
    return exc


class CommitFaults:
    """Fault injection at the store boundary: the next `n` COMMITs fail like SQLITE_FULL."""

    def __init__(self, writer: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.remaining = 0
        self.failed = 0
        self.entered = asyncio.Event()  # a failing COMMIT has started
        self.gate: asyncio.Event | None = None  # when set: the failing COMMIT waits for it
        real = writer.db.commit

        async def commit() -> None:
            if self.remaining > 0:
                self.remaining -= 1
                self.failed += 1
                self.entered.set()
                if self.gate is not None:
                    await self.gate.wait()
                raise full_error()
            await real()

        monkeypatch.setattr(writer.db, "commit", commit)


async def until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def flush_through_faults(w: Writer) -> None:
    """flush() until it succeeds: it fails (like any waiter) while injected faults last."""
    for _ in range(100):
        try:
            await w.flush()
        except StoreUnavailable:
            await until(lambda: w.fault is None, what="recovery")
        else:
            return
    raise AssertionError("flush never succeeded")


@pytest.fixture
async def open_store(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Open stores on the test's directory; every one still open is closed at the end."""
    opened: list[Store] = []

    async def make(**sections: dict[str, Any]) -> Store:
        s = make_settings(**sections)
        st = await Store.open(s.store, s.outbox)
        opened.append(st)
        return st

    yield make
    for st in opened:
        with contextlib.suppress(Exception):
            await st.close()


# ---------------------------------------------------------------------------------------
# schema, pragmas, refusals


async def test_new_database_schema_and_pragmas(store: Store) -> None:
    db = store.writer.db
    for pragma, expected in (
        ("user_version", SCHEMA_VERSION),
        ("application_id", APPLICATION_ID),
        ("journal_mode", "wal"),
        ("synchronous", 2),  # FULL: the WAL is fsynced at every commit
    ):
        async with db.execute(f"PRAGMA {pragma}") as cur:
            row = await cur.fetchone()
        assert row is not None and row[0] == expected, pragma
    tables = {r[0] for r in await store.reader.fetchall("SELECT name FROM sqlite_master")}
    assert {"events", "rejected_frames", "sessions", "meta", "outbox", "connections"} <= tables


async def test_empty_file_is_migrated(make_settings: Callable[..., Settings]) -> None:
    s = make_settings()
    s.store.state_dir.mkdir(parents=True)
    s.store.db_path.touch()  # a zero-byte file is an empty SQLite database
    st = await Store.open(s.store, s.outbox)
    await st.close()
    with contextlib.closing(sqlite3.connect(s.store.db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _foreign_with_tables(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (x)")
        conn.execute("INSERT INTO notes VALUES ('mine')")
        conn.commit()


def _foreign_with_user_version(path: Path) -> None:
    # Another program that versions its schema with user_version but sets no application_id:
    # user_version 1 must not be taken for our schema version 1.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE events (x)")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.commit()


def _foreign_app_id(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA application_id=1234")
        conn.execute("CREATE TABLE t (x)")
        conn.commit()


@pytest.mark.parametrize(
    "make_file", [_foreign_with_tables, _foreign_with_user_version, _foreign_app_id]
)
async def test_foreign_sqlite_file_refused_untouched(
    make_settings: Callable[..., Settings], make_file: Callable[[Path], None]
) -> None:
    s = make_settings()
    s.store.state_dir.mkdir(parents=True)
    make_file(s.store.db_path)
    before = s.store.db_path.read_bytes()
    with pytest.raises(FatalError) as info:
        await Store.open(s.store, s.outbox)
    assert info.value.exit_code == EX_DATAERR
    assert "not a kimi-syncd database" in str(info.value)
    assert s.store.db_path.read_bytes() == before
    assert not Path(f"{s.store.db_path}-wal").exists()


async def test_newer_schema_refused_untouched(make_settings: Callable[..., Settings]) -> None:
    s = make_settings()
    st = await Store.open(s.store, s.outbox)
    await st.close()
    with contextlib.closing(sqlite3.connect(s.store.db_path)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.commit()
    before = s.store.db_path.read_bytes()
    with pytest.raises(FatalError) as info:
        await Store.open(s.store, s.outbox)
    assert info.value.exit_code == EX_DATAERR
    assert "newer" in str(info.value)
    assert s.store.db_path.read_bytes() == before


async def test_one_writer_per_database(make_settings: Callable[..., Settings]) -> None:
    """A second writer (daemon or offline rebuild) on the same file is refused."""
    s = make_settings()
    first = await Store.open(s.store, s.outbox)
    try:
        with pytest.raises(FatalError) as info:
            await Store.open(s.store, s.outbox)
        assert info.value.exit_code == EX_TEMPFAIL
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        await first.close()
    second = await Store.open(s.store, s.outbox)  # released on close
    await second.close()


# ---------------------------------------------------------------------------------------
# group commit, one transaction, incremental == replay


async def test_group_commit_many_items_few_transactions(store: Store) -> None:
    w = store.writer
    frames = scenario_frames(1, 4000)
    before = w.batches
    results = await asyncio.gather(
        *(w.enqueue([msg()]) for _ in range(400)),
        feed(w, frames),
    )
    await w.flush()
    ids = [r[0].id for r in results[:400]]
    assert len(set(ids)) == 400
    batches = w.batches - before
    items = 400 + len(frames)
    print(f"group commit: {items} items in {batches} transactions")
    # batch_max is 1000: 4400 items handed over at once fit in a handful of transactions.
    assert batches <= 10, batches
    await assert_state_consistent(store)


async def test_group_commit_under_concurrent_callers(store: Store) -> None:
    """Callers that each wait for their acknowledgement still share transactions."""
    w = store.writer

    async def caller() -> None:
        for _ in range(25):
            await w.enqueue([msg()])

    before = w.batches
    await asyncio.gather(*(caller() for _ in range(20)))
    batches = w.batches - before
    print(f"group commit: 500 sequential-per-caller enqueues in {batches} transactions")
    assert batches < 500 / 2, batches


async def test_failed_commit_keeps_events_sessions_and_outbox_together(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of frames + an enqueue is one transaction: a failure leaves none of it, and
    the in-memory state goes back to what is committed; the retry commits all of it."""
    w = store.writer
    await feed(w, scenario_frames(2, 300))
    await w.flush()
    await assert_state_consistent(store)
    n_events = w.last_seq
    sessions_before = await db_sessions(store)
    faults = CommitFaults(w, monkeypatch)
    faults.remaining = 1
    frames = scenario_frames(3, 200)
    enq = asyncio.ensure_future(w.enqueue([msg()]))
    await feed(w, frames)
    with pytest.raises(StoreUnavailable) as info:
        await enq
    assert info.value.code == "disk_full"
    # Rolled back as a whole, and the in-memory state follows the database.
    assert w.fault_code == "disk_full"
    row = await store.reader.fetchone("SELECT count(*), max(seq) FROM events")
    assert row is not None and row[1] == n_events
    assert await db_sessions(store) == sessions_before
    assert (await outbox_counts_db(store))[0]["queued"] == 0
    assert w.committed_sessions == sessions_before
    assert {sid: s.to_dict() for sid, s in w.state.sessions.items()} == sessions_before
    # The received frames were kept and are committed by the retry: nothing lost.
    await until(lambda: w.fault is None, what="recovery")
    await w.flush()
    assert w.last_seq == n_events + sum(isinstance(f.decoded, protocol.Event) for f in frames)
    await assert_state_consistent(store)
    [res] = await w.enqueue([msg()])
    assert res.created


async def test_state_equals_replay_through_random_faults(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    w = store.writer
    faults = CommitFaults(w, monkeypatch)
    real_reload = w._reload_committed
    reload_failures = [0]

    async def flaky_reload() -> None:
        # The reload after a rollback may itself fail (I/O error): the next attempt must
        # reload first instead of applying the retried frames a second time.
        if reload_failures[0] > 0:
            reload_failures[0] -= 1
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = 10  # type: ignore[attr-defined]
            raise exc
        await real_reload()

    monkeypatch.setattr(w, "_reload_committed", flaky_reload)
    scenario = scenario_frames(seed, 3000)
    pos = 0
    for _ in range(12):
        n = rng.randint(20, 400)
        faults.remaining = rng.choice([0, 0, 1, 2])
        reload_failures[0] = rng.choice([0, 1])
        await feed(w, scenario[pos : pos + n])
        pos += n
        await flush_through_faults(w)
        await assert_state_consistent(store)
        rebuilt = await w.call("rebuild")
        assert rebuilt["sessions"] == len(w.committed_sessions)
        await assert_state_consistent(store)
    counters = w.committed_global["counters"]
    assert sum(counters.values()) == w.last_seq  # nothing applied twice
    assert faults.failed > 0


async def test_rebuild_in_the_same_batch_as_frames(store: Store) -> None:
    w = store.writer
    await feed(w, scenario_frames(4, 300))
    more = scenario_frames(5, 300)
    call = asyncio.ensure_future(w.call("rebuild"))
    await feed(w, more)
    await call
    await w.flush()
    await assert_state_consistent(store)
    assert w.committed_global == w.state.global_dict()


async def test_flush_waits_for_frames_beyond_one_batch(
    open_store: Callable[..., Any],
) -> None:
    st: Store = await open_store(store={"batch_max": 50})
    frames = scenario_frames(6, 1000)
    await feed(st.writer, frames)
    await st.writer.flush()
    row = await st.reader.fetchone("SELECT count(*) FROM events")
    assert row is not None and row[0] == 1000


async def test_reads_never_wait_for_the_writer(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write transaction held open (with uncommitted rows) blocks no reader query."""
    w = store.writer
    await feed(w, scenario_frames(7, 200))
    [acked] = await w.enqueue([msg()])
    await w.flush()
    entered, release = asyncio.Event(), asyncio.Event()
    real = w._run_call

    async def run_call(item: Any, batch: Any) -> Any:
        if item.name == "hold":
            await w.db.execute("INSERT INTO meta VALUES ('uncommitted', 'x')")
            await w.db.execute("DELETE FROM outbox")
            entered.set()
            await release.wait()
            # Fail the job: its savepoint is rolled back, the rest of the batch commits.
            return RuntimeError("held"), {}, 0
        return await real(item, batch)

    monkeypatch.setattr(w, "_run_call", run_call)
    # busy_timeout 0: a reader that had to wait for a lock would fail at once.
    for conn in store.reader._all:
        await conn.execute("PRAGMA busy_timeout=0")
    hold = asyncio.ensure_future(w.call("hold"))
    await entered.wait()
    assert w.db.in_transaction
    await feed(w, scenario_frames(8, 50))  # more work queues up behind the long transaction
    for _ in range(20):
        rows = await store.reader.events(since=0, limit=1000)
        assert len(rows) == 200
        assert await store.reader.outbox_get(acked.id) is not None
        assert await store.reader.fetchone("SELECT 1 FROM meta WHERE key='uncommitted'") is None
        assert (await store.reader.integrity_check()) == ["ok"]
    release.set()
    with pytest.raises(RuntimeError):
        await hold
    await w.flush()
    assert await store.reader.outbox_get(acked.id) is not None
    assert (await store.reader.fetchone("SELECT count(*) FROM events"))[0] == 250  # type: ignore[index]


async def test_a_cancelled_read_leaves_no_stale_snapshot(open_store: Callable[..., Any]) -> None:
    """A query cancelled mid-flight (an API client hangs up, the link's connection drops
    while it reads the outbox) must not leave its connection on an old snapshot: later
    reads would see messages as still pending (and the link would send them again)."""
    st: Store = await open_store()
    await st.reader.close()
    st.reader = type(st.reader)(st.db_path, 1)  # one connection: every read reuses it
    await st.reader.open()
    w = st.writer
    stale = 0
    for attempt in range(30):
        ids = [r.id for r in await w.enqueue([msg() for _ in range(300)])]
        task = asyncio.ensure_future(st.reader.outbox_pending(0, 100_000))
        for _ in range(attempt % 6):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        w.transition(ids, "cancelled")
        await w.flush()
        rows = await st.reader.outbox_pending(0, 100_000)
        stale += bool({r["id"] for r in rows} & set(ids))
    assert stale == 0, f"{stale} of 30 reads after a cancelled one saw an old snapshot"
    assert await st.reader.integrity_check() == ["ok"]


# ---------------------------------------------------------------------------------------
# outbox


async def test_idempotency_keys(store: Store) -> None:
    w = store.writer
    [a] = await w.enqueue([msg({"type": "t", "v": 1}, key="k1")])
    [b] = await w.enqueue([msg({"type": "t", "v": 1}, key="k1")])
    assert a.created and not b.created and a.id == b.id
    with pytest.raises(IdempotencyConflict):
        await w.enqueue([msg({"type": "t", "v": 2}, key="k1")])
    # Concurrent duplicates committed in one batch still get one message.
    results = await asyncio.gather(
        *(w.enqueue([msg({"type": "t", "v": 3}, key="k3")]) for _ in range(5))
    )
    assert len({r[0].id for r in results}) == 1
    assert sum(r[0].created for r in results) == 1
    # The same key twice in one request is refused on its own, not with the whole batch.
    other = asyncio.ensure_future(w.enqueue([msg()]))
    with pytest.raises(ValueError):
        await w.enqueue([msg({"type": "t"}, key="dup"), msg({"type": "t"}, key="dup")])
    assert (await other)[0].created
    counts, _ = await outbox_counts_db(store)
    assert counts["queued"] == w.outbox.by_state["queued"] == 3


async def test_outbox_bounds(open_store: Callable[..., Any]) -> None:
    st: Store = await open_store(outbox={"max_messages": 10, "max_bytes": 2048})
    w = st.writer
    # Concurrent enqueues committed together must not all pass the limit check.
    results = await asyncio.gather(
        *(w.enqueue([msg({"type": "t", "i": i})]) for i in range(25)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    full = [r for r in results if isinstance(r, OutboxFull)]
    assert len(ok) == 10 and len(full) == 15
    assert {e.code for e in full} == {"outbox_full_messages"}
    assert w.outbox.pending == 10
    # Finishing messages makes room again.
    w.transition([ok[0][0].id, ok[1][0].id], "cancelled")
    await w.flush()
    await w.enqueue([msg()])
    # Bytes: a big body hits max_bytes (counted within one batch too).
    w.max_messages = 1000
    big = {"type": "t", "pad": "x" * 300}
    results = await asyncio.gather(
        *(w.enqueue([msg(big)]) for _ in range(10)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, OutboxFull)]
    assert errors and {e.code for e in errors} == {"outbox_full_bytes"}
    assert w.outbox.pending_bytes <= 2048
    counts, pending_bytes = await outbox_counts_db(st)
    assert counts == w.outbox.by_state and pending_bytes == w.outbox.pending_bytes


async def test_outbox_counts_after_random_transitions(
    open_store: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    st: Store = await open_store()
    w = st.writer
    ids: list[int] = []
    for _ in range(60):
        r = await w.enqueue(
            [msg({"type": "t", "pad": "y" * rng.randint(0, 200)}) for _ in range(5)]
        )
        ids += [x.id for x in r]
    cancels = []
    for _ in range(3000):
        action = rng.random()
        some = rng.sample(ids, rng.randint(1, 8))
        if action < 0.35:
            w.transition(some, "sent", conn_id=1)
        elif action < 0.6:
            w.transition(some, "delivered")
        elif action < 0.7:
            w.transition(some, "expired", reason="ttl")
        elif action < 0.75:
            w.transition(some, "dead", reason="attempts")
        elif action < 0.8:
            cancels.append(asyncio.ensure_future(w.cancel(some[0])))
        elif action < 0.85:
            r = await w.enqueue([msg()])
            ids.append(r[0].id)
        if rng.random() < 0.05:
            await asyncio.sleep(0)  # let batches of different sizes form
    await asyncio.gather(*cancels)
    await w.flush()
    counts, pending_bytes = await outbox_counts_db(st)
    assert w.outbox.by_state == counts
    assert w.outbox.pending_bytes == pending_bytes
    assert sum(counts.values()) == len(ids)
    by_state, pbytes = dict(w.outbox.by_state), w.outbox.pending_bytes
    await st.close()
    s = make_settings()
    again = await Store.open(s.store, s.outbox)
    try:
        assert again.writer.outbox.by_state == by_state
        assert again.writer.outbox.pending_bytes == pbytes
    finally:
        await again.close()


async def test_transition_order_survives_a_failed_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'sent' fails with its batch and is retried; a 'delivered' submitted meanwhile must
    not overtake it (it would be dropped: delivered only moves rows that are 'sent')."""
    w = store.writer
    [m] = await w.enqueue([msg()])
    faults = CommitFaults(w, monkeypatch)
    faults.remaining = 1
    faults.gate = asyncio.Event()
    w.transition([m.id], "sent", conn_id=1)
    await faults.entered.wait()  # the batch holding 'sent' is being committed (and will fail)
    w.transition([m.id], "delivered")  # the link's confirmation arrives meanwhile
    faults.gate.set()
    await until(lambda: w.fault is not None, what="fault")
    await until(lambda: w.fault is None, what="recovery")
    await w.flush()
    row = await store.reader.outbox_get(m.id)
    assert row is not None and row["state"] == "delivered" and row["attempts"] == 1
    assert w.outbox.by_state["delivered"] == 1 and w.outbox.pending == 0


# ---------------------------------------------------------------------------------------
# faults at the store boundary


async def test_disk_full_injected_pauses_refuses_and_recovers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLITE_FULL from SQLite itself (max_page_count): ingest pauses, enqueue is refused
    with disk_full, acknowledged messages stay, and it recovers without outside help."""
    w = store.writer
    acked = [r.id for r in await w.enqueue([msg() for _ in range(20)])]
    await feed(w, scenario_frames(9, 200))
    await w.flush()
    last = w.last_seq
    async with w.db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await w.db.execute(f"PRAGMA max_page_count={row[0]}")
    frames = scenario_frames(10, 500)
    await feed(w, frames)
    await until(lambda: w.fault_code == "disk_full", what="disk_full fault")
    assert "disk full" in (w.fault or "")
    with pytest.raises(StoreUnavailable) as info:
        await w.enqueue([msg()])
    assert info.value.code == "disk_full"
    await asyncio.sleep(0.3)
    assert w.last_seq == last  # ingest paused: nothing committed, nothing dropped
    await w.db.execute("PRAGMA max_page_count=1073741823")
    await until(lambda: w.fault is None, what="recovery")
    await w.flush()
    assert w.last_seq == last + sum(isinstance(f.decoded, protocol.Event) for f in frames)
    for i in acked:
        assert await store.reader.outbox_get(i) is not None
    await w.enqueue([msg()])
    await assert_state_consistent(store)


async def test_fault_with_nothing_pending_still_recovers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault hit an enqueue-only batch: no frames to retry, and enqueues are refused
    while the fault lasts, so the writer must find out by itself that writes work again."""
    w = store.writer
    faults = CommitFaults(w, monkeypatch)
    faults.remaining = 2  # the enqueue's batch, then the first probe
    with pytest.raises(StoreUnavailable):
        await w.enqueue([msg()])
    assert w.fault_code == "disk_full"
    await until(lambda: w.fault is None, what="recovery by probing")
    [r] = await w.enqueue([msg()])
    assert r.created
    assert await store.reader.fetchone("SELECT 1 FROM meta WHERE key='write_probe'") is None


async def test_fatal_error_answers_every_waiter(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.writer

    async def broken() -> None:
        exc = sqlite3.DatabaseError("database disk image is malformed")
        exc.sqlite_errorcode = 11  # type: ignore[attr-defined]  # SQLITE_CORRUPT
        raise exc

    monkeypatch.setattr(w.db, "commit", broken)
    waiters = [asyncio.ensure_future(w.enqueue([msg()])) for _ in range(5)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert w.fatal is not None and w.fault_code == "store_failed"
    with pytest.raises(StoreUnavailable):
        await w.enqueue([msg()])
    with pytest.raises(StoreUnavailable):
        await w.call("flush")


# ---------------------------------------------------------------------------------------
# retention and counters


async def test_retention_by_count_in_small_steps(open_store: Callable[..., Any]) -> None:
    st: Store = await open_store()
    w = st.writer
    await feed(w, scenario_frames(11, 1000))
    pending = [r.id for r in await w.enqueue([msg() for _ in range(5)])]
    await w.flush()
    assert w.first_seq == 1
    steps = 0
    while deleted := await w.prune(retention_days=0, max_events=300, step=100):
        assert deleted <= 100
        steps += 1
        row = await st.reader.fetchone("SELECT min(seq) FROM events")
        assert row is not None and w.first_seq == row[0]
    assert steps == 7
    row = await st.reader.fetchone("SELECT count(*), min(seq), max(seq) FROM events")
    assert row is not None and tuple(row) == (300, w.last_seq - 299, w.last_seq)
    for i in pending:
        assert (await st.reader.outbox_get(i))["state"] == "queued"  # type: ignore[index]


async def test_retention_by_age_keeps_pending_messages(open_store: Callable[..., Any]) -> None:
    st: Store = await open_store()
    w = st.writer
    old = time.time() - 40 * 86400
    await feed(w, scenario_frames(12, 300, received_at=old))
    await feed(w, scenario_frames(13, 100))
    ids = [r.id for r in await w.enqueue([msg() for _ in range(6)])]
    w.transition(ids[:4], "sent", conn_id=1)
    w.transition(ids[:3], "delivered")
    await w.flush()
    # Everything was finished or queued long ago.
    await w.db.execute("UPDATE outbox SET updated_at = ?", (old,))
    total = 0
    while deleted := await w.prune(retention_days=30, max_events=0, step=64):
        total += deleted
    row = await st.reader.fetchone("SELECT count(*), min(seq) FROM events")
    assert row is not None and row[0] == 100 and w.first_seq == row[1]
    states = {
        r["id"]: r["state"] for r in await st.reader.outbox_list(state=None, after_id=0, limit=100)
    }
    # Pending ones (queued, sent) are never pruned; finished old ones are.
    assert states == {ids[3]: "sent", ids[4]: "queued", ids[5]: "queued"}
    counts, _ = await outbox_counts_db(st)
    assert counts == w.outbox.by_state


async def test_pruning_never_reuses_a_message_id(store: Store) -> None:
    w = store.writer
    ids = [r.id for r in await w.enqueue([msg() for _ in range(3)])]
    w.transition(ids, "cancelled")
    await w.flush()
    await w.db.execute("UPDATE outbox SET updated_at = ?", (time.time() - 40 * 86400,))
    while await w.prune(retention_days=30, max_events=0):
        pass
    [new] = await w.enqueue([msg()])
    assert new.id > max(ids)  # the id a caller once got never names another message


async def test_rejected_frames_bounded_counts_kept_across_restart(
    open_store: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    st: Store = await open_store()
    w = st.writer
    await feed(w, rejected("not_json", 70) + rejected("too_large", 30))
    await feed(w, scenario_frames(14, 200))
    await w.enqueue([msg() for _ in range(4)])
    await w.flush()
    assert w.rejected_by_reason == {"not_json": 70, "too_large": 30}
    while await w.prune(retention_days=0, max_events=150, step=25, max_rejected=10):
        pass
    row = await st.reader.fetchone("SELECT count(*) FROM rejected_frames")
    assert row is not None and row[0] == 10
    assert w.rejected_by_reason == {"not_json": 70, "too_large": 30}
    meta = await st.reader.fetchone("SELECT value FROM meta WHERE key='rejected_pruned'")
    assert meta is not None and sum(json.loads(meta[0]).values()) == 90
    before = {
        "rejected": dict(w.rejected_by_reason),
        "outbox": dict(w.outbox.by_state),
        "bytes": w.outbox.pending_bytes,
        "last_seq": w.last_seq,
        "first_seq": w.first_seq,
        "sessions": w.committed_sessions,
        "global": w.committed_global,
    }
    await st.close()
    s = make_settings()
    again = await Store.open(s.store, s.outbox)
    try:
        a = again.writer
        after = {
            "rejected": dict(a.rejected_by_reason),
            "outbox": dict(a.outbox.by_state),
            "bytes": a.outbox.pending_bytes,
            "last_seq": a.last_seq,
            "first_seq": a.first_seq,
            "sessions": a.committed_sessions,
            "global": a.committed_global,
        }
        assert after == before
    finally:
        await again.close()


async def test_last_seq_never_goes_back_after_pruning_everything(
    open_store: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    st: Store = await open_store()
    await feed(st.writer, scenario_frames(15, 50, received_at=time.time() - 90 * 86400))
    await st.writer.flush()
    last = st.writer.last_seq
    while await st.writer.prune(retention_days=30, max_events=0):
        pass
    await st.close()
    s = make_settings()
    again = await Store.open(s.store, s.outbox)
    try:
        assert again.writer.last_seq == last
        await feed(again.writer, scenario_frames(16, 1))
        await again.writer.flush()
        assert again.writer.last_seq == last + 1  # a `since` cursor stays meaningful
    finally:
        await again.close()


# ---------------------------------------------------------------------------------------
# the daemon process: refusals, read-only, disk full, offline rebuild, SIGKILL


def nowhere() -> str:
    return f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens: the link just retries


def make_db(directory: Path, frames: int = 2000) -> Path:
    """A real database with `frames` events, closed cleanly (WAL checkpointed)."""

    async def go() -> Path:
        s = settings_for(directory)
        st = await Store.open(s.store, s.outbox)
        try:
            await feed(st.writer, scenario_frames(21, frames))
            await st.writer.enqueue([msg() for _ in range(10)])
            await st.writer.flush()
        finally:
            await st.close()
        return s.store.db_path

    return asyncio.run(go())


def exit_status(d: DaemonProcess, timeout: float = 30.0) -> int:
    d.start(wait=False)
    assert d.proc is not None
    try:
        return d.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"daemon did not exit:\n{d.output()}") from None


def settle(d: DaemonProcess, quiet: float = 0.5, timeout: float = 30.0) -> int:
    """Wait until the daemon's last_seq stops moving; return it."""
    deadline = time.monotonic() + timeout
    last = d.get("/v1/status")["events"]["last_seq"]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = d.get("/v1/status")["events"]["last_seq"]
        if now == last:
            return int(now)
        last = now
    raise AssertionError("the event log never settled")


def enqueue(d: DaemonProcess, body: dict[str, Any]) -> tuple[int, Any]:
    return d.client().request(
        "POST", "/v1/outbox", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_pages"])
def test_corrupt_database_exits_65_and_is_left_untouched(
    short_dir: Path, daemon_factory: Callable[..., DaemonProcess], damage: str
) -> None:
    db = make_db(short_dir)
    data = db.read_bytes()
    page = 4096
    assert len(data) > 20 * page
    if damage == "garbage":
        db.write_bytes(random.Random(1).randbytes(len(data)))
    elif damage == "truncated":
        db.write_bytes(data[: (len(data) // 2) // page * page])
    else:
        db.write_bytes(data[: 3 * page] + b"\xa5" * (4 * page) + data[7 * page :])
    before = db.read_bytes()
    d = daemon_factory(nowhere())
    assert exit_status(d) == EX_DATAERR
    out = d.output()
    assert "corrupt" in out and str(db) in out, out
    assert db.read_bytes() == before  # same bytes
    assert not d.socket.exists()


def test_foreign_database_exits_65_untouched(
    short_dir: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    state = short_dir / "state"
    state.mkdir()
    _foreign_with_tables(state / "kimi-syncd.db")
    before = (state / "kimi-syncd.db").read_bytes()
    d = daemon_factory(nowhere())
    assert exit_status(d) == EX_DATAERR
    assert "not a kimi-syncd database" in d.output()
    assert (state / "kimi-syncd.db").read_bytes() == before


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mount a tmpfs (needs root / CAP_SYS_ADMIN); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_read_only_empty_state_dir_exits_73(
    short_dir: Path,
    daemon_factory: Callable[..., DaemonProcess],
    mount_tmpfs: Callable[[Path, str], Path],
) -> None:
    mount_tmpfs(short_dir / "state", "ro,size=1m")
    d = daemon_factory(nowhere())
    assert exit_status(d) == EX_CANTCREAT
    assert "read-only file system" in d.output()


def test_read_only_existing_database_exits_73_untouched(
    short_dir: Path,
    daemon_factory: Callable[..., DaemonProcess],
    mount_tmpfs: Callable[[Path, str], Path],
) -> None:
    state = mount_tmpfs(short_dir / "state", "size=16m")
    db = make_db(short_dir, frames=300)
    before = db.read_bytes()
    r = subprocess.run(
        ["mount", "-o", "remount,ro", str(state)], capture_output=True, text=True, check=False
    )
    if r.returncode:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    d = daemon_factory(nowhere())
    assert exit_status(d) == EX_CANTCREAT
    assert "read-only file system" in d.output()
    assert db.read_bytes() == before


def _fill(path: Path) -> None:
    """Append to `path` until the file system is full."""
    chunk = b"\0" * 65536
    with path.open("ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


def test_disk_full_pauses_ingest_refuses_enqueue_and_recovers(
    short_dir: Path,
    daemon_factory: Callable[..., DaemonProcess],
    sim_factory: Callable[..., SimProcess],
    mount_tmpfs: Callable[[Path, str], Path],
) -> None:
    state = mount_tmpfs(short_dir / "state", "size=8m")
    sim = sim_factory(rate=150).start()
    d = daemon_factory(sim.url).start()
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= 50, what="events")
    acked: dict[int, int] = {}
    for i in range(20):
        status, body = enqueue(d, {"type": "disk_test", "n": i})
        assert status == 202, body
        acked[body["id"]] = i
    seen = {e["seq"]: e["body"] for e in d.get("/v1/events?since=0&limit=500")["events"]}
    filler = state / "filler"

    def faulted() -> bool:
        _fill(filler)  # keep it full: a WAL checkpoint may give a little space back
        st = d.get("/v1/status")
        return "disk full" in (st["db"]["fault"] or "")

    d.wait_for(faulted, timeout=30, what="the disk_full fault")
    status, health = d.client().request("GET", "/v1/health")
    assert status == 503 and "disk full" in health["store"], health
    refused = None
    for i in range(50):
        _fill(filler)
        status, body = enqueue(d, {"type": "disk_test", "n": 100 + i})
        if status == 507:
            refused = body
            break
        assert status == 202, body  # committed in a moment with room: acknowledged, kept
        acked[body["id"]] = 100 + i
        time.sleep(0.05)
    assert refused is not None and refused["error"]["code"] == "disk_full", refused
    # Ingest is paused, not dropped: received frames wait in the writer's queue.
    d.wait_for(
        lambda: _fill(filler) or d.get("/v1/status")["db"]["ingest_queue"] > 0,
        what="frames waiting",
    )
    paused_at = d.get("/v1/status")["events"]["last_seq"]
    filler.unlink()  # space comes back: no restart, no command
    d.wait_for(lambda: d.get("/v1/health")["ok"], timeout=30, what="recovery")
    status, body = enqueue(d, {"type": "disk_test", "n": 999})
    assert status == 202, body
    acked[body["id"]] = 999
    d.wait_for(
        lambda: d.get("/v1/status")["events"]["last_seq"] > paused_at + 20, what="ingest resumed"
    )
    for msg_id, n in acked.items():
        assert d.get(f"/v1/outbox/{msg_id}")["body"]["n"] == n
    for e in d.get("/v1/events?since=0&limit=500")["events"]:
        if e["seq"] in seen:
            assert e["body"] == seen[e["seq"]]
    out = d.output()
    assert "disk full" in out and "writable again" in out
    assert d.stop() == 0


def test_offline_rebuild_refused_while_the_daemon_serves(
    short_dir: Path,
    daemon_factory: Callable[..., DaemonProcess],
    sim_factory: Callable[..., SimProcess],
) -> None:
    sim = sim_factory(rate=0).start()
    d = daemon_factory(sim.url).start()
    d.wait_for(lambda: d.get("/v1/status")["link"]["state"] == "connected", what="connected")
    sim.control("step", n=150)
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= 150, what="events")
    settle(d)
    live = {s["id"]: s for s in d.get("/v1/sessions?include_deleted=1")["sessions"]}
    rebuild = [sys.executable, "-m", "kimi_syncd", "rebuild", "--state-dir", str(d.state_dir)]
    r = subprocess.run(rebuild, env=d.env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == EX_TEMPFAIL, r
    assert f"in use by another kimi-syncd process (pid {d.pid})" in r.stderr
    assert d.get("/v1/health")["ok"]
    assert d.stop() == 0
    r = subprocess.run(rebuild, env=d.env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r
    assert f"rebuilt {len(live)} sessions from" in r.stdout
    with contextlib.closing(sqlite3.connect(d.state_dir / "kimi-syncd.db")) as conn:
        stored = {i: json.loads(s) for i, s in conn.execute("SELECT id, state FROM sessions")}
    assert stored == live
    missing = short_dir / "nothing"
    r = subprocess.run(
        [sys.executable, "-m", "kimi_syncd", "rebuild", "--state-dir", str(missing)],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 66 and "no database" in r.stderr
    assert not missing.exists()


def test_acknowledged_enqueue_survives_sigkill_right_after(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(nowhere())
    acked: dict[int, int] = {}
    for i in range(6):
        d.start()
        status, body = enqueue(d, {"type": "kill_test", "n": i})
        assert status == 202, body
        os.kill(d.pid, signal.SIGKILL)  # the moment the acknowledgement is in our hands
        assert d.proc is not None
        d.proc.wait()
        acked[body["id"]] = i
    d.start()
    for msg_id, n in acked.items():
        m = d.get(f"/v1/outbox/{msg_id}")
        assert m["state"] == "queued" and m["body"]["n"] == n
    assert d.get("/v1/status")["outbox"]["pending"] == len(acked)
    assert d.stop() == 0


async def test_an_unstorable_frame_is_rejected_not_fatal(store: Store) -> None:
    """One value SQLite cannot hold (an id beyond 64 bits) must not stop the writer."""
    import dataclasses

    good = protocol.decode('{"type":"auto_session_toggled","session_id":44,"enabled":false}')
    assert isinstance(good, protocol.Event)
    bad = dataclasses.replace(good, session_id=2**64 + 1)
    writer = store.writer
    before = writer.last_seq
    for event in (good, bad, good):
        await writer.ingest(Frame(event, time.time(), None))
    await writer.flush()
    assert writer.fatal is None and writer.fault is None
    assert writer.last_seq == before + 2  # both good frames stored, in order
    assert writer.rejected_by_reason["unstorable"] == 1
    rows = await store.reader.fetchall("SELECT reason, detail FROM rejected_frames")
    assert [r[0] for r in rows] == ["unstorable"] and "OverflowError" in rows[0][1]
    # ...and the store still takes writes.
    (result,) = await writer.enqueue([NewMessage("x", '{"type":"x"}', None, None)])
    assert result.created


async def test_quick_check_before_ready_unless_closed_cleanly_and_untouched(
    open_store: Callable[..., Any],
) -> None:
    from kimi_syncd.store.db import clean_marker

    first = await open_store()
    assert first.checked_at_open  # a new database
    (result,) = await first.writer.enqueue([NewMessage("x", '{"type":"x"}', None, None)])
    await first.close()
    marker = clean_marker(first.db_path)
    assert marker.exists()
    second = await open_store()
    assert not second.checked_at_open  # clean close, untouched: checked after READY
    assert not marker.exists()  # a crash from here on means a full check next time
    assert await second.reader.quick_check() == ["ok"]
    await second.close()
    os.utime(first.db_path)  # touched by someone else since the clean close
    third = await open_store()
    assert third.checked_at_open
    third.writer.fatal = RuntimeError("simulated crash: no clean close")
    await third.close()
    assert not marker.exists()
    fourth = await open_store()
    assert fourth.checked_at_open
    row = await fourth.reader.outbox_get(result.id)
    assert row is not None
