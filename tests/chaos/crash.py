"""Crash campaign: SIGKILL the daemon at random moments under mixed load, then audit.

Load during each round: the simulated backend streams scenario events at a high rate,
8 client threads enqueue unique messages through the API, a reader thread follows
/v1/events, and a flapper thread drops the backend's connections (clean and abnormal) and
restarts the backend process (SIGTERM or SIGKILL). At a random moment (sometimes during the
daemon's start-up) the daemon gets SIGKILL. Then, with the backend refusing connections so
that nothing moves:

1. `PRAGMA integrity_check` on the database file (read-only, before any restart);
2. restart the daemon (as systemd would);
3. every event seen through /v1/events before the kill is still there, same seq, same body;
4. /v1/sessions equals its rebuild from the log (POST /v1/rebuild; retention disabled);
5. every acknowledged message (202/200) was received by the backend (its record file) or is
   still pending in /v1/outbox; duplicates only across connections, at most `window` per
   connection.

A final drain (no faults) must deliver every acknowledged message.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from datetime import datetime
from typing import Any

from .common import (
    Ctx,
    DaemonProcess,
    Enqueuers,
    RecordReader,
    Scenario,
    SimProcess,
    api,
    get,
    integrity_check,
    restart_sim,
    wait_until,
)

WINDOW = 64  # outbox.window: the most messages sent and not yet confirmed


def daemon_config() -> dict[str, dict[str, Any]]:
    return {
        "upstream": {
            "ping_interval": 1.0,
            "ping_timeout": 3.0,
            "open_timeout": 3.0,
            "close_timeout": 1.0,
        },
        "reconnect": {"initial_delay": 0.05, "max_delay": 0.5, "multiplier": 2.0},
        # Flapping is the point here: never let the breaker slow the link down.
        "breaker": {"failure_threshold": 1000, "cooldown": 1.0, "min_healthy_seconds": 0.3},
        # Nothing pruned: the rebuild must replay the whole log.
        "store": {"retention_days": 0, "max_events": 0},
        "outbox": {"max_attempts": 100000, "default_ttl": 0, "window": WINDOW},
        "log": {"level": "INFO"},
    }


def _digest(item: dict[str, Any]) -> str:
    return hashlib.sha1(
        json.dumps([item["kind"], item["type"], item["body"]], sort_keys=True).encode()
    ).hexdigest()


class EventReader:
    """Follows /v1/events by polling; remembers seq -> digest of (kind, type, body)."""

    def __init__(self, d: DaemonProcess, seen: dict[int, str]) -> None:
        self.d = d
        self.seen = seen
        self.cursor = max(seen, default=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = api(
                    self.d, "GET", f"/v1/events?since={self.cursor}&limit=2000", timeout=5
                )
            except Exception:
                self._stop.wait(0.05)
                continue
            if status != 200 or not isinstance(body, dict):
                self._stop.wait(0.05)
                continue
            for item in body["events"]:
                self.seen[int(item["seq"])] = _digest(item)
                self.cursor = max(self.cursor, int(item["seq"]))
            if len(body["events"]) < 2000:
                self._stop.wait(0.05)


class Flapper:
    """Drops the backend's connections and restarts the backend process, at random."""

    def __init__(self, ctx: Ctx, sim: SimProcess, record: RecordReader) -> None:
        self.ctx = ctx
        self.sim = sim
        self.record = record
        self.rng = ctx.rng
        self.counts: collections.Counter[str] = collections.Counter()
        self.endings: list[float] = []  # epoch times of drops and restarts
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Flapper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.wait(self.rng.uniform(0.15, 0.8)) and time.monotonic() < deadline:
            roll = self.rng.random()
            try:
                with self.lock:
                    if roll < 0.15:
                        # A burst far above the steady rate.
                        self.sim.control(
                            "blast",
                            n=self.rng.randint(500, 3000),
                            size=self.rng.choice((150, 300, 400, 800)),
                        )
                        self.counts["blast"] += 1
                    elif roll < 0.45:
                        self.endings.append(time.time())
                        self.sim.control("drop", abnormal=1)
                        self.counts["drop_abnormal"] += 1
                    elif roll < 0.7:
                        self.endings.append(time.time())
                        self.sim.control("drop", code=self.rng.choice((1000, 1001, 1011, 1012)))
                        self.counts["drop_clean"] += 1
                    else:
                        hard = self.rng.random() < 0.5
                        self.endings.append(time.time())
                        restart_sim(self.sim, self.record, hard=hard)
                        self.counts["restart_kill" if hard else "restart_term"] += 1
            except Exception:
                self.counts["control_errors"] += 1

    def ensure_running(self) -> None:
        with self.lock:
            if self.sim.proc is None or self.sim.proc.poll() is not None:
                self.record.mark_restart()
                self.sim.start()


