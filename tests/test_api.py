"""The local API: in process (an `Api` over a real `Store`, served on a real Unix socket) for
the endpoints, errors, peer credentials, follow streams and fuzzing; a real daemon process for
the README's curl examples, resuming a follow across a restart and the socket takeover rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import aiohttp
import pytest
from aiohttp import web
from conftest import DaemonProcess, SimProcess, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_syncd import ctl
from kimi_syncd.api import Api, bind_unix_socket
from kimi_syncd.errors import EX_CANTCREAT, FatalError
from kimi_syncd.protocol import decode
from kimi_syncd.store import Frame, LinkEvent, Store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = (Path(__file__).parent / "data" / "examples.jsonl").read_text("utf-8").splitlines()
NOBODY = 65534
STAFF = 50  # a group "nobody" is not a member of in /etc/group


# -- an in-process API on a Unix socket --------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err.get("code") if isinstance(err, dict) else None


class Served:
    def __init__(self, api: Api, store: Store, runner: web.AppRunner, path: Path) -> None:
        self.api = api
        self.store = store
        self.runner = runner
        self.path = path
        self.http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))
        self.store_closed = False

    async def request(
        self,
        method: str,
        target: str,
        *,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        async with self.http.request(
            method, "http://kimi" + target, data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return Reply(resp.status, body, dict(resp.headers))

    async def get(self, target: str) -> Reply:
        return await self.request("GET", target)

    async def post(self, target: str, body: Any, headers: dict[str, str] | None = None) -> Reply:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await self.request("POST", target, data=data, headers=headers)

    async def ingest(self, lines: list[str], received_at: float | None = None) -> None:
        for line in lines:
            await self.store.writer.ingest(Frame(decode(line), received_at or time.time(), None))
        await self.store.writer.flush()

    async def close_store(self) -> None:
        self.store_closed = True
        await self.store.close()

    async def close(self) -> None:
        await self.api.close_followers()
        await self.http.close()
        await self.runner.cleanup()
        if not self.store_closed:
            await self.store.close()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(short_dir: Path) -> AsyncIterator[Serve]:
    made: list[Served] = []

    async def start(
        *,
        metrics: Callable[[], bytes] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        **sections: dict[str, Any],
    ) -> Served:
        s = settings_for(short_dir, **sections)
        store = await Store.open(s.store, s.outbox)
        api = Api(
            store,
            max_body_bytes=s.api.max_body_bytes,
            write_group=s.api.write_group,
            default_ttl=s.outbox.default_ttl,
            follow_buffer=s.api.follow_buffer,
            heartbeat=s.api.heartbeat,
            status=status or (lambda: {"link": None}),
            metrics=metrics,
        )
        runner = web.AppRunner(api.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = bind_unix_socket(s.api.socket, s.api.mode, s.api.write_group)
        await web.SockSite(runner, sock).start()
        served = Served(api, store, runner, s.api.socket)
        made.append(served)
        return served

    yield start
    for served in made:
        await served.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def raw_request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.0\r\nHost: kimi\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def parse_raw(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- the socket ------------------------------------------------------------------------------


def test_socket_mode_stale_replaced_live_refused(short_dir: Path) -> None:
    path = short_dir / "run" / "api.sock"
    sock = bind_unix_socket(path, 0o660, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    # The directory we create is private, but searchable by those the socket lets in.
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o710
    # A live socket: a second daemon refuses with a clear error and EX_CANTCREAT (73).
    with pytest.raises(FatalError, match="already listening") as info:
        bind_unix_socket(path, 0o660, None)
    assert info.value.exit_code == EX_CANTCREAT == 73
    assert path.exists()
    # A stale one (its daemon died without unlinking): replaced, with the new mode.
    sock.close()
    assert path.exists()
    again = bind_unix_socket(path, 0o600, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again.close()
    # Anything that is not a socket is never replaced.
    path.unlink()
    path.write_text("precious")
    with pytest.raises(FatalError, match="not a socket") as info:
        bind_unix_socket(path, 0o660, None)
    assert info.value.exit_code == 73
    assert path.read_text() == "precious"


# -- reads -----------------------------------------------------------------------------------


STATUS_SHAPE = {
    "version": None,
    "uptime_s": None,
    "link": {
        "state": None,
        "url": None,
        "since": None,
        "last_error": None,
        "rtt_ms": None,
        "breaker": {"state": None, "failures": None, "next_attempt_at": None},
    },
    "active_session_id": None,
    "events": {"total": None, "last_seq": None},
    "rejected": {"total": None, "by_reason": None},
    "outbox": {"pending": None, "oldest_pending_age_s": None, "by_state": None},
    "db": {"path": None, "size_bytes": None},
}


def assert_shape(value: Any, shape: dict[str, Any], where: str = "status") -> None:
    assert isinstance(value, dict), (where, value)
    for key, sub in shape.items():
        assert key in value, f"{where}.{key} missing"
        if isinstance(sub, dict):
            assert_shape(value[key], sub, f"{where}.{key}")


async def test_health_and_pinned_status_shape(serve: Serve) -> None:
    srv = await serve()
    health = await srv.get("/v1/health")
    assert (health.status, health.body["ok"]) == (200, True)
    # No link yet (in process): the shape is pinned all the same.
    st0 = await srv.get("/v1/status")
    assert st0.status == 200
    assert_shape(st0.body, STATUS_SHAPE)
    assert st0.body["link"]["state"] == "stopped"
    await srv.ingest(EXAMPLES)
    await srv.post("/v1/outbox", {"type": "ping"})
    body = (await srv.get("/v1/status")).body
    assert_shape(body, STATUS_SHAPE)
    assert body["events"] == {**body["events"], "total": 27, "last_seq": 27}
    assert body["active_session_id"] == 44
    assert body["outbox"]["pending"] == 1
    assert body["outbox"]["by_state"]["queued"] == 1
    assert isinstance(body["outbox"]["oldest_pending_age_s"], float)
    assert body["db"]["path"] == str(srv.store.db_path)
    assert body["db"]["size_bytes"] > 0
    assert body["rejected"] == {"total": 0, "by_reason": {}}
    # With a link, its fields come from the provider.
    link = {
        "state": "connected",
        "url": "ws://127.0.0.1:1/ws",
        "since": "2026-01-01T00:00:00.000Z",
        "last_error": None,
        "rtt_ms": 1.5,
        "breaker": {"state": "closed", "failures": 0, "next_attempt_at": None},
    }
    srv.api.status_provider = lambda: {"link": link}
    assert (await srv.get("/v1/status")).body["link"] == link


async def test_sessions_filters_and_lookups(serve: Serve) -> None:
    srv = await serve()
    assert (await srv.get("/v1/sessions")).body == {"sessions": []}
    active = await srv.get("/v1/sessions/active")
    assert (active.status, active.code) == (404, "no_active_session")
    await srv.ingest(EXAMPLES)
    sessions = (await srv.get("/v1/sessions")).body["sessions"]
    for s in sessions:
        assert {"id", "name", "active", "deleted", "context"} <= s.keys()
    assert [s["id"] for s in sessions] == [41, 42, 43, 44, 45]  # deleted ones hidden
    everything = (await srv.get("/v1/sessions?include_deleted=true")).body["sessions"]
    assert [s["id"] for s in everything] == [37, 38, 39, 40, 41, 42, 43, 44, 45]
    assert all(s["deleted"] for s in everything if s["id"] < 41)
    only_active = (await srv.get("/v1/sessions?active=true")).body["sessions"]
    assert [s["id"] for s in only_active] == [44]
    inactive = (await srv.get("/v1/sessions?active=0")).body["sessions"]
    assert 44 not in [s["id"] for s in inactive]
    assert (await srv.get("/v1/sessions/active")).body["id"] == 44
    one = await srv.get("/v1/sessions/42")
    assert (one.status, one.body["name"]) == (200, "Session Nvidia 14:03:27")
    assert one.body["context"]["percentage"] == pytest.approx(39.75, abs=0.01)
    for target, status, code in [
        ("/v1/sessions/7", 404, "no_such_session"),
        ("/v1/sessions/abc", 400, "bad_parameter"),
        ("/v1/sessions/99999999999999999999999", 400, "bad_parameter"),
        ("/v1/sessions?active=maybe", 400, "bad_parameter"),
    ]:
        reply = await srv.get(target)
        assert (reply.status, reply.code) == (status, code), target


async def test_gauge_endpoint_is_one_text_line(serve: Serve) -> None:
    srv = await serve()
    assert (await srv.get("/v1/gauge")).body == "kimi ·\n"  # no active session yet
    assert (await srv.get("/v1/gauge?none=idle")).body == "idle\n"
    await srv.ingest(EXAMPLES)
    active = (await srv.get("/v1/sessions/active")).body
    pct = active["context"]["percentage"]
    plain = await srv.get("/v1/gauge")
    assert plain.status == 200 and plain.headers["Content-Type"].startswith("text/plain")
    expected = "kimi ?%" if pct is None else f"kimi {pct:.0f}%"
    assert plain.body == expected + "\n"
    named = await srv.get("/v1/gauge?format=%7Bname%7D%20%7Bid%7D&color=true&warn=0&crit=0")
    assert named.body.endswith("\n") and f"{active['name']} 44" in named.body
    assert "\033[" in named.body  # coloured on request only
    bad = await srv.get("/v1/gauge?format=%7Bnope%7D")
    assert (bad.status, bad.code) == (400, "bad_parameter")


async def test_events_paging_filters_and_shape(serve: Serve) -> None:
    srv = await serve()
    await srv.ingest(EXAMPLES)
    first = (await srv.get("/v1/events?since=0&limit=10")).body
    assert [e["seq"] for e in first["events"]] == list(range(1, 11))
    assert first["next_since"] == 10
    item = first["events"][0]
    assert set(item) == {"seq", "kind", "type", "session_id", "received_at", "body"}
    assert (item["kind"], item["type"], item["session_id"]) == ("event", "init", 42)
    assert item["body"] == json.loads(EXAMPLES[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", item["received_at"])
    # Paging by next_since covers everything once.
    seen: list[int] = []
    since = 0
    while True:
        page = (await srv.get(f"/v1/events?since={since}&limit=7")).body
        seen += [e["seq"] for e in page["events"]]
        if not page["events"]:
            break
        since = page["next_since"]
    assert seen == list(range(1, 28))
    assert since == 27
    # Filters; next_since moves past what did not match, so pollers do not rescan it.
    s42 = (await srv.get("/v1/events?session=42")).body
    assert [e["seq"] for e in s42["events"]] == [1, 2, 5, 21, 22, 23, 24, 25, 26]
    assert s42["next_since"] == 27
    typed = (await srv.get("/v1/events?type=compaction_event")).body
    assert [e["seq"] for e in typed["events"]] == [11, 12]
    none = (await srv.get("/v1/events?type=nothing_like_it")).body
    assert (none["events"], none["next_since"]) == ([], 27)
    # Link events are records too, with kind "link".
    srv.store.writer.ingest_nowait(LinkEvent("connected", {"url": "ws://x"}, time.time()))
    await srv.store.writer.flush()
    links = (await srv.get("/v1/events?kind=link")).body["events"]
    assert [(e["seq"], e["kind"], e["type"]) for e in links] == [(28, "link", "connected")]
    assert links[0]["body"]["url"] == "ws://x"
    for target in (
        "/v1/events?since=-1",
        "/v1/events?since=x",
        "/v1/events?limit=0",
        "/v1/events?limit=10001",
        "/v1/events?kind=other",
        "/v1/events?session=4.5",
        "/v1/events?follow=perhaps",
        "/v1/events?type=" + "t" * 300,
    ):
        reply = await srv.get(target)
        assert (reply.status, reply.code) == (400, "bad_parameter"), target


async def test_gap_reported_when_retention_removed_events(serve: Serve) -> None:
    srv = await serve()
    old = time.time() - 5 * 86400
    await srv.ingest(EXAMPLES[:20], received_at=old)
    await srv.ingest(EXAMPLES[20:])
    w = srv.store.writer
    while await w.prune(retention_days=1, max_events=0):
        pass
    assert w.first_seq == 21
    page = (await srv.get("/v1/events?since=3")).body
    assert page["gap"]["from_seq"] == 4 and page["gap"]["to_seq"] == 20
    assert [e["seq"] for e in page["events"]] == list(range(21, 28))
    assert "gap" not in (await srv.get("/v1/events?since=20")).body
    lines = await follow_lines(srv, "since=3", until=lambda items: len(items) >= 8)
    assert lines[0] == {**lines[0], "kind": "gap", "from_seq": 4, "to_seq": 20}
    assert [item["seq"] for item in lines[1:8]] == list(range(21, 28))


async def test_gap_reported_after_everything_was_pruned_and_restart(
    make_settings: Callable[..., Any], serve: Serve
) -> None:
    s = make_settings()
    store = await Store.open(s.store, s.outbox)
    for line in EXAMPLES[:5]:
        await store.writer.ingest(Frame(decode(line), time.time() - 5 * 86400, None))
    await store.writer.flush()
    while await store.writer.prune(retention_days=1, max_events=0):
        pass
    await store.close()
    srv = await serve()  # same state directory: the events table is empty, seq 5 was used
    page = (await srv.get("/v1/events?since=0")).body
    assert page["events"] == []
    assert (page["gap"]["from_seq"], page["gap"]["to_seq"]) == (1, 5)


# -- follow ----------------------------------------------------------------------------------


async def follow_lines(
    srv: Served,
    query: str,
    until: Callable[[list[dict[str, Any]]], bool],
    action: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None,
    timeout: float = 20.0,
) -> list[dict[str, Any]]:
    """Follow, collecting lines until `until(lines)`; `action` runs after each line."""
    items: list[dict[str, Any]] = []
    async with srv.http.get(f"http://kimi/v1/events?follow=true&{query}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        while not until(items):
            line = await asyncio.wait_for(resp.content.readline(), timeout)
            if not line:
                break
            items.append(json.loads(line))
            if action is not None:
                await action(items)
    return items


async def test_follow_catches_up_then_streams_live_with_heartbeats(serve: Serve) -> None:
    srv = await serve(api={"heartbeat": 0.2})
    await srv.ingest(EXAMPLES[:10])
    fed = False

    async def feed(items: list[dict[str, Any]]) -> None:
        nonlocal fed
        if len(items) == 10 and not fed:  # caught up: now live records
            fed = True
            srv.store.writer.ingest_nowait(LinkEvent("connected", {"url": "ws://x"}, time.time()))
            await srv.ingest(EXAMPLES[10:])

    def done(items: list[dict[str, Any]]) -> bool:
        records = [i for i in items if i["kind"] in ("event", "link")]
        return len(records) >= 28 and items[-1]["kind"] == "heartbeat"

    items = await follow_lines(srv, "since=0", done, feed)
    records = [i for i in items if i["kind"] in ("event", "link")]
    assert [r["seq"] for r in records] == list(range(1, 29))
    link = next(r for r in records if r["kind"] == "link")
    assert (link["type"], link["session_id"], link["body"]["url"]) == ("connected", None, "ws://x")
    assert set(records[0]) == {"seq", "kind", "type", "session_id", "received_at", "body"}
    beat = next(i for i in items if i["kind"] == "heartbeat")
    assert beat["last_seq"] >= 10 and "at" in beat


async def test_follow_filters_and_resume_from_since(serve: Serve) -> None:
    srv = await serve(api={"heartbeat": 0.2})
    await srv.ingest(EXAMPLES[:15])

    async def feed(items: list[dict[str, Any]]) -> None:
        if len(items) == 3:
            await srv.ingest(EXAMPLES[15:])

    items = await follow_lines(srv, "since=0&session=42", lambda items: len(items) >= 9, feed)
    assert [i["seq"] for i in items] == [1, 2, 5, 21, 22, 23, 24, 25, 26]
    resumed = await follow_lines(srv, "since=24&kind=event", lambda items: len(items) >= 3)
    assert [i["seq"] for i in resumed] == [25, 26, 27]


async def test_follow_loses_nothing_committed_while_it_subscribes(serve: Serve) -> None:
    """A batch built before the follower subscribed but committed after its catch-up
    snapshot is published to nobody: the stream must still deliver it (from the database)."""
    srv = await serve(api={"heartbeat": 0.2})
    w = srv.store.writer
    gate = asyncio.Event()
    commit = w.db.commit

    async def gated_commit() -> None:
        await gate.wait()
        await commit()

    w.db.commit = gated_commit  # type: ignore[method-assign]
    try:
        await w.ingest(Frame(decode(EXAMPLES[0]), time.time(), None))
        await wait_until(lambda: w.ingest_depth == 0)  # the batch is built, not committed
        async with srv.http.get("http://kimi/v1/events?follow=true&since=0") as resp:
            assert resp.status == 200  # the catch-up ran: it could not see seq 1
            gate.set()
            first = json.loads(await asyncio.wait_for(resp.content.readline(), 10))
            assert (first["kind"], first["seq"]) == ("event", 1)
            await srv.ingest(EXAMPLES[1:3])
            more = [json.loads(await resp.content.readline()) for _ in range(2)]
            assert [m["seq"] for m in more] == [2, 3]
    finally:
        gate.set()
        del w.db.commit


async def test_follow_end_line_when_daemon_stops(serve: Serve) -> None:
    srv = await serve(api={"heartbeat": 30})
    await srv.ingest(EXAMPLES[:4])

    async def stop(items: list[dict[str, Any]]) -> None:
        if len(items) == 4:
            await srv.api.close_followers()

    items = await follow_lines(srv, "since=0", lambda items: False, stop)
    assert items[-1] == {"kind": "end", "reason": "daemon stopping", "resume_since": 4}
    assert [i["seq"] for i in items[:-1]] == [1, 2, 3, 4]


def _follower_socket(path: Path, query: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(path))
    sock.sendall(raw_request("GET", f"/v1/events?follow=true&{query}"))
    sock.settimeout(20)
    return sock


async def _flood_until_overflow(srv: Served, limit: int = 20_000) -> int:
    """Ingest examples until every follower has overflowed; return how many were sent."""
    await wait_until(lambda: bool(srv.store.writer.subscribers))
    sent = 0
    while not all(sub.overflowed for sub in srv.store.writer.subscribers):
        assert sent < limit, "followers never overflowed"
        await srv.ingest(EXAMPLES * 4)
        sent += len(EXAMPLES) * 4
    await srv.ingest(EXAMPLES)
    return sent + len(EXAMPLES)


async def test_follow_too_slow_reader_gets_a_clear_last_line(serve: Serve) -> None:
    srv = await serve(api={"follow_buffer": 5, "heartbeat": 30}, store={"batch_max": 5})
    sock = _follower_socket(srv.path, "since=0")
    try:
        total = await _flood_until_overflow(srv)  # and the follower does not read meanwhile
        raw = await asyncio.to_thread(read_all, sock)
    finally:
        sock.close()
    status, body = parse_raw(raw)
    assert status == 200
    items = [json.loads(line) for line in body.splitlines()]
    last = items[-1]
    assert (last["kind"], last["code"]) == ("error", "too_slow")
    assert "too slow" in last["message"] and "since=" in last["message"]
    seqs = [i["seq"] for i in items[:-1]]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap before the cut
    assert last["resume_since"] == seqs[-1] < total
    rest = (await srv.get(f"/v1/events?since={last['resume_since']}&limit=10000")).body
    assert rest["events"][0]["seq"] == last["resume_since"] + 1
    assert rest["events"][-1]["seq"] == total


async def test_follow_reader_that_never_reads_is_dropped(serve: Serve) -> None:
    srv = await serve(api={"follow_buffer": 5, "heartbeat": 30}, store={"batch_max": 5})
    srv.api.stall_cut_off = 0.3
    sock = _follower_socket(srv.path, "since=0")
    try:
        await _flood_until_overflow(srv)
        await wait_until(lambda: not srv.api.followers and not srv.store.writer.subscribers)
    finally:
        sock.close()
    assert (await srv.get("/v1/health")).status == 200


# -- writes ----------------------------------------------------------------------------------


async def test_enqueue_is_durable_with_ttl_idempotency_and_batches(serve: Serve) -> None:
    srv = await serve(outbox={"default_ttl": 3600})
    reply = await srv.post("/v1/outbox", {"type": "memory_compress_preview", "requestId": "a"})
    assert reply.status == 202
    assert reply.body == {"id": 1, "state": "queued", "created": True}
    # 202 means committed: another connection sees it at once.
    with contextlib.closing(sqlite3.connect(srv.store.db_path)) as db:
        row = db.execute("SELECT state, body FROM outbox WHERE id=1").fetchone()
    assert row[0] == "queued" and json.loads(row[1])["requestId"] == "a"
    got = (await srv.get("/v1/outbox/1")).body
    assert set(got) >= {
        "id", "type", "state", "attempts", "last_error", "created_at", "updated_at",
        "sent_at", "delivered_at", "expires_at", "connection_id", "caller_uid",
        "idempotency_key", "size", "body",
    }  # fmt: skip
    assert (got["type"], got["caller_uid"], got["attempts"]) == ("memory_compress_preview", 0, 0)
    assert got["expires_at"] is not None  # outbox.default_ttl
    never = await srv.post("/v1/outbox?ttl=0", {"type": "x"})
    assert (await srv.get(f"/v1/outbox/{never.body['id']}")).body["expires_at"] is None
    soon = await srv.post("/v1/outbox?ttl=60", {"type": "x"})
    row2 = (await srv.get(f"/v1/outbox/{soon.body['id']}")).body
    assert row2["expires_at"] > row2["created_at"]
    # Idempotency-Key: same body → same id (200); another body → 409.
    key = {"Idempotency-Key": "prev-1"}
    one = await srv.post("/v1/outbox", {"type": "t", "n": 1}, key)
    same = await srv.post("/v1/outbox", {"type": "t", "n": 1}, key)
    other = await srv.post("/v1/outbox", {"type": "t", "n": 2}, key)
    assert (one.status, same.status, other.status) == (202, 200, 409)
    assert same.body["id"] == one.body["id"] and same.body["created"] is False
    assert other.code == "idempotency_conflict"
    for bad in ("", "k" * 201, "caf\u00e9"):
        reply = await srv.request(
            "POST", "/v1/outbox", data=b'{"type":"t"}', headers={"Idempotency-Key": bad}
        )
        assert (reply.status, reply.code) == (400, "bad_header"), bad
    # NDJSON batch: all or nothing.
    ndjson = {"Content-Type": "application/x-ndjson"}
    batch = await srv.post("/v1/outbox", '{"type":"a"}\n\n{"type":"b","x":1}\n', ndjson)
    assert batch.status == 202
    ids = [m["id"] for m in batch.body["messages"]]
    assert len(ids) == 2 and ids[1] == ids[0] + 1
    before = srv.store.writer.outbox.pending
    broken = await srv.post("/v1/outbox", '{"type":"a"}\n{"type":\n', ndjson)
    assert (broken.status, broken.code) == (400, "bad_json")
    assert "line 2" in broken.body["error"]["message"]
    assert srv.store.writer.outbox.pending == before
    # Listing, by state.
    listed = (await srv.get("/v1/outbox?state=pending")).body["messages"]
    assert [m["id"] for m in listed] == list(range(1, ids[1] + 1))
    assert (await srv.get("/v1/outbox?state=delivered")).body["messages"] == []
    paged = (await srv.get("/v1/outbox?limit=2&after=1")).body
    assert [m["id"] for m in paged["messages"]] == [2, 3] and paged["next_after"] == 3


async def test_outbox_lifecycle_and_cancel(serve: Serve) -> None:
    srv = await serve()
    a = (await srv.post("/v1/outbox", {"type": "a"})).body["id"]
    b = (await srv.post("/v1/outbox", {"type": "b"})).body["id"]
    w = srv.store.writer
    w.transition([a], "sent", conn_id=None)
    await w.flush()
    w.transition([a], "delivered")
    await w.flush()
    done = (await srv.get(f"/v1/outbox/{a}")).body
    assert done["state"] == "delivered" and done["attempts"] == 1
    assert done["sent_at"] is not None and done["delivered_at"] is not None
    refused = await srv.request("DELETE", f"/v1/outbox/{a}")
    assert (refused.status, refused.code) == (409, "not_pending")
    cancelled = await srv.request("DELETE", f"/v1/outbox/{b}")
    assert (cancelled.status, cancelled.body["state"]) == (200, "cancelled")
    again = await srv.request("DELETE", f"/v1/outbox/{b}")
    assert (again.status, again.code) == (409, "not_pending")
    for method, target, status in [
        ("DELETE", "/v1/outbox/999", 404),
        ("GET", "/v1/outbox/999", 404),
        ("GET", "/v1/outbox/x", 400),
        ("DELETE", "/v1/outbox/99999999999999999999999", 400),
        ("GET", "/v1/outbox?state=lost", 400),
    ]:
        assert (await srv.request(method, target)).status == status, target
    assert w.running and w.fault is None  # none of that hurt the writer
    rebuilt = await srv.request("POST", "/v1/rebuild")
    assert rebuilt.status == 200 and rebuilt.body["events_replayed"] == 0


async def test_outbox_limits_429_and_507(serve: Serve) -> None:
    srv = await serve(outbox={"max_messages": 2, "max_bytes": 1024})
    assert (await srv.post("/v1/outbox", {"type": "a"})).status == 202
    assert (await srv.post("/v1/outbox", {"type": "b"})).status == 202
    full = await srv.post("/v1/outbox", {"type": "c"})
    assert (full.status, full.code) == (429, "outbox_full_messages")
    assert full.headers["Retry-After"] and "max_messages" in full.body["error"]["message"]
    await srv.request("DELETE", "/v1/outbox/1")
    big = await srv.post("/v1/outbox", {"type": "big", "pad": "x" * 1100})
    assert (big.status, big.code) == (507, "outbox_full_bytes")
    assert "max_bytes" in big.body["error"]["message"]


async def test_store_faults_are_503_or_507_and_never_hang(serve: Serve) -> None:
    srv = await serve()
    await srv.ingest(EXAMPLES[:3])
    w = srv.store.writer
    w.fault, w.fault_code = "I/O error: simulated", "io_error"
    reply = await srv.post("/v1/outbox", {"type": "a"})
    assert (reply.status, reply.code) == (503, "io_error")
    assert (await srv.get("/v1/health")).status == 503
    w.fault, w.fault_code = "disk full: simulated", "disk_full"
    assert (await srv.post("/v1/outbox", {"type": "a"})).status == 507
    w.fault = w.fault_code = None
    assert (await srv.post("/v1/outbox", {"type": "a"})).status == 202
    # The store closed under the API: every answer is a prompt 503, none hangs.
    await srv.close_store()
    for method, target in [
        ("POST", "/v1/outbox"),
        ("DELETE", "/v1/outbox/1"),
        ("POST", "/v1/rebuild"),
        ("GET", "/v1/events"),
        ("GET", "/v1/events?follow=true"),
        ("GET", "/v1/outbox"),
        ("GET", "/v1/outbox/1"),
        ("GET", "/v1/health"),
    ]:
        got = await asyncio.wait_for(
            srv.request(method, target, data=b'{"type":"a"}' if method == "POST" else None), 10
        )
        assert got.status == 503, (method, target, got)
        assert got.code is not None or target == "/v1/health"


# -- errors ----------------------------------------------------------------------------------


async def test_error_statuses_are_json(serve: Serve) -> None:
    srv = await serve(api={"max_body_bytes": 256})
    unknown = await srv.get("/v2/nothing")
    assert (unknown.status, unknown.code) == (404, "not_found")
    assert "no such endpoint" in unknown.body["error"]["message"]
    for method, target in [("PUT", "/v1/status"), ("POST", "/v1/sessions/active"),
                           ("PATCH", "/v1/outbox/1"), ("GET", "/v1/rebuild")]:  # fmt: skip
        reply = await srv.request(method, target)
        assert (reply.status, reply.code) == (405, "method_not_allowed"), target
        assert reply.headers["Allow"], target
        assert reply.headers["Content-Type"].startswith("application/json")
    assert set((await srv.request("PUT", "/v1/status")).headers["Allow"].split(",")) == {
        "GET",
        "HEAD",
    }
    assert "DELETE" in (await srv.request("PUT", "/v1/outbox/1")).headers["Allow"]
    too_big = await srv.post("/v1/outbox", {"type": "a", "pad": "x" * 400})
    assert (too_big.status, too_big.code) == (413, "body_too_large")
    for body, code in [
        (b"{nope", "bad_json"),
        (b'{"type": NaN}', "bad_json"),
        (b'{"type":"a","x":"\\ud800"}', "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_message"),
        (b'{"no_type": 1}', "bad_message"),
        (b'{"type": ""}', "bad_message"),
        (b"", "bad_message"),
        (b"[" * 200, "bad_json"),
        (b'{"type":"a","x":1e999}', "bad_json"),
    ]:
        reply = await srv.request("POST", "/v1/outbox", data=body)
        assert (reply.status, reply.code) == (400, code), body
    bad_ttl = await srv.post("/v1/outbox?ttl=soon", {"type": "a"})
    assert (bad_ttl.status, bad_ttl.code) == (400, "bad_parameter")
    # A web page can never talk to the daemon, not even to read.
    for method, target in [("GET", "/v1/status"), ("POST", "/v1/outbox")]:
        reply = await srv.request(
            method, target, data=b'{"type":"a"}', headers={"Origin": "https://evil.example"}
        )
        assert (reply.status, reply.code) == (403, "origin_refused")
    assert srv.store.writer.outbox.pending == 0
    assert (await srv.get("/v1/health")).status == 200


async def test_metrics_endpoint(serve: Serve) -> None:
    srv = await serve(
        metrics=lambda: b"# TYPE kimi_syncd_last_seq gauge\nkimi_syncd_last_seq 0.0\n"
    )
    reply = await srv.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    srv.api.metrics = None
    assert (await srv.get("/metrics")).status == 404


# -- peer credentials --------------------------------------------------------------------------


def _as_user(
    path: Path, request: bytes, uid: int, gid: int, groups: list[int]
) -> tuple[int, bytes]:
    """Send one request from a forked child running as uid/gid; return the child's result."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(rfd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(request)
            data = read_all(sock)
        except BaseException as exc:
            data, code = f"CHILD {type(exc).__name__}: {exc}".encode(), 1
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view) :]
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


