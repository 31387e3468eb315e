"""A database with 1,000,000 stored events and 1,000 sessions, built directly and fast.

The schema comes from `Store.open` on a fresh directory (so it is exactly the daemon's).
Real frames from the simulator's `Scenario` go through `protocol.decode` + `state.apply`
until 1,000 sessions exist; their rows (and the resulting session state) are written with
`executemany`, then those rows are repeated under new sequence numbers up to 1,000,000 (the
repeats are not reduced again: only the event log's size matters for the benchmarks). The
secondary indexes are dropped during the load and rebuilt after it.

The result is cached in bench/results/ under a key that changes with the schema, the
reducer and the decoder, and copied for each benchmark that needs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

from bench.clients import outgoing_message
from bench.common import RESULTS, ROOT, Context
from kimi_syncd import protocol
from kimi_syncd.config import Settings
from kimi_syncd.paths import DB_NAME
from kimi_syncd.sim import Scenario, dumps
from kimi_syncd.state import State, apply
from kimi_syncd.store import Store

EVENTS = 1_000_000
SESSIONS = 1_000
VERSION = "2"


def _key() -> str:
    h = hashlib.sha256(VERSION.encode())
    for rel in ("kimi_syncd/store/schema.py", "kimi_syncd/state.py", "kimi_syncd/protocol.py"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


async def _create_schema(state_dir: Path) -> Path:
    settings = Settings.model_validate(
        {"store": {"state_dir": state_dir}, "api": {"socket": state_dir / "unused.sock"}}
    )
    store = await Store.open(settings.store, settings.outbox)
    await store.close()
    return settings.store.db_path


def build(ctx: Context, events: int = EVENTS, sessions: int = SESSIONS) -> Path:
    target = RESULTS / f"template-{events}-{_key()}.db"
    if target.exists():
        ctx.log(f"  reusing {target.name}")
        return target
    t0 = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    build_dir = ctx.workdir / "dbgen"
    db_path = asyncio.run(_create_schema(build_dir))

    # Few bulk deletions, so that most of the 1,000 sessions are live rather than tombstones.
    scenario = Scenario(seed=11, weights={"bulk_delete": 0.05, "new_session": 4.0})
    state = State()
    base_time = time.time() - 3 * 86400  # three days ago: far inside the 30-day retention
    step = 3 * 86400 / events
    rows: list[tuple[int, float, None, str, str, int | None, str | None, str]] = []
    seq = 0
    while len(state.sessions) < sessions:
        frame = dumps(scenario.next_frame())
        decoded = protocol.decode(frame)
        if not isinstance(decoded, protocol.Event):
            continue
        seq += 1
        received = base_time + seq * step
        apply(state, decoded, seq, received)
        rows.append(
            (
                seq,
                received,
                None,
                "event",
                decoded.type,
                decoded.session_id,
                decoded.invalid,
                decoded.text,
            )
        )
    reduced = seq

    con = sqlite3.connect(db_path, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    indexes = con.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='events' "
        "AND sql IS NOT NULL"
    ).fetchall()
    con.execute("BEGIN")
    for name, _sql in indexes:
        con.execute(f"DROP INDEX {name}")
    con.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
    template = rows
    chunk: list[tuple[object, ...]] = []
    i = 0
    while seq < events:
        seq += 1
        src = template[i % len(template)]
        i += 1
        chunk.append((seq, base_time + seq * step, None, *src[3:]))
        if len(chunk) >= 50_000:
            con.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", chunk)
            chunk = []
    if chunk:
        con.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", chunk)
    for _name, sql in indexes:
        con.execute(sql)
    con.executemany(
        "INSERT INTO sessions (id, state, updated_seq) VALUES (?,?,?)",
        [
            (sid, json.dumps(s.to_dict(), ensure_ascii=False, separators=(",", ":")), reduced)
            for sid, s in state.sessions.items()
        ],
    )
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [
            ("global", json.dumps(state.global_dict(), ensure_ascii=False, separators=(",", ":"))),
            ("last_seq", str(seq)),
        ],
    )
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("ANALYZE")
    con.close()
    tmp = target.with_suffix(".tmp")
    shutil.copy(db_path, tmp)
    tmp.rename(target)
    shutil.rmtree(build_dir, ignore_errors=True)
    for old in RESULTS.glob("template-*.db"):
        if old != target:
            old.unlink()
    ctx.log(
        f"  built {target.name}: {events:,} events ({reduced:,} reduced), "
        f"{len(state.sessions):,} sessions, {target.stat().st_size / 2**20:,.0f} MiB "
        f"in {time.time() - t0:.1f} s"
    )
    return target


def install(template: Path, state_dir: Path) -> Path:
    """Copy the template to a daemon's state directory."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    db = state_dir / DB_NAME
    shutil.copy(template, db)
    return db


def add_outbox(db: Path, n: int) -> None:
    """Queue n messages directly (as the writer would have stored them)."""
    now = time.time()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN")
    rows = []
    for i in range(n):
        body = outgoing_message(i)
        rows.append(("bench_note", body, len(body.encode()), now, now, None))
    con.executemany(
        "INSERT INTO outbox (type, body, size, state, created_at, updated_at, expires_at) "
        "VALUES (?,?,?,'queued',?,?,?)",
        rows,
    )
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def session_ids(db: Path) -> list[int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in con.execute("SELECT id FROM sessions ORDER BY id")]
    finally:
        con.close()
