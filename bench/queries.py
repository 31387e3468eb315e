"""Benchmark 4 — queries on 1,000,000 stored events and 1,000 sessions.

One keep-alive client, sequential requests: GET /v1/status, /v1/sessions/{id} (ids in turn
over all 1,000), a 1,000-event page /v1/events?since=N&limit=1000 (N spread over the log),
against GET /v1/health on the same server (the trivial GET).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from bench import dbgen
from bench.common import Context, Goal, Row, Section, ratios
from bench.procs import DaemonProc, free_port, run_json


def _load(d: DaemonProc, path: str, seconds: float, paths_file: Path | None) -> dict[str, Any]:
    args = ["-m", "bench.clients", "http", str(d.socket), "--path", path, "--seconds", str(seconds)]
    if paths_file is not None:
        args += ["--paths-file", str(paths_file)]
    result: dict[str, Any] = run_json(args, timeout=seconds + 60)
    bad = {k: v for k, v in result["statuses"].items() if k != "200"}
    if bad:
        raise RuntimeError(f"GET {path}: non-200 answers {bad}")
    return result


def run(ctx: Context) -> Section:
    sec = Section("queries", "4. Queries with 1,000,000 stored events and 1,000 sessions")
    assert ctx.template_db is not None
    seconds = ctx.pick(1.5, 3.0)
    runs: dict[str, list[dict[str, Any]]] = {}
    with ctx.scratch("queries") as directory:
        db = dbgen.install(ctx.template_db, directory / "state")
        ids = dbgen.session_ids(db)
        rng = random.Random(5)
        sessions_file = directory / "sessions.txt"
        sessions_file.write_text("\n".join(f"/v1/sessions/{i}" for i in rng.sample(ids, len(ids))))
        events_file = directory / "events.txt"
        events_file.write_text(
            "\n".join(
                f"/v1/events?since={rng.randrange(0, dbgen.EVENTS - 1000)}&limit=1000"
                for _ in range(2000)
            )
        )
        d = DaemonProc(directory, f"ws://127.0.0.1:{free_port()}/ws").start()
        try:
            st = d.status()
            if st["events"]["stored"] < dbgen.EVENTS or st["sessions"] < dbgen.SESSIONS:
                raise RuntimeError(f"the daemon does not see the generated data: {st['events']}")
            plan = [
                ("health", "/v1/health", None, seconds),
                ("status", "/v1/status", None, seconds),
                ("session", "/v1/sessions/0", sessions_file, seconds),
                ("events", "/v1/events", events_file, seconds * 1.5),
            ]
            for rep in range(ctx.reps):
                order = plan if rep % 2 == 0 else plan[::-1]
                for name, path, paths_file, secs in order:
                    runs.setdefault(name, []).append(_load(d, path, secs, paths_file))
                ctx.log(
                    f"  queries rep {rep + 1}: "
                    + ", ".join(
                        f"{k} p50 {v[-1]['p50_ms']:.2f} / p99 {v[-1]['p99_ms']:.2f} ms"
                        for k, v in runs.items()
                    )
                )
            page = d.client().request("GET", "/v1/events?since=500000&limit=1000")[1]
            page_bytes = len(json.dumps(page, separators=(",", ":")))
        finally:
            d.stop()

    def q(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    labels = {
        "status": "GET /v1/status",
        "session": "GET /v1/sessions/{id}",
        "events": "GET /v1/events?since=N&limit=1000",
    }
    for name, label in labels.items():
        goal = name in ("status", "session")
        sec.add(
            Row(
                f"{label} p50",
                "ms",
                q(name, "p50_ms"),
                "GET /v1/health p50",
                ratios(q(name, "p50_ms"), q("health", "p50_ms")),
            )
        )
        sec.add(
            Row(
                f"{label} p99",
                "ms",
                q(name, "p99_ms"),
                "GET /v1/health p99",
                ratios(q(name, "p99_ms"), q("health", "p99_ms")),
                Goal("p99 ≤ 2× trivial GET", "ratio", "<=", 2.0) if goal else None,
            )
        )
        sec.add(Row(f"{label} rate", "req/s", q(name, "rate")))
    sec.add(Row("GET /v1/health (trivial GET) p50", "ms", q("health", "p50_ms")))
    sec.add(Row("GET /v1/health (trivial GET) p99", "ms", q("health", "p99_ms")))
    sec.add(Row("GET /v1/health rate", "req/s", q("health", "rate")))
    sec.notes += [
        f"{seconds:g} s per query kind per repetition (events pages: {seconds * 1.5:g} s), "
        "one keep-alive connection, after 0.3 s warm-up; order reversed every other "
        "repetition.",
        f"An events page holds 1,000 events (the `events.body` JSON is parsed and re-encoded): "
        f"~{page_bytes / 1024:,.0f} KiB of JSON. The database: {dbgen.EVENTS:,} events, "
        f"{dbgen.SESSIONS:,} sessions (see bench/dbgen.py); warm page cache.",
    ]
    sec.extra["runs"] = runs
    return sec