def _pending(d: DaemonProcess) -> dict[int, str]:
    """id -> state of every pending (queued/sent) message."""
    out: dict[int, str] = {}
    after = 0
    for _ in range(10_000):
        page = get(d, f"/v1/outbox?state=pending&after={after}&limit=10000")
        for item in page["messages"]:
            out[int(item["id"])] = str(item["state"])
        if len(page["messages"]) < 10000:
            break
        after = int(page["next_after"])
    return out


def _check_events(d: DaemonProcess, seen: dict[int, str], seqs: list[int]) -> tuple[int, int]:
    """Fetch the given seqs back; returns (checked, bad)."""
    if not seqs:
        return 0, 0
    seqs = sorted(seqs)
    bad = 0
    checked = 0
    i = 0
    got: dict[int, str] = {}
    cursor = seqs[0] - 1
    last = seqs[-1]
    for _ in range(100_000):
        if cursor >= last:
            break
        page = get(d, f"/v1/events?since={cursor}&limit=10000", timeout=30)
        for item in page["events"]:
            got[int(item["seq"])] = _digest(item)
        if not page["events"]:
            break
        cursor = int(page["events"][-1]["seq"])
    for i in seqs:
        checked += 1
        if got.get(i) != seen[i]:
            bad += 1
    return checked, bad


def _sessions(d: DaemonProcess) -> list[dict[str, Any]]:
    return list(get(d, "/v1/sessions?include_deleted=true")["sessions"])


def _diff_sessions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    ia = {s["id"]: s for s in a}
    ib = {s["id"]: s for s in b}
    out = []
    for sid in sorted(set(ia) | set(ib)):
        if ia.get(sid) != ib.get(sid):
            sa, sb = ia.get(sid) or {}, ib.get(sid) or {}
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            out.append(
                f"session {sid}: "
                + ", ".join(f"{k}: {sa.get(k)!r} != {sb.get(k)!r}" for k in keys[:4])
            )
    return "; ".join(out[:5])


