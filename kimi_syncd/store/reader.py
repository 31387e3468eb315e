"""Read-only queries on separate connections: in WAL mode they never wait for the writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite

from kimi_syncd.store.db import open_reader
from kimi_syncd.timefmt import iso

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

    async def open(self) -> None:
        for _ in range(self.pool_size):
            conn = await open_reader(self.db_path)
            self._all.append(conn)
            self._pool.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await conn.close()
        self._all.clear()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._pool.get()
        try:
            yield conn
        finally:
            self._pool.put_nowait(conn)

    async def fetchall(
        self, sql: str, params: tuple[Any, ...] | list[Any] = ()
    ) -> list[sqlite3.Row]:
        async with self.connection() as conn, conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(
        self, sql: str, params: tuple[Any, ...] | list[Any] = ()
    ) -> sqlite3.Row | None:
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
