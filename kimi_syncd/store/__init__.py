"""Durable storage: SQLite in WAL mode, one group-committing writer, read-only readers."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from kimi_syncd.config import OutboxSettings, StoreSettings
from kimi_syncd.store.db import DbLock, StoreUnavailable, mark_clean, open_writer
from kimi_syncd.store.reader import Reader
from kimi_syncd.store.writer import (
    EnqueueResult,
    Frame,
    IdempotencyConflict,
    LinkEvent,
    NewMessage,
    OutboxFull,
    Subscription,
    Writer,
)

__all__ = [
    "EnqueueResult",
    "Frame",
    "IdempotencyConflict",
    "LinkEvent",
    "NewMessage",
    "OutboxFull",
    "Store",
    "StoreUnavailable",
    "Subscription",
]


class Store:
    """The writer and the readers of one database file."""

    def __init__(
        self, db_path: Path, writer: Writer, reader: Reader, lock: DbLock | None = None
    ) -> None:
        self.db_path = db_path
        self.writer = writer
        self.reader = reader
        self._lock = lock
        # False after a clean shutdown: quick_check is then the caller's to run, in the
        # background (Reader.quick_check), not on the path to READY.
        self.checked_at_open = True

    @classmethod
    async def open(
        cls,
        store: StoreSettings,
        outbox: OutboxSettings,
        *,
        on_long_migration: Callable[[], object] | None = None,
        reader_pool: int = 2,
    ) -> Store:
        db_path = store.db_path
        db, lock, checked = await open_writer(db_path, on_long_migration=on_long_migration)
        writer = Writer(
            db,
            batch_max=store.batch_max,
            batch_delay=store.batch_delay_ms / 1000.0,
            ingest_queue=store.ingest_queue,
            max_messages=outbox.max_messages,
            max_bytes=outbox.max_bytes,
        )
        reader = Reader(db_path, reader_pool)
        try:
            await writer.load()
            await reader.open()
        except BaseException:
            await reader.close()
            await db.close()
            lock.release()
            raise
        writer.start()
        opened = cls(db_path, writer, reader, lock)
        opened.checked_at_open = checked
        return opened

    async def close(self) -> None:
        """Commit what was handed over, checkpoint, close every connection."""
        await self.writer.stop()
        await self.reader.close()
        clean = False
        with contextlib.suppress(sqlite3.Error, ValueError):
            if self.writer.fatal is None and self.writer.fault is None:
                await self.writer.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                clean = True
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self.writer.db.close()
        if clean and self.db_path.exists():
            with contextlib.suppress(OSError):
                mark_clean(self.db_path)
        # Only now may another process (a restarted daemon, an offline rebuild) write.
        if self._lock is not None:
            self._lock.release()
