"""Benchmark 2 — durable enqueue through the API (POST /v1/outbox over the Unix socket).

1 and 8 concurrent keep-alive connections (raw HTTP/1.1 on asyncio streams, one load process),
against the trivial GET /v1/health on the same server and connection count (the limit), and
against persist-queue's SQLiteAckQueue.put in one process (the in-process peer). Batch
enqueue (NDJSON) with 100 messages per request. The daemon's upstream is a closed port, so
nothing drains the outbox while it is measured.
"""

from __future__ import annotations

from typing import Any

from bench import profile
from bench.common import Context, Goal, Row, Section, ratios
from bench.procs import DaemonProc, free_port, run_json

BATCH = 100


def _load(
    ctx: Context,
    d: DaemonProc,
    *,
    method: str,
    path: str,
    body: str,
    conns: int,
    seconds: float,
) -> dict[str, Any]:
    result: dict[str, Any] = run_json(
        [
            "-m",
            "bench.clients",
            "http",
            str(d.socket),
            "--method",
            method,
            "--path",
            path,
            "--body-kind",
            body,
            "--batch",
            str(BATCH if body == "ndjson" else 1),
            "--conns",
            str(conns),
            "--seconds",
            str(seconds),
        ],
        timeout=seconds + 60,
    )
    bad = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
    if bad:
        raise RuntimeError(f"{method} {path}: non-2xx answers {bad}")
    return result


