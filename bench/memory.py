"""Benchmark 5 — memory: the daemon's RSS at rest with 1,000,000 events and 100,000 queued
messages, then during and after minutes of full-rate ingest (is there growth?).
"""

from __future__ import annotations

import time

from bench import dbgen
from bench.common import Context, Goal, Row, Section, median
from bench.procs import DaemonProc, SimProc, free_port

QUEUED = 100_000
CHUNK = 25_000


def run(ctx: Context) -> Section:
    sec = Section("memory", "5. Memory (RSS of the daemon process)")
    assert ctx.template_db is not None
    duration = ctx.pick(20.0, 120.0)
    port = free_port()
    env = {
        "KIMI_SYNCD_RECONNECT__INITIAL_DELAY": "0.2",
        "KIMI_SYNCD_RECONNECT__MAX_DELAY": "0.5",
        "KIMI_SYNCD_BREAKER__FAILURE_THRESHOLD": "1000000",
    }
    with ctx.scratch("memory") as directory:
        db = dbgen.install(ctx.template_db, directory / "state")
        dbgen.add_outbox(db, QUEUED)
        d = DaemonProc(directory, f"ws://127.0.0.1:{port}/ws", env=env).start()
        try:
            st = d.status()
            if st["outbox"]["pending"] != QUEUED or st["events"]["stored"] < dbgen.EVENTS:
                raise RuntimeError(f"unexpected starting data: {st['outbox']} {st['events']}")
            time.sleep(2.0)
            rest = []
            for _ in range(5):
                rest.append(d.rss_mib())
                time.sleep(0.4)
            ctx.log(f"  memory at rest: {median(rest):.1f} MiB")
            with SimProc(directory, port=port).start() as sim:
                d.wait_connected()
                base = int(d.status()["events"]["last_seq"])
                started = time.monotonic()
                target = base
                samples: list[tuple[float, float]] = []
                next_sample = 0.0
                while (now := time.monotonic() - started) < duration:
                    last = int(d.status()["events"]["last_seq"])
                    if last >= target - CHUNK // 2:
                        sim.blast(CHUNK)
                        target += CHUNK
                    if now >= next_sample:
                        samples.append((now, d.rss_mib()))
                        next_sample += 2.0
                    time.sleep(0.1)
                final_last = int(d.status()["events"]["last_seq"])
                delivered = d.status()["outbox"]["by_state"].get("delivered", 0)
                end = [d.rss_mib()]
                time.sleep(0.5)
                end.append(d.rss_mib())
        finally:
            d.stop()
    frames = final_last - base
    values = [v for _, v in samples]
    half = len(values) // 2
    quarter = max(1, len(values) // 4)
    second_quarter = values[quarter:half] or values[:1]
    last_quarter = values[-quarter:]
    growth = median(last_quarter) - median(second_quarter)
    sec.add(
        Row(
            f"RSS at rest: {dbgen.EVENTS:,} events + {QUEUED:,} queued messages",
            "MiB",
            rest,
            goal=Goal("≤ 80 MiB", "value", "<=", 80.0),
            note="5 readings",
        )
    )
    sec.add(
        Row(
            f"RSS after {duration:g} s of full-rate ingest",
            "MiB",
            end,
            goal=Goal("≤ 80 MiB", "value", "<=", 80.0),
            note="2 readings",
        )
    )
    sec.add(Row("RSS peak during the ingest", "MiB", [max(values)]))
    sec.add(
        Row(
            "RSS growth, last quarter vs second quarter of the ingest",
            "MiB",
            [growth],
            note="medians of the 2-s readings",
        )
    )
    sec.add(Row("frames ingested during the run", "frames/s", [frames / duration]))
    sec.notes += [
        f"Ingest ran {duration:g} s ({'--quick' if ctx.quick else 'full run'}; the full run "
        f"uses 120 s): blasts of {CHUNK:,} frames issued whenever the daemon had committed "
        f"all but {CHUNK // 2:,} of the previous ones; {frames:,} frames committed, "
        f"{delivered:,} of the {QUEUED:,} queued messages drained meanwhile.",
        "RSS read with psutil every 2 s: "
        + ", ".join(f"{t:.0f}s {v:.0f}" for t, v in samples[:: max(1, len(samples) // 12)])
        + " MiB.",
    ]
    sec.extra["rss_samples"] = samples
    return sec
