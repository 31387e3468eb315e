"""Load generators and reference clients, each run as its own process.

    python -m bench.clients ws-bare URL N [--compression deflate|none]
    python -m bench.clients ws-naive URL N DB [--compression ...]
    python -m bench.clients ws-send URL N [--compression ...]
    python -m bench.clients http SOCKET --path P [--body-kind one|ndjson] [--conns C] ...
    python -m bench.clients pq-put DIR --seconds S
    python -m bench.clients pq-getack DIR --items K --seconds S

The WebSocket clients print "ready" once connected (after the backend's `init` frame), then
one JSON line with their measurements; the others print only the JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench.common import percentile

MESSAGE_PAD = "x" * 120  # outgoing messages of about 230 bytes


def outgoing_message(i: int, type_: str = "bench_note") -> str:
    """An outgoing message. The simulated backend ignores unknown types (no reply frames)."""
    return json.dumps(
        {"type": type_, "requestId": f"bench-{i}", "threshold": 0.3, "note": MESSAGE_PAD},
        separators=(",", ":"),
    )


def _compression(name: str) -> str | None:
    return None if name == "none" else name


def _ready() -> None:
    print("ready", flush=True)


# -- WebSocket receivers --------------------------------------------------------------------


async def ws_bare(url: str, n: int, compression: str) -> dict[str, Any]:
    """The limit: receive n frames and json.loads each, nothing else."""
    loads = json.loads
    async with connect(url, compression=_compression(compression), max_queue=64) as ws:
        await ws.recv()  # the init frame
        _ready()
        first = await ws.recv()
        t0 = time.time()
        c0 = time.process_time()
        loads(first)
        got = 1
        async for message in ws:
            loads(message)
            got += 1
            if got >= n:
                break
        t1 = time.time()
        cpu = time.process_time() - c0
    return {
        "frames": got,
        "first": t0,
        "last": t1,
        "rate": (got - 1) / (t1 - t0),
        "cpu_us_per_frame": cpu / got * 1e6,
    }


async def ws_naive(url: str, n: int, db_path: str, compression: str) -> dict[str, Any]:
    """The common approach: INSERT + commit per frame through aiosqlite, WAL, synchronous=FULL."""
    import aiosqlite

    db = await aiosqlite.connect(db_path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute(
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, received_at REAL, "
        "type TEXT, session_id INTEGER, body TEXT)"
    )
    await db.commit()
    lags: list[float] = []
    async with connect(url, compression=_compression(compression), max_queue=64) as ws:
        await ws.recv()
        _ready()
        got = 0
        t0 = 0.0
        async for message in ws:
            received = time.time()
            if got == 0:
                t0 = received
            obj = json.loads(message)
            await db.execute(
                "INSERT INTO events (received_at, type, session_id, body) VALUES (?,?,?,?)",
                (received, obj.get("type"), obj.get("session_id"), message),
            )
            await db.commit()
            lags.append(time.time() - received)
            got += 1
            if got >= n:
                break
        t1 = time.time()
    await db.close()
    return {
        "frames": got,
        "first": t0,
        "last": t1,
        "rate": (got - 1) / (t1 - t0),
        "lag_p50_ms": percentile(lags, 0.5) * 1000,
        "lag_p99_ms": percentile(lags, 0.99) * 1000,
        "commits_per_frame": 1.0,
    }


async def ws_send(url: str, n: int, compression: str) -> dict[str, Any]:
    """The drain limit: a bare send loop of n messages, confirmed by one ping/pong at the end."""
    messages = [outgoing_message(i) for i in range(n)]
    async with connect(url, compression=_compression(compression), max_queue=64) as ws:
        await ws.recv()
        _ready()
        t0 = time.time()
        for message in messages:
            await ws.send(message)
        pong = await ws.ping()
        await pong
        t1 = time.time()
    return {"messages": n, "seconds": t1 - t0, "rate": n / (t1 - t0)}


# -- HTTP over the Unix socket: a minimal keep-alive client ----------------------------------


async def _http_conn(
    sock: str,
    method: str,
    path: str,
    body_kind: str,
    batch: int,
    start: float,
    warm_until: float,
    stop_at: float,
    conn_no: int,
    lat: list[float],
    statuses: dict[int, int],
    paths: list[str],
) -> int:
    reader, writer = await asyncio.open_unix_connection(sock)
    counter = 0
    done = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            if body_kind == "none":
                body = b""
                ctype = ""
            elif body_kind == "one":
                body = outgoing_message(conn_no * 10_000_000 + counter).encode()
                ctype = "Content-Type: application/json\r\n"
            else:
                body = "\n".join(
                    outgoing_message(conn_no * 10_000_000 + counter + k) for k in range(batch)
                ).encode()
                ctype = "Content-Type: application/x-ndjson\r\n"
            target = paths[(conn_no * 7919 + counter) % len(paths)] if paths else path
            counter += batch if body_kind == "ndjson" else 1
            head = (
                f"{method} {target} HTTP/1.1\r\nHost: kimi\r\n{ctype}"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            header = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            t1 = time.perf_counter()
            code = int(header[9:12])
            if t0 >= warm_until:
                lat.append(t1 - t0)
                statuses[code] = statuses.get(code, 0) + 1
                done += 1
    finally:
        writer.close()
    return done


async def http_load(
    sock: str,
    method: str,
    path: str,
    body_kind: str,
    batch: int,
    conns: int,
    seconds: float,
    warmup: float,
    paths: list[str],
) -> dict[str, Any]:
    start = time.perf_counter()
    warm_until = start + warmup
    stop_at = warm_until + seconds
    lat: list[float] = []
    statuses: dict[int, int] = {}
    counts = await asyncio.gather(
        *(
            _http_conn(
                sock,
                method,
                path,
                body_kind,
                batch,
                start,
                warm_until,
                stop_at,
                i,
                lat,
                statuses,
                paths,
            )
            for i in range(conns)
        )
    )
    elapsed = time.perf_counter() - warm_until
    requests = sum(counts)
    per_request = batch if body_kind == "ndjson" else 1
    return {
        "requests": requests,
        "seconds": elapsed,
        "rate": requests / elapsed,
        "messages_rate": requests * per_request / elapsed,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000 if lat else None,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


# -- persist-queue, the in-process peer -----------------------------------------------------


def pq_put(directory: str, seconds: float) -> dict[str, Any]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(directory, multithreading=False)
    lat: list[float] = []
    i = 0
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        q.put(outgoing_message(i))
        lat.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - t_start
    return {
        "items": i,
        "rate": i / elapsed,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
    }


def pq_getack(directory: str, items: int, seconds: float) -> dict[str, Any]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(directory, multithreading=False)
    for i in range(items):
        q.put(outgoing_message(i))
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    done = 0
    rates: list[float] = []
    mark, mark_t = 0, t_start
    while done < items:
        now = time.perf_counter()
        if now >= stop_at:
            break
        item = q.get(block=False)
        q.ack(item)
        done += 1
        if done - mark >= 1000:
            rates.append((done - mark) / (now - mark_t))
            mark, mark_t = done, now
    elapsed = time.perf_counter() - t_start
    return {
        "items": done,
        "prefilled": items,
        "seconds": elapsed,
        "rate": done / elapsed,
        "first_1000_rate": rates[0] if rates else None,
        "last_1000_rate": rates[-1] if rates else None,
    }


# -- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clients")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ws-bare", "ws-naive", "ws-send"):
        s = sub.add_parser(name)
        s.add_argument("url")
        s.add_argument("n", type=int)
        if name == "ws-naive":
            s.add_argument("db")
        s.add_argument("--compression", default="deflate", choices=["deflate", "none"])
    h = sub.add_parser("http")
    h.add_argument("socket")
    h.add_argument("--method", default="GET")
    h.add_argument("--path", default="/v1/health")
    h.add_argument("--body-kind", default="none", choices=["none", "one", "ndjson"])
    h.add_argument("--batch", type=int, default=1)
    h.add_argument("--conns", type=int, default=1)
    h.add_argument("--seconds", type=float, default=2.0)
    h.add_argument("--warmup", type=float, default=0.3)
    h.add_argument("--paths-file", help="request targets, one a line, used in turn")
    q = sub.add_parser("pq-put")
    q.add_argument("dir")
    q.add_argument("--seconds", type=float, default=2.0)
    g = sub.add_parser("pq-getack")
    g.add_argument("dir")
    g.add_argument("--items", type=int, default=10_000)
    g.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    result: dict[str, Any]
    if a.cmd == "ws-bare":
        result = asyncio.run(ws_bare(a.url, a.n, a.compression))
    elif a.cmd == "ws-naive":
        result = asyncio.run(ws_naive(a.url, a.n, a.db, a.compression))
    elif a.cmd == "ws-send":
        result = asyncio.run(ws_send(a.url, a.n, a.compression))
    elif a.cmd == "http":
        result = asyncio.run(
            http_load(
                a.socket,
                a.method,
                a.path,
                a.body_kind,
                a.batch,
                a.conns,
                a.seconds,
                a.warmup,
                Path(a.paths_file).read_text().split() if a.paths_file else [],
            )
        )
    elif a.cmd == "pq-put":
        Path(a.dir).mkdir(parents=True, exist_ok=True)
        result = pq_put(a.dir, a.seconds)
    else:
        Path(a.dir).mkdir(parents=True, exist_ok=True)
        result = pq_getack(a.dir, a.items, a.seconds)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
