"""API abuse: hostile or careless local clients must not stop the daemon serving others.

One daemon (its backend unreachable, so the outbox only fills) and a health probe measuring
the /v1/health round trip every 50 ms through every phase:

- random_bytes: connections that send random bytes (some starting like HTTP);
- slow_headers: clients sending their request headers one byte at a time (slowloris);
- idle_connections: 1,000 connections opened and left idle;
- oversized: bodies over api.max_body_bytes (with an honest Content-Length, a lying one,
  chunked), a huge header, a deeply nested JSON body;
- flood: 8 threads enqueueing as fast as they can beyond the outbox bound (messages, then
  bytes): 202, 429 or 507, never 500.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    Ctx,
    DaemonProcess,
    Enqueuers,
    HealthProbe,
    Scenario,
    api,
    free_port,
    get,
    open_fds,
    raise_nofile,
    rss_kib,
    unix_connect,
)

MIB = 1 << 20


def _read_status(sock: socket.socket, timeout: float = 5.0) -> str:
    """The status code of whatever answer comes back, or how the connection ended."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                break
    except TimeoutError:
        if not data:
            return "no answer"
    except OSError:
        if not data:
            return "reset"
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "garbage"


def _random_request(rng: random.Random) -> bytes:
    roll = rng.random()
    junk = rng.randbytes(rng.randint(1, 8192))
    if roll < 0.3:
        return junk
    if roll < 0.5:
        return b"GET " + junk + b"\r\n\r\n"
    if roll < 0.7:
        method = rng.choice((b"POST", b"GET", b"DELETE", b"PUT", b"BREW"))
        return method + b" /v1/outbox HTTP/1.1\r\nHost: kimi\r\n" + junk + b"\r\n\r\n"
    if roll < 0.85:
        return (
            b"POST /v1/outbox HTTP/1.1\r\nHost: kimi\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(junk)).encode() + b"\r\n\r\n" + junk
        )
    return b"GET /v1/events?since=" + junk[:50].hex().encode() + b" HTTP/1.1\r\n\r\n"


class Abuse:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.max_messages = ctx.n(5000, 500)
        self.max_bytes = 4 * MIB
        self.d: DaemonProcess = ctx.daemon(
            f"ws://127.0.0.1:{free_port()}/ws",  # nothing listens: the outbox only fills
            {
                "outbox": {"max_messages": self.max_messages, "max_bytes": self.max_bytes},
                "reconnect": {"initial_delay": 1.0, "max_delay": 5.0},
            },
        )
        self.probe: HealthProbe | None = None

    def start(self) -> None:
        raise_nofile(8192)
        self.d.start()
        self.probe = HealthProbe(self.d.socket).start()
        self.ctx.cleanup(self.probe.stop)
        self.phase("baseline")
        time.sleep(self.ctx.t(2.0, 1.0))

    def phase(self, name: str) -> None:
        assert self.probe is not None
        self.probe.phase = name

    def finish(self, name: str) -> None:
        """Health figures of the phase, and the checks that the daemon kept serving."""
        assert self.probe is not None
        self.probe.sample(name)  # at least one sample, however short the phase was
        self.phase("after")
        stats = self.probe.stats(name)
        base = self.probe.stats("baseline")
        self.ctx.figures[f"health_{name}"] = stats
        self.ctx.figures["health_baseline"] = base
        self.ctx.check(
            f"{name}: /v1/health kept answering",
            stats["failures"] == 0 and stats["n"] > 0,
            str(stats),
        )
        self.ctx.check(
            f"{name}: /v1/health under 2 s throughout",
            (stats["max_ms"] or 0) < 2000,
            str(stats),
        )
        assert self.d.proc is not None
        self.ctx.check(f"{name}: daemon alive", self.d.proc.poll() is None, self.d.output()[-800:])

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        code = self.d.stop()
        self.ctx.check("clean stop at the end", code == 0, f"exit {code}")


