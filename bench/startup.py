"""Benchmark 6 — start-up: process start to READY=1 (sd_notify) with 1,000,000 stored events,
and `kimi-syncctl gauge` / `status` wall time against `curl --unix-socket` for the same data.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench import dbgen
from bench.common import Context, Goal, Row, Section, ratios
from bench.procs import DaemonProc, free_port


def _ready_time(ctx: Context, directory: Path, state_dir: Path) -> float:
    """Seconds from Popen to the READY=1 datagram."""
    notify = directory / "notify.sock"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify))
        rx.settimeout(0.5)
        d = DaemonProc(
            directory,
            f"ws://127.0.0.1:{free_port()}/ws",
            notify_socket=notify,
            state_dir=state_dir,
        )
        d.start(wait=False)
        deadline = time.monotonic() + 120
        try:
            while True:
                try:
                    data = rx.recv(4096)
                except TimeoutError:
                    assert d.proc is not None
                    if d.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"no READY=1 (exit status {d.proc.poll()}):\n{d.output()[-2000:]}"
                        ) from None
                    continue
                if b"READY=1" in data.split(b"\n"):
                    ready = time.time()
                    break
        finally:
            d.stop()
    return ready - d.started_at


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.returncode} {proc.stderr[-500:]!r}")
    return elapsed


def run(ctx: Context) -> Section:
    sec = Section("startup", "6. Start-up and the command-line client")
    assert ctx.template_db is not None
    reps = ctx.pick(2, 5)
    calls = ctx.pick(8, 20)
    with ctx.scratch("startup") as directory:
        state = directory / "state"
        db = dbgen.install(ctx.template_db, state)
        big = [_ready_time(ctx, directory, state) for _ in range(reps)]
        empty_dir = directory / "empty"
        empty = []
        for _ in range(reps):
            shutil.rmtree(empty_dir, ignore_errors=True)
            empty.append(_ready_time(ctx, directory, empty_dir))
        imports = [
            _wall([sys.executable, "-c", "import kimi_syncd.daemon, kimi_syncd.__main__"])
            for _ in range(reps)
        ]
        checks = []
        for _ in range(reps):
            con = sqlite3.connect(db)
            t0 = time.perf_counter()
            con.execute("PRAGMA quick_check").fetchall()
            checks.append(time.perf_counter() - t0)
            con.close()
        ctx.log(
            f"  startup: READY after {min(big):.2f}–{max(big):.2f} s with 1M events, "
            f"{min(empty):.2f}–{max(empty):.2f} s empty; quick_check alone "
            f"{min(checks):.2f}–{max(checks):.2f} s"
        )

        d = DaemonProc(directory, f"ws://127.0.0.1:{free_port()}/ws", state_dir=state).start()
        try:
            sock = str(d.socket)
            ctl = str(Path(sys.executable).parent / "kimi-syncctl")
            curl = shutil.which("curl")
            if d.get("/v1/sessions/active") is None:
                raise RuntimeError("no active session in the generated database")
            plan = {
                "gauge": [ctl, "--socket", sock, "gauge"],
                "status": [ctl, "--socket", sock, "status"],
            }
            if curl:
                plan["curl-active"] = [
                    curl,
                    "-sf",
                    "--unix-socket",
                    sock,
                    "http://kimi/v1/sessions/active",
                ]
                plan["curl-status"] = [curl, "-sf", "--unix-socket", sock, "http://kimi/v1/status"]
            plan["python"] = [sys.executable, "-c", "pass"]
            times: dict[str, list[float]] = {k: [] for k in plan}
            for _ in range(calls):
                for key, cmd in plan.items():
                    times[key].append(_wall(cmd))
        finally:
            d.stop()

    sec.add(
        Row(
            "process start → READY=1, 1,000,000 events",
            "s",
            big,
            "empty database",
            ratios(big, empty),
            Goal("READY ≤ 1 s", "value", "<=", 1.0),
        )
    )
    sec.add(Row("process start → READY=1, empty database", "s", empty))
    sec.add(Row("`import kimi_syncd.daemon` alone (interpreter + imports)", "s", imports))
    sec.add(Row("PRAGMA quick_check alone on the 1M-event database", "s", checks))
    ms = {k: [v * 1000 for v in vals] for k, vals in times.items()}
    if "curl-active" in ms:
        sec.add(
            Row(
                "kimi-syncctl gauge",
                "ms",
                ms["gauge"],
                "curl /v1/sessions/active",
                ratios(ms["gauge"], ms["curl-active"]),
                Goal("gauge ≤ 2× curl", "ratio", "<=", 2.0),
            )
        )
        sec.add(
            Row(
                "kimi-syncctl status",
                "ms",
                ms["status"],
                "curl /v1/status",
                ratios(ms["status"], ms["curl-status"]),
            )
        )
        sec.add(Row("curl --unix-socket /v1/sessions/active", "ms", ms["curl-active"]))
        sec.add(Row("curl --unix-socket /v1/status", "ms", ms["curl-status"]))
    sec.add(Row("`python -c pass` (the interpreter alone, for scale)", "ms", ms["python"]))
    sec.notes += [
        f"READY: {reps} starts each; the time runs from just before `Popen` to the arrival of "
        "the READY=1 datagram on a NOTIFY_SOCKET the benchmark listens on; warm page cache "
        "(the database was just copied).",
        f"Command-line client: {calls} invocations of each, interleaved; wall time of the "
        "whole process (spawn to exit) as a shell prompt would see it; n counts invocations.",
    ]
    return sec
