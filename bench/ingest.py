"""Benchmark 1 — ingest: the daemon receiving ~300-byte frames from the simulated backend as fast
as it sends them, every frame decoded, reduced and committed.

Compared in the same repetition with (a) a bare `websockets` client that only `json.loads` each
frame (the limit) and (b) a straightforward client that INSERTs + commits each frame through
aiosqlite (WAL, synchronous=FULL; the common approach). Each client is its own process, alone
on the simulated backend while it is measured; the order rotates between repetitions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from bench import profile
from bench.common import Context, Goal, Row, Section, median, percentile, ratios, wait_until
from bench.procs import DaemonProc, ReadyClient, SimProc
from kimi_syncd import ctl
from kimi_syncd.paths import DB_NAME


def _db(daemon: DaemonProc) -> Path:
    return daemon.state_dir / DB_NAME


def _received_at(db: Path, lo: int, hi: int) -> dict[int, float]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT seq, received_at FROM events WHERE seq > ? AND seq <= ? AND kind='event'",
            (lo, hi),
        ).fetchall()
    finally:
        con.close()
    return {int(s): float(r) for s, r in rows}


def _start_daemon(ctx: Context, directory: Path, sim: SimProc, compression: bool) -> DaemonProc:
    env = {"KIMI_SYNCD_UPSTREAM__COMPRESSION": "true" if compression else "false"}
    d = DaemonProc(directory, sim.url, env=env).start()
    d.wait_connected()
    time.sleep(0.3)  # the "connected" link event and the init frame get committed
    return d


def run_daemon(
    ctx: Context, sim: SimProc, n: int, compression: bool, *, prof_out: Path | None = None
) -> dict[str, Any]:
    with ctx.scratch("ingest") as directory:
        d = _start_daemon(ctx, directory, sim, compression)
        try:
            base = int(d.status()["events"]["last_seq"])
            commits0 = d.commits()
            cpu0 = d.cpu_seconds()
            spy = None
            if prof_out is not None:
                spy = profile.start(d.pid, ctx.pick(2, 5), prof_out)
            sim.blast(n)
            done_at = wait_until(
                lambda: int(d.status()["events"]["last_seq"]) >= base + n,
                timeout=120,
                interval=0.02,
                what=f"{n} frames committed",
            )
            cpu = d.cpu_seconds() - cpu0
            commits = d.commits() - commits0
            if spy is not None:
                spy.wait(timeout=60)
            received = _received_at(_db(d), base, base + n)
            first = min(received.values())
            last_received = max(received.values())
        finally:
            d.stop()
    return {
        "rate": (n - 1) / (done_at - first),
        "receive_rate": (n - 1) / (last_received - first),
        "commits_per_frame": commits / n,
        "frames_per_commit": n / commits if commits else None,
        "cpu_us_per_frame": cpu / n * 1e6,
    }


def run_client(kind: str, sim: SimProc, n: int, compression: bool, db: Path | None) -> Any:
    args = [kind, sim.url, str(n)]
    if db is not None:
        args.append(str(db))
    args += ["--compression", "deflate" if compression else "none"]
    client = ReadyClient(args)
    sim.blast(n)
    return client.result(timeout=180)


class _Follower(threading.Thread):
    """Reads the daemon's follow stream and notes when each committed seq arrived."""

    def __init__(self, socket: Path, since: int, until: int) -> None:
        super().__init__(daemon=True)
        self.client = ctl.Client(socket, timeout=None)
        self.since = since
        self.until = until
        self.arrived: dict[int, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        import json

        try:
            for line in self.client.stream(f"/v1/events?follow=1&since={self.since}"):
                now = time.time()
                item = json.loads(line)
                seq = item.get("seq")
                if isinstance(seq, int):
                    self.arrived[seq] = now
                    if seq >= self.until:
                        return
        except BaseException as exc:  # reported by the caller
            self.error = exc


def run_lag(ctx: Context, sim: SimProc, n: int, compression: bool) -> dict[str, Any]:
    """Durability lag, received → committed, seen through the follow stream (an upper bound:
    it includes publishing to the follower and one HTTP write)."""
    with ctx.scratch("lag") as directory:
        d = _start_daemon(ctx, directory, sim, compression)
        try:
            base = int(d.status()["events"]["last_seq"])
            follower = _Follower(d.socket, base, base + n)
            follower.start()
            time.sleep(0.2)
            sim.blast(n)
            follower.join(timeout=120)
            full = _lags(_received_at(_db(d), base, base + n), follower.arrived)
            # Paced: the scenario's own events at a modest rate (what a real backend sends).
            base2 = int(d.status()["events"]["last_seq"])
            follower2 = _Follower(d.socket, base2, 1 << 62)
            follower2.start()
            sim.control("rate", rate=ctx.pick(100, 200))
            time.sleep(ctx.pick(2.0, 4.0))
            sim.control("rate", rate=0)
            time.sleep(0.3)
            last = int(d.status()["events"]["last_seq"])
            paced = _lags(_received_at(_db(d), base2, last), follower2.arrived)
        finally:
            d.stop()
    return {"full": full, "paced": paced, "paced_frames": last - base2}


def _lags(received: dict[int, float], arrived: dict[int, float]) -> dict[str, float]:
    lags = [arrived[s] - r for s, r in received.items() if s in arrived]
    return {
        "p50_ms": percentile(lags, 0.5) * 1000,
        "p99_ms": percentile(lags, 0.99) * 1000,
        "count": float(len(lags)),
    }


def run(ctx: Context) -> Section:
    sec = Section("ingest", "1. Ingest: frames/s from the simulated backend (~300-byte frames)")
    n = ctx.pick(30_000, 100_000)
    n_naive = ctx.pick(5_000, 10_000)
    sec.notes += [
        f"{n:,} frames per daemon and bare-client run, {n_naive:,} per straightforward-client "
        "run; `/_sim/blast?size=300` (metric_updated frames, ~330 bytes).",
        "Rate = frames / (commit of the last frame − receipt of the first frame): for the daemon "
        "the receipt time is `events.received_at`, the commit time is when `/v1/status` "
        "(polled every 20 ms) shows the last seq.",
        "Each client is a separate process; the simulated backend is another; 2 cores in all.",
    ]
    with ctx.scratch("ingest-sim") as simdir, SimProc(simdir).start() as sim:
        # The shipped default (deflate) always; without compression in the full run only.
        for compression in ctx.pick((True,), (True, False)):
            tag = "deflate" if compression else "no compression"
            dm: list[dict[str, Any]] = []
            bare: list[dict[str, Any]] = []
            naive: list[dict[str, Any]] = []
            for rep in range(ctx.reps):
                order = ["daemon", "bare", "naive"]
                order = order[rep % 3 :] + order[: rep % 3]
                for kind in order:
                    if kind == "daemon":
                        dm.append(run_daemon(ctx, sim, n, compression))
                    elif kind == "bare":
                        bare.append(run_client("ws-bare", sim, n, compression, None))
                    else:
                        with ctx.scratch("naive") as nd:
                            naive.append(
                                run_client("ws-naive", sim, n_naive, compression, nd / "n.db")
                            )
                ctx.log(
                    f"  ingest [{tag}] rep {rep + 1}: daemon {dm[-1]['rate']:,.0f}/s, "
                    f"bare {bare[-1]['rate']:,.0f}/s, straightforward {naive[-1]['rate']:,.0f}/s"
                )
            d_rates = [r["rate"] for r in dm]
            b_rates = [r["rate"] for r in bare]
            n_rates = [r["rate"] for r in naive]
            primary = compression  # the shipped default: upstream.compression = true
            sec.add(
                Row(
                    f"daemon, frames/s [{tag}]",
                    "frames/s",
                    d_rates,
                    "bare client",
                    ratios(d_rates, b_rates),
                    Goal("≥ 0.6× bare client", "ratio", ">=", 0.6) if primary else None,
                )
            )
            sec.add(
                Row(
                    f"daemon vs straightforward [{tag}]",
                    "frames/s",
                    d_rates,
                    "straightforward",
                    ratios(d_rates, n_rates),
                    Goal("≥ 5× straightforward", "ratio", ">=", 5.0) if primary else None,
                )
            )
            sec.add(Row(f"bare websockets client (limit) [{tag}]", "frames/s", b_rates))
            sec.add(Row(f"straightforward aiosqlite client [{tag}]", "frames/s", n_rates))
            sec.add(
                Row(
                    f"daemon CPU per frame [{tag}]",
                    "µs",
                    [r["cpu_us_per_frame"] for r in dm],
                    "bare client CPU",
                    ratios(
                        [r["cpu_us_per_frame"] for r in dm],
                        [r["cpu_us_per_frame"] for r in bare],
                    ),
                )
            )
            sec.add(
                Row(
                    f"daemon commits (fsyncs) per frame [{tag}]",
                    "commits/frame",
                    [r["commits_per_frame"] for r in dm],
                    note="straightforward client: 1.0",
                )
            )
            sec.extra[f"runs_{'deflate' if compression else 'plain'}"] = {
                "daemon": dm,
                "bare": bare,
                "straightforward": naive,
            }
        lag_runs = [run_lag(ctx, sim, n, True) for _ in range(ctx.reps)]
        for label, key in (("full rate", "full"), ("paced", "paced")):
            for pq in ("p50_ms", "p99_ms"):
                sec.add(
                    Row(
                        f"durability lag {pq[:3]}, {label} [deflate]",
                        "ms",
                        [r[key][pq] for r in lag_runs],
                    )
                )
        sec.notes.append(
            "Durability lag = arrival on a `/v1/events?follow=1` stream − `events.received_at` "
            "(an upper bound on received → committed). Full rate: during a blast; paced: the "
            f"scenario's own events at {ctx.pick(100, 200)} events/s "
            f"(~{median([r['paced_frames'] for r in lag_runs]) / ctx.pick(2.0, 4.0):,.0f} "
            "frames/s)."
        )
        sec.extra["lag"] = lag_runs
        if ctx.profile:
            out = ctx.workdir / "profile-ingest.txt"
            run_daemon(ctx, sim, ctx.pick(60_000, 200_000), True, prof_out=out)
            sec.extra["profile"] = profile.summarize(out)
    return sec