def run(ctx: Context) -> Section:
    sec = Section("enqueue", "2. Durable enqueue through the API (POST /v1/outbox)")
    seconds = ctx.pick(1.5, 3.0)
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(key: str, value: dict[str, Any]) -> None:
        runs.setdefault(key, []).append(value)

    env = {
        "KIMI_SYNCD_OUTBOX__MAX_MESSAGES": "100000000",
        "KIMI_SYNCD_OUTBOX__MAX_BYTES": str(8 * 2**30),
    }
    with ctx.scratch("enqueue") as directory:
        d = DaemonProc(directory, f"ws://127.0.0.1:{free_port()}/ws", env=env).start()
        try:
            commits0, msgs0 = d.commits(), 0
            for rep in range(ctx.reps):
                for conns in (1, 8):
                    pair = [
                        ("health", "GET", "/v1/health", "none"),
                        ("enqueue", "POST", "/v1/outbox", "one"),
                    ]
                    if rep % 2:
                        pair.reverse()
                    for name, method, path, body in pair:
                        r = _load(
                            ctx,
                            d,
                            method=method,
                            path=path,
                            body=body,
                            conns=conns,
                            seconds=seconds,
                        )
                        record(f"{name}-{conns}", r)
                        if name == "enqueue":
                            msgs0 += r["requests"]
                batch = _load(
                    ctx,
                    d,
                    method="POST",
                    path="/v1/outbox",
                    body="ndjson",
                    conns=1,
                    seconds=seconds,
                )
                record("batch", batch)
                with ctx.scratch("pq") as qdir:
                    record(
                        "pq",
                        run_json(
                            ["-m", "bench.clients", "pq-put", str(qdir), "--seconds", str(seconds)],
                            timeout=seconds + 60,
                        ),
                    )
                ctx.log(
                    f"  enqueue rep {rep + 1}: 1 conn {runs['enqueue-1'][-1]['rate']:,.0f}/s "
                    f"(health {runs['health-1'][-1]['rate']:,.0f}/s), 8 conns "
                    f"{runs['enqueue-8'][-1]['rate']:,.0f}/s (health "
                    f"{runs['health-8'][-1]['rate']:,.0f}/s), batch "
                    f"{batch['messages_rate']:,.0f} msg/s, "
                    f"persist-queue {runs['pq'][-1]['rate']:,.0f}/s"
                )
            # Commits per enqueued message (the batch runs included; they are small in count).
            total_msgs = msgs0 + sum(r["requests"] * BATCH for r in runs["batch"])
            commits = d.commits() - commits0
            if ctx.profile:
                out = ctx.workdir / "profile-enqueue.txt"
                spy = profile.start(d.pid, ctx.pick(2, 4), out)
                _load(
                    ctx,
                    d,
                    method="POST",
                    path="/v1/outbox",
                    body="one",
                    conns=8,
                    seconds=ctx.pick(2.5, 4.5),
                )
                if spy is not None:
                    spy.wait(timeout=60)
                    sec.extra["profile"] = profile.summarize(out)
            rss = d.rss_mib()
        finally:
            d.stop()

    def rates(key: str) -> list[float]:
        return [r["rate"] for r in runs[key]]

    def lat(key: str, q: str) -> list[float]:
        return [r[q] for r in runs[key]]

    for conns in (1, 8):
        goal = conns == 8
        sec.add(
            Row(
                f"enqueue, {conns} client{'s' if conns > 1 else ''}",
                "msg/s",
                rates(f"enqueue-{conns}"),
                "GET /v1/health",
                ratios(rates(f"enqueue-{conns}"), rates(f"health-{conns}")),
                Goal("≥ 0.8× trivial GET", "ratio", ">=", 0.8) if goal else None,
            )
        )
        sec.add(
            Row(
                f"enqueue vs persist-queue put, {conns} client{'s' if conns > 1 else ''}",
                "msg/s",
                rates(f"enqueue-{conns}"),
                "persist-queue put (1 thread)",
                ratios(rates(f"enqueue-{conns}"), rates("pq")),
            )
        )
        sec.add(
            Row(
                f"enqueue ack latency p50, {conns} client{'s' if conns > 1 else ''}",
                "ms",
                lat(f"enqueue-{conns}", "p50_ms"),
                "GET p50",
                ratios(lat(f"enqueue-{conns}", "p50_ms"), lat(f"health-{conns}", "p50_ms")),
            )
        )
        sec.add(
            Row(
                f"enqueue ack latency p99, {conns} client{'s' if conns > 1 else ''}",
                "ms",
                lat(f"enqueue-{conns}", "p99_ms"),
                "GET p99",
                ratios(lat(f"enqueue-{conns}", "p99_ms"), lat(f"health-{conns}", "p99_ms")),
                Goal("p99 ≤ 10 ms", "value", "<=", 10.0) if goal else None,
            )
        )
        sec.add(
            Row(
                f"GET /v1/health, {conns} client{'s' if conns > 1 else ''}",
                "req/s",
                rates(f"health-{conns}"),
            )
        )
        sec.add(
            Row(
                f"GET /v1/health p99, {conns} client{'s' if conns > 1 else ''}",
                "ms",
                lat(f"health-{conns}", "p99_ms"),
            )
        )
    sec.add(
        Row(
            f"batch enqueue (NDJSON, {BATCH}/request), 1 client",
            "msg/s",
            [r["messages_rate"] for r in runs["batch"]],
            "single enqueue, 1 client",
            ratios([r["messages_rate"] for r in runs["batch"]], rates("enqueue-1")),
        )
    )
    sec.add(Row("batch request latency p99", "ms", lat("batch", "p99_ms")))
    sec.add(Row("persist-queue SQLiteAckQueue.put, 1 thread (peer)", "msg/s", rates("pq")))
    sec.add(Row("persist-queue put latency p99", "ms", lat("pq", "p99_ms")))
    sec.add(
        Row(
            "daemon commits (fsyncs) per enqueued message",
            "commits/msg",
            [commits / total_msgs] if total_msgs else [],
            note="all enqueue runs together; persist-queue: 1 per put",
        )
    )
    sec.notes += [
        f"{seconds:g} s per measurement after 0.3 s warm-up; ~230-byte JSON messages; the "
        "load generator is one asyncio process with N keep-alive connections, each sending "
        "its next request when the previous answer has arrived.",
        f"The outbox limits were raised for this benchmark (outbox.max_messages=1e8); the "
        f"daemon's RSS at the end: {rss:.1f} MiB.",
    ]
    sec.extra["runs"] = runs
    return sec