def random_bytes(ctx: Ctx) -> None:
    a = Abuse(ctx)
    a.start()
    total = ctx.n(2000, 200)
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    a.phase("random_bytes")

    def worker(k: int) -> None:
        rng = random.Random(f"{ctx.seed}:{k}")
        for _ in range(total // 4):
            try:
                sock = unix_connect(a.d.socket)
            except OSError:
                with lock:
                    outcomes["connect failed"] += 1
                continue
            with sock:
                with contextlib.suppress(OSError):
                    sock.sendall(_random_request(rng))
                result = _read_status(sock, 2.0)
                if result == "no answer":  # an unterminated request: end it
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    result = _read_status(sock, 5.0)
            with lock:
                outcomes[result] += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    a.finish("random_bytes")
    ctx.check(
        "no 5xx answer to garbage", not any(k.startswith("5") for k in outcomes), str(outcomes)
    )
    ctx.figures["outcomes"] = dict(outcomes.most_common())
    ctx.figures["connections"] = sum(outcomes.values())
    a.close()


def slow_headers(ctx: Ctx) -> None:
    a = Abuse(ctx)
    a.start()
    count = ctx.n(200, 50)
    duration = ctx.t(20.0, 3.0)
    request = b"GET /v1/health HTTP/1.1\r\nHost: kimi\r\nX-Slow: " + b"a" * 2000 + b"\r\n\r\n"
    socks: list[socket.socket | None] = []
    for _ in range(count):
        try:
            socks.append(unix_connect(a.d.socket))
        except OSError:
            socks.append(None)
    a.phase("slow_headers")
    cut_at: dict[int, float] = {}
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < duration and i < len(request):
        byte = request[i : i + 1]
        for n, sock in enumerate(socks):
            if sock is None or n in cut_at:
                continue
            try:
                sock.send(byte)
            except OSError:
                cut_at[n] = time.monotonic() - t0
        i += 1
        time.sleep(0.05)
    fds = open_fds(a.d.pid)
    a.finish("slow_headers")
    for sock in socks:
        if sock is not None:
            sock.close()
    ctx.figures.update(
        {
            "slow_clients": count,
            "seconds": duration,
            "bytes_sent_each": i,
            "cut_by_daemon": len(cut_at),
            "cut_after_s": round(min(cut_at.values()), 1) if cut_at else None,
            "daemon_fds_during": fds,
        }
    )
    a.close()


def idle_connections(ctx: Ctx) -> None:
    a = Abuse(ctx)
    a.start()
    count = ctx.n(1000, 300)
    hold = ctx.t(15.0, 2.0)
    fds_before = open_fds(a.d.pid)
    rss_before = rss_kib(a.d.pid)
    a.phase("idle_connections")
    socks: list[socket.socket] = []
    failures = 0
    for _ in range(count):
        try:
            socks.append(unix_connect(a.d.socket))
        except OSError:
            failures += 1
    time.sleep(hold)
    fds_during = open_fds(a.d.pid)
    rss_during = rss_kib(a.d.pid)
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    a.finish("idle_connections")
    ctx.check("all idle connections accepted", failures == 0, f"{failures} refused")
    # Everyone else is still served while they sit there.
    status = get(a.d, "/v1/status")
    ctx.check("API works with the idle crowd", "events" in status)
    for sock in socks:
        sock.close()
    ctx.figures.update(
        {
            "idle_connections": count,
            "held_s": hold,
            "connect_failures": failures,
            "closed_by_daemon_while_held": closed,
            "daemon_fds": [fds_before, fds_during],
            "daemon_rss_kib": [rss_before, rss_during],
        }
    )
    a.close()


def _raw(path: Path, payload: bytes, *, read_timeout: float = 10.0) -> str:
    with unix_connect(path, timeout=read_timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        return _read_status(sock, read_timeout)


def _chunked(path: Path, limit: int) -> tuple[str, int]:
    """A chunked body that never ends (bounded by `limit` bytes); (answer, bytes sent)."""
    sent = 0
    with unix_connect(path, timeout=10.0) as sock:
        sock.sendall(
            b"POST /v1/outbox HTTP/1.1\r\nHost: kimi\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            while sent < limit:
                sock.sendall(framed)
                sent += len(chunk)
        except OSError:
            pass
        return _read_status(sock), sent


def oversized(ctx: Ctx) -> None:
    a = Abuse(ctx)
    a.start()
    a.phase("oversized")
    path = a.d.socket
    head = b"POST /v1/outbox HTTP/1.1\r\nHost: kimi\r\nContent-Type: application/json\r\n"
    big = b'{"type":"x","pad":"' + b"a" * (2 * MIB) + b'"}'
    results: dict[str, Any] = {}
    for i in range(ctx.n(10, 2)):
        results["body 2 MiB"] = _raw(path, head + b"Content-Length: %d\r\n\r\n" % len(big) + big)
        results["Content-Length 1e12, 2 MiB sent"] = _raw(
            path, head + b"Content-Length: 1000000000000\r\n\r\n" + big
        )
        results["chunked, endless"], sent = _chunked(path, 16 * MIB)
        results["chunked bytes sent before the answer"] = sent
        results["header of 100 KiB"] = _raw(
            path, b"GET /v1/health HTTP/1.1\r\nHost: kimi\r\nX-Big: " + b"h" * 102400 + b"\r\n\r\n"
        )
        deep = b"[" * 200_000 + b"]" * 200_000
        results["JSON nested 200,000 deep"] = _raw(
            path, head + b"Content-Length: %d\r\n\r\n" % len(deep) + deep
        )
        ok_deep = b'{"type":"x","v":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        results["JSON nested 50,000 deep (fits)"] = _raw(
            path, head + b"Content-Length: %d\r\n\r\n" % len(ok_deep) + ok_deep
        )
        if i == 0:
            ctx.log(f"oversized answers: {results}")
    a.finish("oversized")
    answers = {k: v for k, v in results.items() if isinstance(v, str)}
    ctx.check(
        "bodies over the limit: 413",
        results["body 2 MiB"] == "413" and results["Content-Length 1e12, 2 MiB sent"] == "413",
        str(answers),
    )
    ctx.check("endless chunked body: 413", results["chunked, endless"] == "413", str(answers))
    ctx.check(
        "huge header refused with 4xx",
        str(results["header of 100 KiB"]).startswith("4"),
        str(answers),
    )
    ctx.check(
        "deep JSON: 4xx, never 5xx",
        all(str(results[k]).startswith("4") for k in answers if k.startswith("JSON")),
        str(answers),
    )
    ctx.figures["answers"] = results
    a.close()


def flood(ctx: Ctx) -> None:
    a = Abuse(ctx)
    a.start()
    duration = ctx.t(15.0, 2.0)
    # Bytes first: big messages meet outbox.max_bytes (507).
    a.phase("flood_bytes")
    big = Enqueuers(a.d.socket, 4, "fb", pad=200_000).start()
    time.sleep(duration / 2)
    big.stop()
    big_acked, big_statuses, _ = big.snapshot()
    outbox = get(a.d, "/v1/status")["outbox"]
    a.finish("flood_bytes")
    ctx.check(
        "big messages answered 202 or 507 only (never 500)",
        set(big_statuses) <= {200, 202, 507},
        f"statuses {dict(big_statuses)}",
    )
    ctx.check("the byte bound was reached", big_statuses[507] > 0, f"{dict(big_statuses)}")
    ctx.check(
        "pending bytes never beyond the bound",
        outbox["pending_bytes"] <= a.max_bytes,
        f"{outbox['pending_bytes']} > {a.max_bytes}",
    )
    ctx.figures["flood_bytes"] = {
        "statuses": dict(big_statuses),
        "pending": outbox["pending"],
        "pending_bytes": outbox["pending_bytes"],
        "max_bytes": a.max_bytes,
    }
    for msg_id in big_acked.values():  # make room again
        api(a.d, "DELETE", f"/v1/outbox/{msg_id}")
    # Then many small messages: outbox.max_messages (429).
    a.phase("flood")
    load = Enqueuers(a.d.socket, 8, "fl").start()
    time.sleep(duration)
    load.stop()
    _, statuses, errors = load.snapshot()
    pending = get(a.d, "/v1/status")["outbox"]
    a.finish("flood")
    ctx.check(
        "flood answered 202 or 429 only (never 500)",
        set(statuses) <= {200, 202, 429},
        f"statuses {dict(statuses)}",
    )
    ctx.check("the message bound was reached", statuses[429] > 0, f"statuses {dict(statuses)}")
    ctx.check(
        "pending never beyond the bound",
        pending["pending"] <= a.max_messages,
        f"{pending['pending']} > {a.max_messages}",
    )
    ctx.figures["flood_messages"] = {
        "seconds": duration,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "per_s": round(sum(statuses.values()) / duration),
        "transport_errors": errors,
        "pending": pending["pending"],
        "max_messages": a.max_messages,
    }
    a.close()


SCENARIOS = [
    Scenario("random_bytes", random_bytes, heavy=True),
    Scenario("slow_headers", slow_headers),
    Scenario("idle_connections", idle_connections),
    Scenario("oversized", oversized),
    Scenario("flood", flood, heavy=True),
]