@requires_root
async def test_peer_credentials_decide_who_may_write(short_dir: Path, serve: Serve) -> None:
    short_dir.chmod(0o755)  # let "nobody" reach the socket
    srv = await serve(api={"socket_mode": "0666", "write_group": str(STAFF)})
    assert stat.S_IMODE(srv.path.stat().st_mode) == 0o666
    await srv.ingest(EXAMPLES[:3])
    mine = (await srv.post("/v1/outbox", {"type": "a"})).body["id"]

    async def as_nobody(req: bytes, groups: list[int], gid: int = NOBODY) -> tuple[int, Any]:
        rc, out = await asyncio.to_thread(_as_user, srv.path, req, NOBODY, gid, groups)
        assert rc == 0, out
        status, body = parse_raw(out)
        return status, json.loads(body)

    # Reading is open to whoever can reach the socket.
    status, body = await as_nobody(raw_request("GET", "/v1/status"), [])
    assert status == 200 and body["events"]["last_seq"] == 3
    # Writing is not: 403, saying how to get access.
    for req in (
        raw_request("POST", "/v1/outbox", b'{"type":"x"}'),
        raw_request("DELETE", f"/v1/outbox/{mine}"),
        raw_request("POST", "/v1/rebuild"),
    ):
        status, body = await as_nobody(req, [])
        assert (status, body["error"]["code"]) == (403, "forbidden")
        message = body["error"]["message"]
        assert f"uid {NOBODY}" in message and "api.write_group" in message
    assert srv.store.writer.outbox.pending == 1
    # A member of api.write_group may, as a supplementary or as the primary group.
    status, body = await as_nobody(raw_request("POST", "/v1/outbox", b'{"type":"x"}'), [STAFF])
    assert status == 202
    got = (await srv.get(f"/v1/outbox/{body['id']}")).body
    assert got["caller_uid"] == NOBODY
    status, _ = await as_nobody(raw_request("DELETE", f"/v1/outbox/{mine}"), [], gid=STAFF)
    assert status == 200


