"""Opening the database: create or migrate, check integrity, classify SQLite failures."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import aiosqlite

from kimi_syncd.errors import EX_CANTCREAT, EX_DATAERR, EX_IOERR, EX_TEMPFAIL, FatalError
from kimi_syncd.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
SQLITE_PERM = 3
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26


class StoreUnavailable(Exception):
    """The store cannot take writes right now (disk full, read-only, I/O error)."""

    def __init__(self, message: str, code: str = "store_unavailable") -> None:
        super().__init__(message)
        self.code = code


def primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_transient(exc: BaseException) -> bool:
    """Failures that may clear by themselves: full disk, read-only remount, I/O hiccup."""
    if isinstance(exc, OSError):
        return True
    return primary_code(exc) in (
        SQLITE_FULL,
        SQLITE_IOERR,
        SQLITE_READONLY,
        SQLITE_CANTOPEN,
        SQLITE_PERM,
    )


def fault_code(exc: BaseException) -> str:
    code = primary_code(exc)
    if code == SQLITE_FULL or (isinstance(exc, OSError) and exc.errno == 28):
        return "disk_full"
    if code in (SQLITE_READONLY, SQLITE_PERM):
        return "read_only"
    return "io_error"


def is_corrupt(exc: BaseException) -> bool:
    return primary_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk (WAL fsynced) before an enqueue is acknowledged.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=OFF",
    "PRAGMA busy_timeout=5000",
    "PRAGMA wal_autocheckpoint=4000",
    "PRAGMA cache_size=-8000",
)


def prepare_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise FatalError(
            f"cannot create state directory {state_dir}: {exc.strerror or exc}", EX_CANTCREAT
        ) from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        read_only = False
        with contextlib.suppress(OSError):
            read_only = bool(os.statvfs(state_dir).f_flag & os.ST_RDONLY)
        if read_only:
            raise FatalError(
                f"state directory {state_dir} is on a read-only file system: remount it "
                "read-write or set store.state_dir",
                EX_CANTCREAT,
            )
        raise FatalError(
            f"state directory {state_dir} is not writable by uid {os.geteuid()}: fix its "
            "ownership/permissions (or immutable flag) or set store.state_dir",
            EX_CANTCREAT,
        )


class DbLock:
    """An exclusive `flock` on `<db>.lock`, held for as long as the write connection is open.

    It makes "one writer" true across processes too: a second daemon, or an offline
    `kimi-syncd rebuild`, on the same database is refused instead of interleaving its writes
    with ours. The kernel drops the lock when the holder dies (even by SIGKILL), so a crash
    never leaves a stale lock behind. The file is never unlinked: unlinking a lock file races
    with a process that has just opened it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, db_path: Path) -> DbLock:
        path = db_path.with_name(db_path.name + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise FatalError(
                f"cannot create lock file {path}: {exc.strerror or exc} (read-only state "
                "directory?)",
                EX_CANTCREAT,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            raise FatalError(
                f"database {db_path} is in use by another kimi-syncd process{holder}: stop it "
                "first (`kimi-syncd rebuild` works offline only; with the daemon running use "
                "`kimi-syncctl rebuild`)",
                EX_TEMPFAIL,
            ) from None
        # Informational only (for the message above): a full disk must not stop us here.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _uri(db_path: Path, mode: str) -> str:
    # Percent-encode: a '?', '#' or '%' in the path would otherwise be read as URI syntax.
    return f"file:{urllib.parse.quote(str(db_path))}?mode={mode}"


CLEAN_SUFFIX = ".clean"


def clean_marker(db_path: Path) -> Path:
    """Present only between a clean close and the next open (see `open_writer`)."""
    return db_path.with_name(db_path.name + CLEAN_SUFFIX)


def _fingerprint(db_path: Path) -> str:
    st = db_path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def mark_clean(db_path: Path) -> None:
    """Record a clean close, with the file's size, mtime and inode at that moment."""
    marker = clean_marker(db_path)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, _fingerprint(db_path).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _closed_cleanly(db_path: Path) -> bool:
    """True when the last close was clean AND nothing touched the file since."""
    marker = clean_marker(db_path)
    try:
        recorded = marker.read_text().strip()
        marker.unlink()  # from here on a crash must lead to a full check at the next start
        wal = db_path.with_name(db_path.name + "-wal")
        unchanged = recorded == _fingerprint(db_path)
        return unchanged and (not wal.exists() or wal.stat().st_size == 0)
    except OSError:
        return False


async def open_writer(
    db_path: Path, *, on_long_migration: Callable[[], object] | None = None
) -> tuple[aiosqlite.Connection, DbLock, bool]:
    """Open (creating or migrating) the database for writing; raise FatalError when unusable.

    Returns the connection, the lock that proves it is the only writer (release it after
    closing the connection), and whether `PRAGMA quick_check` already ran. It runs here,
    before anything is written, unless the last run closed cleanly: reading a large file
    costs seconds, and the daemon then runs it in the background after READY instead.
    """
    prepare_state_dir(db_path.parent)
    lock = DbLock.acquire(db_path)
    try:
        clean = _closed_cleanly(db_path)
        version = await asyncio.to_thread(_probe, db_path, not clean) if db_path.exists() else None
        try:
            db = await aiosqlite.connect(db_path, isolation_level=None)
        except sqlite3.Error as exc:
            raise FatalError(f"cannot open database {db_path}: {exc}", EX_CANTCREAT) from None
        try:
            await _migrate(db, db_path, version, on_long_migration)
        except BaseException:
            await db.close()
            raise
    except BaseException:
        lock.release()
        raise
    return db, lock, not clean or version is None


def _probe(db_path: Path, quick_check: bool = True) -> int:
    """Check an existing file before anything may write to it; return its schema version.

    This runs on a READ-ONLY connection on purpose: a file we refuse (corrupt, foreign, too
    new) must be left byte-for-byte as it was, and a read-write connection may write to it
    even without a statement (e.g. checkpoint a leftover WAL into it when it closes).
    """
    try:
        conn = sqlite3.connect(_uri(db_path, "ro"), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise _classify_open_error(exc, db_path) from None
    try:
        rows = ["ok"]
        if quick_check:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            raise FatalError(
                f"database {db_path} is corrupt (quick_check: {'; '.join(rows[:3])}). "
                "It was left untouched: move it aside to start afresh, or try "
                "`sqlite3 kimi-syncd.db .recover` to salvage it",
                EX_DATAERR,
            )
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    except sqlite3.Error as exc:
        raise _classify_open_error(exc, db_path) from None
    finally:
        conn.close()
    # Ours carries our application_id (set in the same transaction as the first tables).
    # Application id 0 is accepted only for a completely empty file: another program's
    # database that uses user_version but no application_id must not be taken for ours.
    if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or tables != 0):
        raise FatalError(
            f"{db_path} is not a kimi-syncd database (application_id {app_id:#x}, "
            f"user_version {version}); refusing to touch it",
            EX_DATAERR,
        )
    if version > SCHEMA_VERSION:
        raise FatalError(
            f"database {db_path} has schema version {version}, newer than this kimi-syncd "
            f"({SCHEMA_VERSION}): upgrade kimi-syncd (the file was left untouched)",
            EX_DATAERR,
        )
    return version


def _classify_open_error(exc: sqlite3.Error, db_path: Path) -> FatalError:
    if is_corrupt(exc):
        return FatalError(
            f"database {db_path} is corrupt or not a database ({exc}). It was left "
            "untouched: move it aside to start afresh",
            EX_DATAERR,
        )
    if is_transient(exc):
        return FatalError(
            f"cannot use database {db_path}: {exc} (disk full or read-only?)", EX_CANTCREAT
        )
    return FatalError(f"database {db_path}: {exc}", EX_IOERR)


async def _migrate(
    db: aiosqlite.Connection,
    db_path: Path,
    version: int | None,
    on_long_migration: Callable[[], object] | None,
) -> None:
    """Apply the PRAGMAs and the missing migrations (`version` None: a new file)."""
    try:
        for pragma in PRAGMAS:
            await db.execute(pragma)
        current = version or 0
        if current < SCHEMA_VERSION and on_long_migration is not None and version:
            on_long_migration()
        for number in range(current, SCHEMA_VERSION):
            log.info("migrating database to schema version %d", number + 1)
            await db.executescript(
                "BEGIN IMMEDIATE;\n"
                + MIGRATIONS[number]
                + f"\nPRAGMA user_version={number + 1};\nPRAGMA application_id={APPLICATION_ID};"
                "\nCOMMIT;"
            )
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error, ValueError):
            if db.in_transaction:
                await db.rollback()
        raise _classify_open_error(exc, db_path) from None


async def open_reader(db_path: Path) -> aiosqlite.Connection:
    """A read-only connection: never takes the write lock, never waits for the writer (WAL)."""
    db = await aiosqlite.connect(_uri(db_path, "ro"), uri=True, isolation_level=None)
    with contextlib.suppress(sqlite3.Error):
        await db.execute("PRAGMA busy_timeout=5000")
    db.row_factory = sqlite3.Row
    return db
