"""Benchmark 3 — drain: N queued messages sent and confirmed once the backend comes up.

The daemon starts with its upstream port closed, N messages are enqueued (NDJSON batches),
then the simulated backend starts on that port. Rate = N / (last message confirmed as
delivered − the backend accepting the daemon's WebSocket handshake). Compared with a bare
`websockets` client sending the same N messages in a loop, confirmed by one ping/pong at the
end (the limit), and with persist-queue's SQLiteAckQueue get + ack (the in-process peer).
"""

from __future__ import annotations

import time
from typing import Any

from bench.clients import outgoing_message
from bench.common import Context, Goal, Row, Section, ratios, wait_until
from bench.procs import DaemonProc, ReadyClient, SimProc, free_port, run_json

CHUNK = 1000


def _fill(d: DaemonProc, n: int) -> None:
    client = d.client(timeout=60)
    for start in range(0, n, CHUNK):
        body = "\n".join(outgoing_message(i) for i in range(start, min(n, start + CHUNK)))
        status, answer = client.request(
            "POST", "/v1/outbox", body.encode(), {"Content-Type": "application/x-ndjson"}
        )
        if status != 202:
            raise RuntimeError(f"enqueue failed: {status} {answer}")


def run_daemon(ctx: Context, n: int) -> dict[str, Any]:
    port = free_port()
    env = {
        "KIMI_SYNCD_RECONNECT__INITIAL_DELAY": "0.1",
        "KIMI_SYNCD_RECONNECT__MAX_DELAY": "0.2",
        "KIMI_SYNCD_BREAKER__FAILURE_THRESHOLD": "1000000",
        "KIMI_SYNCD_OUTBOX__MAX_MESSAGES": str(max(n, 100_000) * 2),
    }
    with ctx.scratch("drain") as directory:
        d = DaemonProc(directory, f"ws://127.0.0.1:{port}/ws", env=env).start()
        try:
            _fill(d, n)
            if d.status()["outbox"]["pending"] != n:
                raise RuntimeError("the outbox does not hold the messages just enqueued")
            commits0 = d.commits()
            with SimProc(directory, port=port).start() as sim:
                done_at = wait_until(
                    lambda: d.status()["outbox"]["by_state"].get("delivered", 0) >= n,
                    timeout=300,
                    interval=0.02,
                    what=f"{n} messages delivered",
                )
                stats = sim.control("stats")
                connected_at = float(stats["handshake_times"][0])
                received = int(stats["messages_received"])
                commits = d.commits() - commits0
                bare = None
                d.stop()
                # The limit, on the same backend process right after.
                client = ReadyClient(["ws-send", sim.url, str(n)])
                bare = client.result(timeout=300)
        finally:
            d.stop()
    if received < n:
        raise RuntimeError(f"the backend received {received} of {n} messages")
    seconds = done_at - connected_at
    return {
        "rate": n / seconds,
        "seconds": seconds,
        "commits_per_message": commits / n,
        "received_by_backend": received,
        "bare": bare,
    }


def run(ctx: Context) -> Section:
    sec = Section(
        "drain", "3. Drain: queued messages sent and confirmed after the backend comes up"
    )
    n = ctx.pick(20_000, 100_000)
    pq_items = ctx.pick(3_000, 10_000)
    pq_seconds = ctx.pick(5.0, 10.0)
    runs = []
    pq = []
    for rep in range(ctx.reps):
        r = run_daemon(ctx, n)
        runs.append(r)
        with ctx.scratch("pqd") as qdir:
            pq.append(
                run_json(
                    [
                        "-m",
                        "bench.clients",
                        "pq-getack",
                        str(qdir),
                        "--items",
                        str(pq_items),
                        "--seconds",
                        str(pq_seconds),
                    ],
                    timeout=pq_items / 500 + pq_seconds + 120,
                )
            )
        ctx.log(
            f"  drain rep {rep + 1}: daemon {r['rate']:,.0f} msg/s ({r['seconds']:.1f} s), "
            f"bare send loop {r['bare']['rate']:,.0f} msg/s, persist-queue get+ack "
            f"{pq[-1]['rate']:,.0f}/s"
        )
        time.sleep(0.2)
    d_rates = [r["rate"] for r in runs]
    b_rates = [r["bare"]["rate"] for r in runs]
    p_rates = [r["rate"] for r in pq]
    sec.add(
        Row(
            f"daemon drain, {n:,} messages",
            "msg/s",
            d_rates,
            "bare send loop",
            ratios(d_rates, b_rates),
            Goal("≥ 0.5× bare send loop", "ratio", ">=", 0.5),
        )
    )
    sec.add(
        Row(
            "daemon drain vs persist-queue get+ack",
            "msg/s",
            d_rates,
            "persist-queue get+ack",
            ratios(d_rates, p_rates),
        )
    )
    sec.add(Row("daemon drain time", "s", [r["seconds"] for r in runs]))
    sec.add(Row("bare websockets send loop (limit)", "msg/s", b_rates))
    sec.add(Row(f"persist-queue get+ack, first {pq_items:,} items (peer)", "msg/s", p_rates))
    sec.add(
        Row(
            "daemon commits (fsyncs) per drained message",
            "commits/msg",
            [r["commits_per_message"] for r in runs],
            note="sent + delivered transitions; persist-queue: 2 (get, ack)",
        )
    )
    sec.notes += [
        "~230-byte messages of a type the simulated backend ignores (no reply frames); "
        "reconnect delays shortened (initial 0.1 s, max 0.2 s) so the daemon connects at once; "
        "the clock starts at the backend's accepted handshake.",
        f"persist-queue: {pq_items:,} items put first, then get + ack until done or "
        f"{pq_seconds:g} s; its rate falls as acked rows pile up (first 1,000: "
        f"{pq[0]['first_1000_rate'] or 0:,.0f}/s, last 1,000: "
        f"{pq[0]['last_1000_rate'] or 0:,.0f}/s in the first repetition).",
    ]
    sec.extra["runs"] = runs
    sec.extra["persist_queue"] = pq
    return sec