@requires_root
async def test_socket_mode_keeps_other_users_out(short_dir: Path, serve: Serve) -> None:
    short_dir.chmod(0o755)
    srv = await serve()  # default socket_mode 0660, owned by root
    assert stat.S_IMODE(srv.path.stat().st_mode) == 0o660
    rc, out = await asyncio.to_thread(
        _as_user, srv.path, raw_request("GET", "/v1/status"), NOBODY, NOBODY, []
    )
    assert rc == 1 and b"PermissionError" in out


# -- fuzzing ---------------------------------------------------------------------------------


class ThreadedApi:
    """The API on its own event loop in a thread, for synchronous (Hypothesis) clients."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop_future: asyncio.Future[None] | None = None
        self.api: Api | None = None
        self.path = directory / "api.sock"
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        s = settings_for(self.directory, api={"max_body_bytes": 4096})
        store = await Store.open(s.store, s.outbox)
        for line in EXAMPLES:
            await store.writer.ingest(Frame(decode(line), time.time(), None))
        await store.writer.flush()
        self.api = Api(
            store,
            max_body_bytes=s.api.max_body_bytes,
            write_group=None,
            default_ttl=0,
            follow_buffer=100,
            heartbeat=0.2,
            status=lambda: {"link": None},
            metrics=lambda: b"",
        )
        runner = web.AppRunner(self.api.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.SockSite(runner, bind_unix_socket(self.path, 0o600, None)).start()
        self.stop_future = asyncio.get_running_loop().create_future()
        self.ready.set()
        try:
            await self.stop_future
        finally:
            await self.api.close_followers()
            await runner.cleanup()
            await store.close()

    def __enter__(self) -> ThreadedApi:
        self.thread.start()
        assert self.ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop_future is not None:
            self.loop.call_soon_threadsafe(self.stop_future.set_result, None)
        self.thread.join(30)
        self.loop.close()

    def send(self, raw: bytes, timeout: float = 20.0) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            return read_all(sock)


@pytest.fixture
def threaded_api(short_dir: Path) -> Iterator[ThreadedApi]:
    with ThreadedApi(short_dir) as server:
        yield server


SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "v1",
            "status",
            "sessions",
            "active",
            "events",
            "outbox",
            "metrics",
            "health",
            "rebuild",
            "connections",
            "42",
            "44",
            "1",
            "0",
            "-1",
            "99999999999999999999999",
            "%00",
            "%ff",
            "%ED%A0%80",
            "..",
            ".",
            "",
            "%2F",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@", max_size=12),
)
WIDE_INTS = st.one_of(st.integers(-(2**70), 2**70), st.integers(-5, 50))
PATHS = st.one_of(
    st.sampled_from(["/v1/status", "/v1/events", "/v1/outbox", "/v1/sessions", "/v1/outbox/1"]),
    st.tuples(st.sampled_from(["/v1/outbox/", "/v1/sessions/"]), WIDE_INTS).map(
        lambda t: f"{t[0]}{t[1]}"
    ),
    st.lists(SEGMENTS, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
ROUTES = st.sampled_from(
    [
        ("GET", "/v1/status"),
        ("GET", "/v1/health"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/active"),
        ("GET", "/v1/sessions/{}"),
        ("GET", "/v1/events"),
        ("HEAD", "/v1/events"),
        ("POST", "/v1/outbox"),
        ("POST", "/v1/outbox"),
        ("POST", "/v1/outbox"),
        ("GET", "/v1/outbox"),
        ("GET", "/v1/outbox/{}"),
        ("DELETE", "/v1/outbox/{}"),
        ("POST", "/v1/rebuild"),
        ("GET", "/v1/connections"),
        ("GET", "/metrics"),
    ]
)
REQUESTS = st.one_of(
    st.tuples(ROUTES, WIDE_INTS).map(lambda t: (t[0][0], t[0][1].format(t[1]))),
    st.tuples(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]), PATHS),
)
PARAM_NAMES = st.sampled_from(
    [
        "since",
        "limit",
        "session",
        "type",
        "kind",
        "state",
        "after",
        "ttl",
        "batch",
        "active",
        "include_deleted",
        "x",
        "",
    ]
)
PARAM_VALUES = st.one_of(
    st.text(max_size=30).map(lambda t: quote(t, safe="")),
    st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe="")),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["true", "false", "nan", "inf", "-0", "1e400", "0x10", "１２"]),
)
HEADER_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Idempotency-Key",
            "Accept",
            "X-Anything",
            "Cookie",
            "Accept-Encoding",
            "Expect",
            "Range",
            "If-None-Match",
        ]
    ),
    st.one_of(HEADER_VALUE, st.just("application/x-ndjson"), st.just("application/json")),
    max_size=4,
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
TRICKY_JSON = st.sampled_from(
    [
        b'{"type":"\\ud800"}',
        b'{"type":"a","x":"\\udfff\\ud800"}',
        b'{"type":"a","x":NaN}',
        b'{"type":"a","x":-Infinity}',
        b'{"type":"a","x":1e999}',
        b'{"type":"a","x":' + b"9" * 5000 + b"}",
        b'{"type":"a","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"type":"\\u0000"}',
        b'{"type":"a"}\n{"type":"\\ud800"}',
        b'{"type":"a","type":"b"}',
        b"\xef\xbb\xbf{}",
    ]
)
BODIES = st.one_of(
    TRICKY_JSON,
    st.binary(max_size=200),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), JSONISH, max_size=4).map(
        lambda d: json.dumps({"type": "fuzz", **d}).encode()
    ),
    st.lists(JSONISH.map(json.dumps), max_size=4).map(lambda ls: "\n".join(ls).encode()),
    st.integers(5000, 6000).map(lambda n: b"x" * n),
)


def test_fuzz_never_a_5xx_and_the_api_keeps_serving(threaded_api: ThreadedApi) -> None:
    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(
        request=REQUESTS,
        params=st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=4),
        headers=HEADERS,
        body=BODIES,
    )
    def one_request(
        request: tuple[str, str],
        params: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        method, path = request
        query = "&".join(f"{k}={v}" for k, v in params)
        target = path + (f"?{query}" if query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw = threaded_api.send(
            f"{method} {target} HTTP/1.0\r\nHost: kimi\r\n".encode()  # raw UTF-8 too
            + extra.encode("latin-1")
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, payload = parse_raw(raw)
        assert status < 500, (status, payload[:300])
        if status >= 400 and method != "HEAD" and payload.startswith(b"{"):
            err = json.loads(payload)["error"]
            assert err["code"] and err["message"]

    one_request()
    # Still serving, reads and writes, and the store took no harm.
    status, _ = parse_raw(threaded_api.send(raw_request("GET", "/v1/health")))
    assert status == 200
    status, body = parse_raw(threaded_api.send(raw_request("POST", "/v1/outbox", b'{"type":"a"}')))
    assert status == 202, body
    assert threaded_api.api is not None
    assert threaded_api.api.writer.running and threaded_api.api.writer.fault is None


# -- a real daemon ---------------------------------------------------------------------------


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text("utf-8")
    block = text.split("<!-- api-examples:start -->", 1)[1].split("<!-- api-examples:end -->")[0]
    code = block.split("```sh", 1)[1].split("```", 1)[0]
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]


def test_readme_has_the_examples() -> None:
    commands = readme_examples()
    assert len(commands) >= 8
    assert all("--unix-socket $S" in c for c in commands)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_run(
    daemon_factory: Callable[..., DaemonProcess], sim_factory: Callable[..., SimProcess]
) -> None:
    sim = sim_factory(rate=0).start()
    d = daemon_factory(sim.url)
    d.config.write_text("[upstream]\nping_interval = 0.3\n")
    d.start()
    d.wait_for(lambda: d.get("/v1/status")["link"]["rtt_ms"] is not None, what="an RTT")
    sim.control("step", n=30)
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= 30, what="events")
    sock = shlex.quote(str(d.socket))
    outputs: dict[str, str] = {}
    for command in readme_examples():
        cmd = command.replace("$S", sock)
        follow = "follow=true" in cmd
        if follow:
            cmd = cmd.replace("curl ", "curl --max-time 2 ", 1)
        cmd = cmd.replace("curl ", "curl -sS --fail-with-body ", 1)
        proc = subprocess.run(
            ["bash", "-c", cmd], capture_output=True, text=True, timeout=30, check=False
        )
        if follow:
            assert proc.returncode == 28, (cmd, proc.returncode, proc.stderr)  # --max-time
            lines = [json.loads(line) for line in proc.stdout.splitlines()]
            seqs = [x["seq"] for x in lines if x["kind"] in ("event", "link")]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 30
            assert {x["kind"] for x in lines} >= {"event", "link"}
            continue
        assert proc.returncode == 0, (cmd, proc.returncode, proc.stdout, proc.stderr)
        outputs[command] = proc.stdout
        if "/metrics" not in cmd:
            json.loads(proc.stdout)
    metrics = next(v for k, v in outputs.items() if "/metrics" in k)
    for name in (
        "kimi_syncd_frames_total{",
        "kimi_syncd_rejected_frames_total",
        "kimi_syncd_reconnects_total",
        'kimi_syncd_breaker_state{state="closed"} 1.0',
        "kimi_syncd_rtt_seconds",
        'kimi_syncd_outbox_messages{state="queued"}',
        "kimi_syncd_commit_batch_size_bucket",
        "kimi_syncd_commit_seconds_bucket",
    ):
        assert name in metrics, name
    queued = next(json.loads(v) for k, v in outputs.items() if "Idempotency-Key" in k)
    assert queued["state"] == "queued"
    d.wait_for(lambda: d.get(f"/v1/outbox/{queued['id']}")["state"] == "delivered", what="delivery")
    assert d.stop() == 0


def _follow_in_thread(
    d: DaemonProcess, since: int, out: list[dict[str, Any]], stop_at: int | None
) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(ctl.CtlError, OSError):
            for line in d.client().stream(f"/v1/events?follow=true&since={since}"):
                item = json.loads(line)
                out.append(item)
                if stop_at is not None and item.get("seq", 0) >= stop_at:
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_follow_resumes_across_a_daemon_restart_without_gaps_or_duplicates(
    daemon_factory: Callable[..., DaemonProcess], sim_factory: Callable[..., SimProcess]
) -> None:
    sim = sim_factory(rate=40).start()
    d = daemon_factory(sim.url).start()
    first: list[dict[str, Any]] = []
    reader = _follow_in_thread(d, 0, first, None)
    d.wait_for(lambda: sum(1 for i in first if i["kind"] == "event") >= 20, what="events")
    assert d.stop() == 0  # events keep coming from the sim meanwhile
    reader.join(15)
    assert not reader.is_alive()
    assert first[-1]["kind"] == "end"
    seen = [i["seq"] for i in first if i["kind"] in ("event", "link")]
    assert first[-1]["resume_since"] == seen[-1]
    d.start()
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= seen[-1] + 30, what="more")
    target = d.get("/v1/status")["events"]["last_seq"]
    second: list[dict[str, Any]] = []
    _follow_in_thread(d, seen[-1], second, target).join(30)
    seen += [i["seq"] for i in second if i["kind"] in ("event", "link")]
    stored: list[int] = []
    since = 0
    while since < target:
        page = d.get(f"/v1/events?since={since}&limit=1000")
        stored += [e["seq"] for e in page["events"] if e["seq"] <= target]
        since = page["next_since"]
    assert seen == stored  # the same records, in order, none twice, none missing
    assert seen == list(range(1, target + 1))
    assert any(i["kind"] == "link" for i in first + second)
    assert d.stop() == 0


def test_second_daemon_refuses_a_live_socket(
    short_dir: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    first = daemon_factory("ws://127.0.0.1:9/ws").start()
    other = short_dir / "second"
    other.mkdir()
    second = DaemonProcess(other, "ws://127.0.0.1:9/ws")
    second.socket = first.socket
    try:
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(timeout=30) == 73
    finally:
        second.kill()
    assert "already listening" in second.output()
    assert first.get("/v1/health")["ok"] is True  # the first one is untouched
    assert first.stop() == 0
