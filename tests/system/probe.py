"""A stand-in for kimi-syncd under a real systemd, run by tests/system/run.sh.

It runs in the very same unit and sandbox as the daemon (the harness rewrites only the
names and ExecStart=) and speaks the same protocols through kimi_syncd.systemd: the "api"
socket from socket activation, READY/STATUS/WATCHDOG/RELOADING/STOPPING, a SQLite database
(WAL) in $STATE_DIRECTORY. So the units and the systemd module are tested before the
daemon is finished. Not collected by pytest (no test_ prefix).

HTTP over the socket: GET /v1/health -> JSON facts; /stall stops the watchdog pings;
/exit/N exits with status N.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import struct
import sys
import time

from kimi_syncd.systemd import Notifier, listen_fds, watchdog_interval

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer(sock: socket.socket) -> dict[str, object]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 64)
    groups = list(struct.unpack(f"{len(raw) // 4}I", raw))
    return {"pid": pid, "uid": uid, "gid": gid, "groups": groups}


async def main() -> int:
    notifier = Notifier.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stalled = False

    def reload() -> None:
        notifier.reloading()
        notifier.ready("reloaded")

    loop.add_signal_handler(signal.SIGHUP, reload)

    # The user unit names its state directory with the daemon's own variable.
    state = os.environ.get("STATE_DIRECTORY") or os.environ.get(
        "KIMI_SYNCD_STORE__STATE_DIR", "/tmp"
    )
    db = sqlite3.connect(os.path.join(state, "probe.db"))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS starts (id INTEGER PRIMARY KEY, pid INT, at REAL)")
    db.execute("INSERT INTO starts (pid, at) VALUES (?, ?)", (os.getpid(), time.time()))
    db.commit()

    api = listen_fds().get("api")
    if not api:
        print("probe: no socket named api was passed", file=sys.stderr)
        return 78
    await asyncio.sleep(float(os.environ.get("PROBE_READY_DELAY", "0")))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal stalled
        request = (await reader.readuntil(b"\r\n\r\n")).decode()
        path = request.split(" ", 2)[1]
        if path.startswith("/exit/"):
            os._exit(int(path.rsplit("/", 1)[1]))
        stalled = stalled or path == "/stall"
        sock = writer.get_extra_info("socket")
        (starts,) = db.execute("SELECT count(*) FROM starts").fetchone()
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        body = json.dumps(
            {
                "pid": os.getpid(),
                "uid": os.getuid(),
                "starts": starts,
                "peer": peer(sock),
                "state_directory": state,
                "credentials": sorted(os.listdir(creds)) if creds else None,
                "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
                "watchdog": watchdog_interval(),
            }
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, sock=api[0])
    notifier.ready(f"probe ready, pid {os.getpid()}")
    interval = watchdog_interval()

    async def ping() -> None:
        while interval is not None:
            if not stalled:
                notifier.watchdog()
            await asyncio.sleep(interval)

    pinger = asyncio.create_task(ping())
    await stop.wait()
    notifier.stopping()
    pinger.cancel()
    server.close()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