def crash_rounds(ctx: Ctx) -> None:
    rounds = ctx.n(50, 3)
    rate = ctx.n(300, 150)
    sim = ctx.sim(rate=rate).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(sim.url, daemon_config())
    flapper = Flapper(ctx, sim, record)
    seen: dict[int, str] = {}
    acked: dict[str, int] = {}
    totals: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    kill_points: collections.Counter[str] = collections.Counter()
    restart_seconds: list[float] = []
    reported: set[tuple[int, int]] = set()
    reported_missing: set[str] = set()
    d.start()
    for r in range(1, rounds + 1):
        round_ok = True
        problems: list[str] = []
        # -- load, then SIGKILL at a random moment ---------------------------------------
        load = Enqueuers(d.socket, 8, f"r{r}", pad=ctx.rng.choice((0, 64, 600)), pause=0.002)
        reader = EventReader(d, seen)
        if r > 1 and ctx.rng.random() < 0.2:
            # Kill during start-up (store open, checks, bind, first connect).
            assert d.proc is not None
            d.proc.kill()
            d.proc.wait()
            sim.control("fault")
            d.start(wait=False)
            load.start()
            reader.start()
            time.sleep(ctx.rng.uniform(0.1, 1.2))
            kill_points["startup"] += 1
        else:
            sim.control("fault")  # no refusal any more: the daemon connects, the load flows
            load.start()
            reader.start()
            flapper.start()
            pause = ctx.rng.uniform(0.3, ctx.t(2.5, 1.5))
            time.sleep(pause)
            totals["load_ms"] += int(pause * 1000)
            kill_points["running"] += 1
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        load.stop()
        reader.stop()
        flapper.stop()
        flapper.ensure_running()
        round_acked, round_statuses, errors = load.snapshot()
        acked.update(round_acked)
        statuses.update(round_statuses)
        totals["unanswered"] += errors
        # Nothing moves while we audit: the backend refuses the restarted daemon.
        sim.control("fault", mode="refuse", status=503)
        # -- 1. integrity before anything touches the file -------------------------------
        db = d.state_dir / "kimi-syncd.db"
        if db.exists():
            result = integrity_check(db)
            if result != ["ok"]:
                round_ok = False
                problems.append(f"integrity_check: {result[:3]}")
        # -- 2. restart --------------------------------------------------------------------
        t0 = time.monotonic()
        d.start()
        restart_seconds.append(time.monotonic() - t0)
        # -- 3. events ---------------------------------------------------------------------
        round_seqs = [s for s in seen if s > totals["verified_upto"]]
        checked, bad = _check_events(d, seen, round_seqs)
        totals["events_checked"] += checked
        if bad:
            round_ok = False
            problems.append(f"{bad} of {checked} events seen before the kill changed or vanished")
        totals["verified_upto"] = max(seen, default=0)
        # -- 4. state == rebuild -------------------------------------------------------------
        before = _sessions(d)
        status, _rebuilt = api(d, "POST", "/v1/rebuild", b"", timeout=60)
        after = _sessions(d)
        if status != 200 or before != after:
            round_ok = False
            problems.append(f"rebuild HTTP {status}: {_diff_sessions(before, after)}")
        totals["sessions"] = len(after)
        # -- 5. acknowledged messages ---------------------------------------------------------
        record.poll()
        pending = _pending(d)
        delivered = sum(1 for cid in acked if cid in record.seen)
        missing = [
            c
            for c, m in acked.items()
            if c not in record.seen and m not in pending and c not in reported_missing
        ]
        reported_missing.update(missing)  # each one is reported by one round only
        lost, with_backend = _classify_missing(d, acked, missing, flapper.endings, totals)
        if lost:
            round_ok = False
            problems.append(f"{len(lost)} acknowledged messages lost, e.g. {lost[:3]}")
        ctx.check(
            f"round {r}: nothing confirmed by a pong lost with the backend's crash",
            not with_backend,
            f"{len(with_backend)} messages, e.g. {with_backend[:3]}",
            known=BACKEND_LOSS,
        )
        dup_problem, excess = _duplicates(record, totals, reported)
        if dup_problem:
            round_ok = False
            problems.append(dup_problem)
        ctx.check(
            f"round {r}: re-sends within outbox.window",
            not excess,
            excess,
            known=DUP_BUG,
        )
        ctx.check(
            f"round {r}",
            round_ok,
            "; ".join(problems) + f" (acked {len(acked)}, delivered {delivered})",
        )
        ctx.log(
            f"round {r}: acked {len(acked)} delivered {delivered} pending {len(pending)} "
            f"events {len(seen)} {'ok' if round_ok else 'FAILED'}"
        )
    # -- final drain: everything acknowledged reaches the backend --------------------------
    sim.control("fault")
    drained_in: float | None = None
    try:
        drained_in = wait_until(
            lambda: get(d, "/v1/status")["outbox"]["pending"] == 0,
            ctx.t(120, 60),
            "the outbox to drain",
            interval=0.25,
        )
    except AssertionError as exc:
        ctx.check("final drain", False, str(exc))
    time.sleep(0.5)
    checked, bad = _check_events(d, seen, list(seen))
    ctx.check(
        "every event seen in any round still there at the end",
        bad == 0,
        f"{bad} of {checked} changed or vanished",
    )
    record.poll()
    missing = [cid for cid in acked if cid not in record.seen]
    lost, with_backend = _classify_missing(d, acked, missing, flapper.endings, totals)
    ctx.check("every acknowledged message delivered", not lost, f"missing e.g. {lost[:5]}")
    ctx.check(
        "no message lost with the backend's crash (drain)",
        not with_backend,
        f"{len(with_backend)}: {with_backend[:5]}",
        known=BACKEND_LOSS,
    )
    dup_problem, excess = _duplicates(record, totals, reported)
    ctx.check("duplicates only across connections", not dup_problem, dup_problem)
    ctx.check("re-sends within outbox.window (drain)", not excess, excess, known=DUP_BUG)
    status_code = d.stop()
    ctx.check("clean stop at the end", status_code == 0, f"exit {status_code}")
    dups = sum(len(v) - 1 for cid, v in record.seen.items() if cid in acked and len(v) > 1)
    ctx.figures.update(
        {
            "rounds": rounds,
            "kills_during_startup": kill_points["startup"],
            "kills_while_running": kill_points["running"],
            "messages_acknowledged": len(acked),
            "delivered": sum(1 for cid in acked if cid in record.seen),
            "duplicated": dups,
            "max_resent_per_connection": totals["max_resent"],
            "connections_resending_over_window": totals["connections_over_window"],
            "lost": len(lost),
            "lost_with_backend_crash": len(with_backend),
            "requests_without_answer": totals["unanswered"],
            "http_statuses": dict(sorted(statuses.items())),
            "events_verified": totals["events_checked"],
            "events_seen": len(seen),
            "events_per_s_under_load": round(len(seen) / max(totals["load_ms"] / 1000, 1)),
            "sessions": totals["sessions"],
            "backend_flaps": dict(flapper.counts),
            "restart_to_ready_s": {
                "max": round(max(restart_seconds, default=0), 2),
                "mean": round(sum(restart_seconds) / max(len(restart_seconds), 1), 2),
            },
            "drain_s": None if drained_in is None else round(drained_in, 1),
        }
    )


