"""Upstream faults: what the backend can do to us, and what we must not do to it.

- backend_restarts: the backend process killed (SIGKILL) or stopped (SIGTERM) and restarted
  many times while a client keeps enqueueing; every acknowledged message is delivered.
- stall: the backend stops answering pings (half-open TCP), then hangs handshakes; the dead
  connection is detected within ping_interval + ping_timeout and replaced.
- accept_then_close: the backend accepts and drops us at once; the breaker opens and the
  handshake attempts stay bounded.
- refusals: 401 (fatal: breaker open at once, one probe per cooldown), 429 and 503 with
  Retry-After (never retried sooner); the status says why.
- stop_reading: the backend stops reading while clients keep enqueueing big messages; the
  daemon's RSS stays bounded, the outbox bound answers 507, and everything acknowledged is
  delivered once the backend reads again.
- hostile_frames: ≥ 10,000 hostile frames; zero crashes, every rejected frame counted under
  its reason exactly as expected, memory bounded.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import threading
import time
from typing import Any

from kimi_syncd.sim import DEFAULT_HOSTILE_KINDS, HostileFrame, hostile_frames

from .common import (
    Ctx,
    DaemonGone,
    DaemonProcess,
    Enqueuers,
    RecordReader,
    Scenario,
    SimProcess,
    get,
    percentiles,
    restart_sim,
    rss_kib,
    wait_until,
)
from .crash import BACKEND_LOSS, _classify_missing

MIB = 1 << 20


def _config(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base: dict[str, dict[str, Any]] = {
        "upstream": {
            "ping_interval": 1.0,
            "ping_timeout": 2.0,
            "open_timeout": 2.0,
            "close_timeout": 1.0,
        },
        "reconnect": {"initial_delay": 0.05, "max_delay": 0.5, "multiplier": 2.0},
        "breaker": {"failure_threshold": 1000, "cooldown": 2.0, "min_healthy_seconds": 0.3},
        "outbox": {"max_attempts": 100000, "default_ttl": 0},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return base


def _link(d: DaemonProcess) -> dict[str, Any]:
    return dict(get(d, "/v1/status")["link"])


def _connected(d: DaemonProcess) -> bool:
    return bool(_link(d)["state"] == "connected")


def _connected_beyond(d: DaemonProcess, connections: int) -> bool:
    """Connected on a connection newer than the first `connections` ones."""
    link = _link(d)
    return bool(link["state"] == "connected" and link["connections"] > connections)


def _alive(ctx: Ctx, d: DaemonProcess) -> None:
    assert d.proc is not None
    code = d.proc.poll()
    ctx.check("daemon still running", code is None, f"exited {code}:\n{d.output()[-2000:]}")


def _delivered_all(
    ctx: Ctx,
    d: DaemonProcess,
    record: RecordReader,
    acked: dict[str, int],
    timeout: float,
    endings: list[float] | None = None,
) -> None:
    try:
        wait_until(
            lambda: get(d, "/v1/status")["outbox"]["pending"] == 0,
            timeout,
            "the outbox to drain",
            interval=0.2,
        )
    except AssertionError as exc:
        ctx.check("outbox drained", False, str(exc))
    record.poll()
    missing = [cid for cid in acked if cid not in record.seen]
    lost, with_backend = _classify_missing(d, acked, missing, endings or [], collections.Counter())
    ctx.check(
        "every acknowledged message delivered",
        not lost,
        f"{len(lost)} of {len(acked)} missing, e.g. {lost[:3]}",
    )
    ctx.check(
        "nothing confirmed by a pong lost with the backend's crash",
        not with_backend,
        f"{len(with_backend)}: {with_backend[:3]}",
        known=BACKEND_LOSS,
    )
    ctx.figures["lost_with_backend_crash"] = len(with_backend)
    dups = sum(len(v) - 1 for cid, v in record.seen.items() if cid in acked)
    same_conn = [cid for cid, v in record.seen.items() if len(set(v)) != len(v)]
    ctx.check("no duplicate on one connection", not same_conn, f"e.g. {same_conn[:3]}")
    ctx.figures.update(
        {"acknowledged": len(acked), "delivered": len(acked) - len(missing), "duplicated": dups}
    )


# -- backend restarts ------------------------------------------------------------------------


def backend_restarts(ctx: Ctx) -> None:
    restarts = ctx.n(100, 3)
    sim = ctx.sim(rate=20).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(sim.url, _config())
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    rss_start = rss_kib(d.pid)
    load = Enqueuers(d.socket, 2, "rs", pad=200, pause=0.01).start()
    reconnect: list[float] = []
    endings: list[float] = []
    kinds: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(restarts):
            before = _link(d)["connections"]
            hard = ctx.rng.random() < 0.5
            kinds["sigkill" if hard else "sigterm"] += 1
            t0 = time.monotonic()
            endings.append(time.time())
            restart_sim(sim, record, hard=hard)
            wait_until(
                functools.partial(_connected_beyond, d, before),
                15,
                "the daemon to reconnect after a backend restart",
                interval=0.02,
            )
            reconnect.append(time.monotonic() - t0)
            time.sleep(ctx.rng.uniform(0, 0.3))
    finally:
        load.stop()
    _alive(ctx, d)
    acked, statuses, _ = load.snapshot()
    ctx.check(
        "enqueue always acknowledged",
        set(statuses) <= {200, 202},
        f"statuses {dict(statuses)}",
    )
    _delivered_all(ctx, d, record, acked, ctx.t(60, 30), endings)
    rss_end = rss_kib(d.pid)
    link = _link(d)
    ctx.check("one connection per restart at least", link["connections"] > restarts, str(link))
    ctx.figures.update(
        {
            "backend_restarts": restarts,
            "restart_kinds": dict(kinds),
            "restart_to_reconnected": percentiles(reconnect),
            "connections": link["connections"],
            "attempts": link["attempts"],
            "rss_kib_start_end": [rss_start, rss_end],
        }
    )
    ctx.check("clean stop", d.stop() == 0)


# -- stalls ----------------------------------------------------------------------------------


def _closed_with(d: DaemonProcess, text: str, after_id: int) -> list[dict[str, Any]]:
    rows = get(d, "/v1/connections?limit=50")["connections"]
    return [
        r
        for r in rows
        if r["id"] > after_id and r["closed_at"] is not None and text in (r["error"] or "")
    ]


def stall(ctx: Ctx) -> None:
    ping_interval, ping_timeout = ctx.t(1.0, 0.5), ctx.t(2.0, 1.0)
    budget = ping_interval + ping_timeout + 1.0 + 2.0  # + heartbeat tick + scheduling slack
    sim = ctx.sim(rate=5).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(
        sim.url,
        _config(upstream={"ping_interval": ping_interval, "ping_timeout": ping_timeout}),
    )
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    load = Enqueuers(d.socket, 1, "st", pause=0.05).start()
    detections: list[float] = []
    try:
        for _ in range(ctx.n(3, 1)):
            wait_until(lambda: _connected(d), 10, "connected before the stall")
            conn_id = _link(d)["connection_id"] or 0
            sim.control("fault", mode="stall")
            t0 = time.monotonic()
            wait_until(
                functools.partial(_closed_with, d, "no pong", conn_id - 1),
                budget + 5,
                "the stalled connection to be declared dead",
                interval=0.05,
            )
            detections.append(time.monotonic() - t0)
            sim.control("fault")
        if not ctx.quick:
            # While stalled, every new connection is stalled too: each one is replaced.
            wait_until(lambda: _connected(d), 10, "connected before the stall")
            conn_id = _link(d)["connection_id"] or 0
            sim.control("fault", mode="stall")
            wait_until(
                lambda: len(_closed_with(d, "no pong", conn_id - 1)) >= 2,
                2 * budget + 10,
                "two stalled connections in a row to be replaced",
            )
        # A backend that hangs the opening handshake: bounded by open_timeout.
        sim.control("fault", mode="stall", handshake=1)
        sim.control("drop", abnormal=1)
        attempts0 = _link(d)["attempts"]
        time.sleep(ctx.t(8, 3))
        link = _link(d)
        ctx.check(
            "hung handshakes time out and are retried",
            link["state"] != "connected" and link["attempts"] > attempts0,
            str({k: link[k] for k in ("state", "attempts", "last_error")}),
        )
        ctx.figures["hung_handshake_error"] = link["last_error"]
        sim.control("fault")
        recovered = wait_until(lambda: _connected(d), 15, "recovery after the stall")
    finally:
        load.stop()
    ctx.check(
        "stall detected within ping_interval + ping_timeout (+ tick, slack)",
        max(detections) <= budget,
        f"detections {detections}, budget {budget}",
    )
    _alive(ctx, d)
    acked, _, _ = load.snapshot()
    _delivered_all(ctx, d, record, acked, 30)
    ctx.figures.update(
        {
            "detection_s": [round(x, 2) for x in detections],
            "detection_budget_s": budget,
            "recovered_in_s": round(recovered, 2),
        }
    )
    ctx.check("clean stop", d.stop() == 0)


# -- accept then close -----------------------------------------------------------------------


def accept_then_close(ctx: Ctx) -> None:
    threshold, cooldown = ctx.n(5, 3), ctx.t(4.0, 2.0)
    sim = ctx.sim(rate=2).start()
    d = ctx.daemon(
        sim.url,
        _config(
            breaker={
                "failure_threshold": threshold,
                "cooldown": cooldown,
                "min_healthy_seconds": 2.0,
            },
            reconnect={"initial_delay": 0.2, "max_delay": 2.0},
        ),
    )
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    code = ctx.rng.choice(("1000", "1011", "abnormal"))
    sim.control("fault", mode="accept_then_close", delay=0, code=code)
    before = sim.control("stats")["handshake_attempts"]
    sim.control("drop", abnormal=1)
    window = ctx.t(16.0, 5.0)
    time.sleep(window)
    attempts = sim.control("stats")["handshake_attempts"] - before
    link = _link(d)
    # `threshold` fast failures, then one probe per (jittered) cooldown, + the first probe.
    bound = threshold + math.ceil(window / cooldown) + 1
    ctx.check(
        "breaker opened",
        link["breaker"]["times_opened"] >= 1,
        str(link["breaker"]),
    )
    ctx.check(
        "handshake attempts bounded",
        attempts <= bound,
        f"{attempts} attempts in {window:g} s, bound {bound}",
    )
    ctx.check("status says why", bool(link["last_error"]), str(link))
    sim.control("fault")
    recovered = wait_until(lambda: _connected(d), cooldown * 1.25 + 6, "recovery")
    _alive(ctx, d)
    ctx.figures.update(
        {
            "close_code": code,
            "window_s": window,
            "handshake_attempts": attempts,
            "bound": bound,
            "breaker": link["breaker"]["state"],
            "last_error": link["last_error"],
            "recovered_in_s": round(recovered, 2),
        }
    )
    ctx.check("clean stop", d.stop() == 0)


# -- refusals ----------------------------------------------------------------------------------


def refusals(ctx: Ctx) -> None:
    """401, 429 and 503 side by side, each against its own backend and daemon."""
    cooldown = 4.0
    config = _config(
        breaker={"failure_threshold": 5, "cooldown": cooldown, "min_healthy_seconds": 0.3},
        reconnect={"initial_delay": 0.2, "max_delay": 2.0},
    )
    window = ctx.t(12.0, 5.0)
    cases: list[tuple[int, int | None, SimProcess, DaemonProcess]] = []
    for status, retry_after in ((401, None), (429, 2), (503, 3)):
        sim = ctx.sim(rate=0).start()
        params: dict[str, Any] = {"mode": "refuse", "status": status}
        if retry_after is not None:
            params["retry_after"] = retry_after
        sim.control("fault", **params)
        cases.append((status, retry_after, sim, ctx.daemon(sim.url, config)))

    def observe(status: int, retry_after: int | None, sim: SimProcess, d: DaemonProcess) -> None:
        d.start()
        time.sleep(window)
        times = sim.control("stats")["handshake_times"]
        attempts = len(times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        link = _link(d)
        why = f"{link['last_error']} / breaker: {link['breaker']['reason']}"
        ctx.check(f"{status}: status says why", str(status) in why, why)
        if retry_after is None:
            # Fatal: the breaker opens at once; then one probe per cooldown (+25 % jitter).
            bound = 1 + math.ceil(window / cooldown)
            ctx.check(
                f"{status}: breaker open at once",
                link["breaker"]["state"] != "closed" and link["breaker"]["times_opened"] >= 1,
                str(link["breaker"]),
            )
        else:
            bound = 1 + math.ceil((window + 1) / retry_after)
            ctx.check(
                f"{status}: Retry-After {retry_after} s honoured",
                all(g >= retry_after - 0.05 for g in gaps),
                f"gaps {[round(g, 2) for g in gaps]}",
            )
        ctx.check(
            f"{status}: no hammering",
            1 <= attempts <= bound,
            f"{attempts} attempts in {window:g} s, bound {bound}",
        )
        _alive(ctx, d)
        ctx.figures[str(status)] = {
            "retry_after": retry_after,
            "attempts": attempts,
            "window_s": window,
            "bound": bound,
            "min_gap_s": round(min(gaps), 2) if gaps else None,
            "last_error": link["last_error"],
            "breaker": link["breaker"]["state"],
        }
        ctx.check(f"{status}: clean stop", d.stop() == 0)

    errors: list[str] = []

    def guarded(*args: Any) -> None:
        try:
            observe(*args)
        except Exception as exc:
            errors.append(f"{args[0]}: {exc!r}")

    threads = [threading.Thread(target=guarded, args=case, daemon=True) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=window + 60)
    ctx.check("every refusal case ran", not errors, "; ".join(errors))


# -- a backend that stops reading ----------------------------------------------------------------


def stop_reading(ctx: Ctx) -> None:
    max_bytes = 16 * MIB
    sim = ctx.sim(rate=20).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(
        sim.url,
        _config(
            upstream={"ping_interval": 1.0, "ping_timeout": 3.0},
            outbox={"max_bytes": max_bytes, "max_attempts": 100000, "default_ttl": 0},
        ),
    )
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    load = Enqueuers(d.socket, 4, "sr", pad=16_000).start()
    time.sleep(ctx.t(2.0, 1.0))
    rss_base = rss_kib(d.pid)
    sim.control("fault", mode="stop_reading")
    samples: list[int] = []
    duration = ctx.t(24.0, 3.0)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        samples.append(rss_kib(d.pid))
        time.sleep(0.25)
    acked_during, statuses, _ = load.snapshot()
    pending_bytes = get(d, "/v1/status")["outbox"]["pending_bytes"]
    sim.control("fault")
    time.sleep(1.0)
    load.stop()
    acked, statuses, _ = load.snapshot()
    third = max(len(samples) // 3, 1)
    early, late = max(samples[:third]), max(samples[third:] or samples)
    peak = max(samples)
    ctx.check(
        "enqueue answers 202 or 507, never a lie",
        set(statuses) <= {200, 202, 507},
        f"statuses {dict(statuses)}",
    )
    ctx.check(
        "the outbox bound held",
        pending_bytes <= max_bytes,
        f"pending {pending_bytes} bytes > {max_bytes}",
    )
    ctx.check(
        "RSS bounded (peak < baseline + 96 MiB)",
        peak - rss_base < 96 * 1024,
        f"baseline {rss_base} KiB, peak {peak} KiB",
    )
    ctx.check(
        "RSS flat in the last two thirds (+ < 24 MiB)",
        late - early < 24 * 1024,
        f"first third max {early} KiB, later max {late} KiB",
    )
    _alive(ctx, d)
    _delivered_all(ctx, d, record, acked, ctx.t(90, 45))
    ctx.figures.update(
        {
            "stopped_reading_s": duration,
            "enqueue_statuses": dict(statuses),
            "acknowledged_while_stopped": len(acked_during),
            "pending_bytes_at_end": pending_bytes,
            "rss_kib": {"baseline": rss_base, "first_third_max": early, "peak": peak},
        }
    )
    ctx.check("clean stop", d.stop() == 0)


# -- hostile frames ------------------------------------------------------------------------------


def expected_reason(frame: HostileFrame, max_bytes: int) -> str | None:
    """How the daemon must classify a hostile frame: a rejection reason, or None when the
    frame is a JSON object with a string type (stored as an event, flagged when invalid)."""
    kind = frame.kind
    payload = frame.payload
    if kind == "binary":
        return "binary"
    if kind == "invalid_utf8":
        return "not_utf8"
    if kind == "oversized":
        return "too_large" if len(payload) > max_bytes else None
    if kind == "invalid_json":
        return "not_json"
    if kind == "non_object":
        return "not_object"
    if kind in ("missing_type", "bad_type"):
        return "no_type"
    if kind == "deep":
        return "too_deep"
    if kind == "huge_number":
        return "not_json" if "9" * 4301 in str(payload) else None
    return None  # unknown_type, wrong_types, surrogate


ENDING = ("oversized", "invalid_utf8")  # RFC 6455: 1009 / 1007, the connection ends


def hostile(ctx: Ctx) -> None:
    max_bytes = MIB
    total = ctx.n(10_000, 600)
    batch = 500
    ending_each = ctx.n(15, 2)
    sim = ctx.sim(rate=0).start()
    d = ctx.daemon(sim.url, _config(upstream={"max_frame_bytes": max_bytes}))
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    time.sleep(0.5)
    status0 = get(d, "/v1/status")
    base_rejected = collections.Counter(status0["rejected"]["by_reason"])
    base_seq = status0["events"]["last_seq"]
    rss_start = rss_kib(d.pid)
    expected: collections.Counter[str] = collections.Counter()
    expected_events = 0
    wrong_types = 0
    sent_kinds: collections.Counter[str] = collections.Counter()
    kinds = [k for k in DEFAULT_HOSTILE_KINDS if k not in ENDING]
    sent = 0
    t0 = time.monotonic()
    while sent < total:
        n = min(batch, total - sent)
        seed = ctx.rng.randrange(1 << 30)
        frames = hostile_frames(n, seed, kinds=kinds, oversize=max_bytes + 1)
        for f in frames:
            reason = expected_reason(f, max_bytes)
            sent_kinds[f.kind] += 1
            if reason is None:
                expected_events += 1
                wrong_types += f.kind == "wrong_types"
            else:
                expected[reason] += 1
        answer = sim.control("hostile", n=n, seed=seed, kinds=",".join(kinds))
        if [f.kind for f in frames] != answer["kinds"]:
            ctx.require("frames reproduced locally", False, "the sim sent other frames")
        sent += n
        want = sum(expected.values()) + sum(base_rejected.values())
        wait_until(
            functools.partial(_rejected_at_least, d, want),
            30,
            f"{want} rejected frames to be counted",
        )
    bulk_s = time.monotonic() - t0
    # Frames that end the connection (RFC 6455: 1009 too big, 1007 invalid UTF-8).
    reconnects: list[float] = []
    for kind in ENDING * ending_each:
        link = _link(d)
        conns, reason = link["connections"], ("too_large" if kind == "oversized" else "not_utf8")
        seen = get(d, "/v1/status")["rejected"]["by_reason"].get(reason, 0)
        # A connection must live min_healthy_seconds, or the breaker counts it as a failure.
        time.sleep(0.35)
        t1 = time.monotonic()
        sim.control("hostile", n=1, kinds=kind, oversize=max_bytes + 1)
        sent_kinds[kind] += 1
        expected[reason] += 1
        sent += 1
        wait_until(
            functools.partial(_ended_and_back, d, reason, seen, conns),
            20,
            f"a {kind} frame to be recorded and the link to come back",
        )
        reconnects.append(time.monotonic() - t1)
    time.sleep(0.5)
    status = get(d, "/v1/status")
    got = collections.Counter(status["rejected"]["by_reason"]) - base_rejected
    ctx.check(
        "every rejected frame counted under its expected reason",
        dict(got) == dict(expected),
        f"got {dict(got)}, expected {dict(expected)}",
    )
    stored, invalid = _count_events(d, base_seq)
    ctx.check(
        "every well-formed hostile frame stored as an event",
        stored == expected_events,
        f"stored {stored}, expected {expected_events}",
    )
    ctx.check(
        "frames with wrong field types are flagged invalid",
        invalid >= wrong_types,
        f"{invalid} flagged, {wrong_types} wrong_types frames",
    )
    rss_end = rss_kib(d.pid)
    ctx.check(
        "memory bounded (RSS growth < 64 MiB)",
        rss_end - rss_start < 64 * 1024,
        f"{rss_start} -> {rss_end} KiB",
    )
    _alive(ctx, d)
    ctx.figures.update(
        {
            "hostile_frames_sent": sent,
            "by_kind": dict(sorted(sent_kinds.items())),
            "rejected_by_reason": dict(sorted(got.items())),
            "stored_as_events": stored,
            "flagged_invalid": invalid,
            "bulk_frames_per_s": round((sent - len(reconnects)) / bulk_s),
            "connection_ending_frames": len(reconnects),
            "reconnect_after_ending_frame": percentiles(reconnects),
            "rss_kib_start_end": [rss_start, rss_end],
        }
    )
    ctx.check("clean stop", d.stop() == 0)


def _rejected_at_least(d: DaemonProcess, total: int) -> bool:
    return int(get(d, "/v1/status")["rejected"]["total"]) >= total


def _ended_and_back(d: DaemonProcess, reason: str, seen: int, connections: int) -> bool:
    """One more frame rejected for `reason`, and connected again on a new connection."""
    count = int(get(d, "/v1/status")["rejected"]["by_reason"].get(reason, 0))
    return count > seen and _connected_beyond(d, connections)


def _count_events(d: DaemonProcess, since: int) -> tuple[int, int]:
    stored = invalid = 0
    cursor = since
    for _ in range(1000):
        page = get(d, f"/v1/events?since={cursor}&kind=event&limit=10000", timeout=30)
        for item in page["events"]:
            if item["type"] == "init" and "invalid" not in item:
                continue  # the backend's snapshot on every (re)connect
            stored += 1
            invalid += "invalid" in item
        if len(page["events"]) < 10000:
            break
        cursor = int(page["events"][-1]["seq"])
    return stored, invalid


# Frames with integers outside SQLite's INTEGER range where the daemon reads ids.
HUGE_IDS = (
    '{"type":"log_metric","session_id":18446744073709551617,"source":"x"}',
    '{"type":"new_session","session":{"id":9223372036854775808,"name":"huge"}}',
    '{"type":"session_deleted","session_id":-9223372036854775809}',
    '{"type":"sessions_bulk_deleted","session_ids":["9999999999999999999"],"deleted_count":1}',
)


def huge_ids(ctx: Ctx) -> None:
    """Ids beyond 64 bits must be stored or rejected, never take the writer down."""
    sim = ctx.sim(rate=0).start()
    d = ctx.daemon(sim.url, _config())
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    time.sleep(0.3)
    before = get(d, "/v1/status")
    for frame in HUGE_IDS:
        sim.control("emit", raw=frame)
    sim.control("emit", raw='{"type":"cline_usage_updated","latest_ts":1,"latest_count":1}')

    def accounted() -> bool:
        now = get(d, "/v1/status")
        return bool(
            (now["events"]["last_seq"] - before["events"]["last_seq"])
            + (now["rejected"]["total"] - before["rejected"]["total"])
            >= len(HUGE_IDS) + 1
        )

    try:
        wait_until(accounted, 10, "every frame to be stored or rejected")
        ok, detail = True, ""
    except (AssertionError, DaemonGone) as exc:
        ok, detail = False, str(exc)
    assert d.proc is not None
    alive = d.proc.poll() is None
    errors = [ln for ln in d.output().splitlines() if "ERROR" in ln][:3]
    ctx.check(
        "frames with 64-bit-overflowing ids stored or rejected, writer alive",
        ok and alive,
        f"{detail}; daemon {'running' if alive else f'exited {d.proc.returncode}'}; {errors}",
    )
    if alive:
        ctx.check("clean stop", d.stop() == 0)


SCENARIOS = [
    Scenario("backend_restarts", backend_restarts),
    Scenario("stall", stall),
    Scenario("accept_then_close", accept_then_close),
    Scenario("refusals", refusals),
    Scenario("stop_reading", stop_reading, heavy=True),
    Scenario("hostile_frames", hostile),
    Scenario("huge_ids", huge_ids),
]
