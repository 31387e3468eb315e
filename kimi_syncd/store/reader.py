"""Read-only queries on separate connections: in WAL mode they never wait for the writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiosqlite

from kimi_syncd.store.db import StoreUnavailable, open_reader
from kimi_syncd.timefmt import iso

log = logging.getLogger(__name__)

EVENT_COLUMNS = "seq, received_at, conn_id, kind, type, session_id, invalid, body"
OUTBOX_COLUMNS = (
    "id, type, body, size, state, attempts, last_error, created_at, updated_at, sent_at, "
    "delivered_at, expires_at, conn_id, caller_uid, idem_key"
)


class Reader:
    def __init__(self, db_path: Path, pool_size: int = 2) -> None:
        self.db_path = db_path
        self.pool_size = pool_size
        self._pool: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # shielded queries and replacements
        self._closing = asyncio.Event()

    async def open(self) -> None:
        for _ in range(self.pool_size):
            conn = await open_reader(self.db_path)
            self._all.append(conn)
            self._pool.put_nowait(conn)

    async def close(self) -> None:
        self._closing.set()
        # Queries still running are cancelled (closing their connection below finalizes
        # what they leave behind); replacements see `_closing` and stop by themselves (a
        # cancelled one could leak a half-opened connection and its thread).
        while self._tasks:
            for task in self._tasks:
                if task.get_name() != "reader-replace":
                    task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for conn in self._all:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await conn.close()
        self._all.clear()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """A pooled connection; one that comes back after an error or a cancellation is
        replaced, not reused (see `_replace`)."""
        if self._closing.is_set():
            # Fail at once: after close the pool only shrinks, and a read would wait forever.
            raise StoreUnavailable("the store is closed", "store_unavailable")
        conn = await self._pool.get()
        clean = False
        try:
            yield conn
            clean = True
        finally:
            if clean:
                self._pool.put_nowait(conn)
            else:
                self._spawn(self._replace(conn), name="reader-replace")

    async def _replace(self, conn: aiosqlite.Connection) -> None:
        """Close a connection that may still hold an unfinished statement; pool a new one.

        A statement that was never reset (its cursor lost when the caller was cancelled
        mid-query) keeps its read transaction open: every later query on that connection
        would see the database as it was then (stale outbox rows: messages sent twice), and
        the WAL could never be checkpointed past it. Closing finalizes the statement.
        """
        with contextlib.suppress(sqlite3.Error, ValueError):
            await conn.close()
        if conn in self._all:
            self._all.remove(conn)
        # Keep the pool at its size: with no connection left every read would wait forever.
        delay = 0.1
        while not self._closing.is_set():
            try:
                fresh = await open_reader(self.db_path)
            except sqlite3.Error as exc:
                log.warning("cannot reopen a read connection (retrying): %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing.is_set():
                await fresh.close()
                return
            self._all.append(fresh)
            self._pool.put_nowait(fresh)
            return

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], name: str = "reader-query"
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("reader job failed: %r", task.exception())

    async def fetchall(
        self, sql: str, params: tuple[Any, ...] | list[Any] = ()
    ) -> list[sqlite3.Row]:
        # Shielded: a caller cancelled mid-query (a client hung up, the link dropped) must
        # not cut the query off between its statement and its cursor's close; it finishes
        # in the background and hands the connection back clean.
        return await asyncio.shield(self._spawn(self._fetchall(sql, params)))

    async def _fetchall(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[sqlite3.Row]:
        async with self.connection() as conn, conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(
        self, sql: str, params: tuple[Any, ...] | list[Any] = ()
    ) -> sqlite3.Row | None:
        return await asyncio.shield(self._spawn(self._fetchone(sql, params)))

    async def _fetchone(self, sql: str, params: tuple[Any, ...] | list[Any]) -> sqlite3.Row | None:
        async with self.connection() as conn, conn.execute(sql, params) as cur:
            return await cur.fetchone()

    # -- events --------------------------------------------------------------------------

    async def events(
        self,
        *,
        since: int = 0,
        session_id: int | None = None,
        type_: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[sqlite3.Row]:
        where = ["seq > ?"]
        params: list[Any] = [since]
        if session_id is not None:
            where.append("session_id = ?")
            params.append(session_id)
        if type_ is not None:
            where.append("type = ?")
            params.append(type_)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        params.append(limit)
        return await self.fetchall(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            params,
        )

    async def first_seq(self) -> int:
        row = await self.fetchone("SELECT min(seq) FROM events")
        return int(row[0]) if row and row[0] is not None else 0

    # -- outbox --------------------------------------------------------------------------

    async def outbox_pending(self, after_id: int, limit: int) -> list[sqlite3.Row]:
        return await self.fetchall(
            "SELECT id, type, body, attempts, expires_at FROM outbox "
            "WHERE state IN ('queued','sent') AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )

    async def outbox_list(
        self, *, state: str | None, after_id: int, limit: int
    ) -> list[sqlite3.Row]:
        if state is None:
            return await self.fetchall(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        if state == "pending":
            return await self.fetchall(
                f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state IN ('queued','sent') "
                "AND id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        return await self.fetchall(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (state, after_id, limit),
        )

    async def outbox_get(self, message_id: int) -> sqlite3.Row | None:
        return await self.fetchone(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (message_id,)
        )

    async def oldest_pending_created_at(self) -> float | None:
        row = await self.fetchone(
            "SELECT created_at FROM outbox WHERE id = (SELECT min(id) FROM outbox "
            "WHERE state IN ('queued','sent'))"
        )
        return float(row[0]) if row else None

    # -- misc ----------------------------------------------------------------------------

    async def connections(self, limit: int = 20) -> list[sqlite3.Row]:
        return await self.fetchall("SELECT * FROM connections ORDER BY id DESC LIMIT ?", (limit,))

    async def quick_check(self) -> list[str]:
        return [str(r[0]) for r in await self.fetchall("PRAGMA quick_check")]

    async def integrity_check(self) -> list[str]:
        return [str(r[0]) for r in await self.fetchall("PRAGMA integrity_check")]

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.db_path}{suffix}").st_size
        return total


def event_dict(row: sqlite3.Row) -> dict[str, Any]:
    """The pinned /v1/events item shape; `body` is the frame as received."""
    body_text = row["body"]
    try:
        body = json.loads(body_text)
    except ValueError:
        body = body_text
    item: dict[str, Any] = {
        "seq": row["seq"],
        "kind": row["kind"],
        "type": row["type"],
        "session_id": row["session_id"],
        "received_at": iso(row["received_at"]),
        "body": body,
    }
    if row["invalid"]:
        item["invalid"] = row["invalid"]
    return item