BACKEND_LOSS = (
    "a pong proves that the backend's WebSocket stack read a message, not that its "
    "application did: when the backend process dies within milliseconds of the pong, the "
    "message is marked delivered but was never processed (inherent to pong-as-ack)"
)
# A pong this long before a backend restart or drop may have raced it.
RACE_S = 1.0


def _classify_missing(
    d: DaemonProcess,
    acked: dict[str, int],
    missing: list[str],
    endings: list[float],
    totals: collections.Counter[str],
) -> tuple[list[str], list[str]]:
    """Split acknowledged messages the backend never recorded into (lost, lost with the
    backend): the latter were confirmed by a pong shortly before the backend was killed or
    its connections dropped, so its WebSocket stack had them and its application did not."""
    lost: list[str] = []
    with_backend: list[str] = []
    for cid in missing:
        status, row = api(d, "GET", f"/v1/outbox/{acked[cid]}")
        at = row.get("delivered_at") if status == 200 and isinstance(row, dict) else None
        when = _epoch(at) if isinstance(at, str) else None
        if (
            when is not None
            and row["state"] == "delivered"
            and any(when - 0.05 <= e <= when + RACE_S for e in endings)
        ):
            with_backend.append(cid)
        else:
            lost.append(cid)
    return lost, with_backend


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


DUP_BUG = (
    "after a SIGKILL, messages whose pong came back but whose 'delivered' state was not "
    "committed yet are re-sent too: the link frees window room before the transition is "
    "durable, so crash duplicates are not bounded by outbox.window"
)


def _duplicates(
    record: RecordReader, totals: collections.Counter[str], reported: set[tuple[int, int]]
) -> tuple[str, str]:
    """A message may be received again only on a later connection (after a reconnect), and
    a connection re-sends at most `window` messages. Returns (hard problem, window excess),
    each about connections not reported before."""
    same_conn = []
    resent: collections.Counter[tuple[int, int]] = collections.Counter()
    for cid, places in record.seen.items():
        if len(places) < 2:
            continue
        if len(set(places)) != len(places):
            same_conn.append(cid)
        for place in places[1:]:
            resent[place] += 1
    worst = max(resent.values(), default=0)
    totals["max_resent"] = max(totals["max_resent"], worst)
    hard = excess = ""
    if same_conn:
        hard = f"{len(same_conn)} messages received twice on one connection, e.g. {same_conn[:3]}"
    over = {p: n for p, n in resent.items() if n > WINDOW and p not in reported}
    if over:
        reported.update(over)
        totals["connections_over_window"] += len(over)
        excess = (
            f"{len(over)} connection(s) re-sent more than the window ({WINDOW}): "
            f"{sorted(over.values(), reverse=True)[:5]}"
        )
    return hard, excess


SCENARIOS = [Scenario("crash_rounds", crash_rounds, heavy=True)]
