"""Crash safety: a real daemon under heavy ingest and concurrent enqueues, SIGKILLed at random
moments, many times over.

After every kill, before the restart, the database files as the killed process left them
pass `PRAGMA integrity_check`. After every restart:

- every enqueue that was acknowledged (202/200) is still there, with its body, pending or
  delivered; an Idempotency-Key acknowledged before a crash still names the same message;
- every event read back through the API before the kill (so: committed) is still there with
  the same body;
- the session state equals a rebuild from the log (POST /v1/rebuild, then compare
  /v1/sessions before and after; retention is at its defaults and prunes nothing here).

Seeded: KIMI_CRASH_SEED=<n> replays a run (the seed is printed); KIMI_CRASH_ROUNDS=<n> changes
the number of kills (15 by default). Nothing asserts on speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import DaemonProcess, SimProcess

from kimi_syncd import ctl

SEED = int(os.environ.get("KIMI_CRASH_SEED") or random.randrange(1 << 31))
ROUNDS = int(os.environ.get("KIMI_CRASH_ROUNDS") or 15)
RATE = 300  # scenario events per second from the simulated backend
ENQUEUERS = 4
REBUILD_EVERY = 3  # the replay gets longer as the log grows: compare every few rounds


@dataclass
class Ledger:
    """What the test was told is durable."""

    acked: dict[int, str] = field(default_factory=dict)  # message id -> tag in its body
    keyed: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (id, tag)
    events: dict[int, Any] = field(default_factory=dict)  # seq -> body, seen committed
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight_lost: int = 0  # requests cut off by a kill: never acknowledged, may exist


def enqueuer(
    d: DaemonProcess, ledger: Ledger, stop: threading.Event, name: str, rng: random.Random
) -> None:
    client = ctl.Client(d.socket, timeout=10)
    n = 0
    while not stop.is_set():
        n += 1
        tag = f"{name}-{n}"
        headers = {"Content-Type": "application/json"}
        key = f"key-{tag}" if rng.random() < 0.3 else None
        if key:
            headers["Idempotency-Key"] = key
        body = json.dumps({"type": "crash_test", "tag": tag, "pad": "p" * rng.randint(0, 400)})
        try:
            status, answer = client.request("POST", "/v1/outbox", body.encode(), headers)
        except (ctl.CtlError, OSError):
            with ledger.lock:
                ledger.in_flight_lost += 1
            return  # killed: this request was never acknowledged
        assert status == 202, (status, answer)
        with ledger.lock:
            ledger.acked[int(answer["id"])] = tag
            if key:
                ledger.keyed[key] = (int(answer["id"]), body)


def all_messages(d: DaemonProcess) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    after = 0
    while True:
        page = d.get(f"/v1/outbox?after={after}&limit=1000")
        for m in page["messages"]:
            out[int(m["id"])] = m
        if not page["messages"]:
            return out
        after = page["next_after"]


def events_range(d: DaemonProcess, since: int, limit: int) -> dict[int, Any]:
    page = d.get(f"/v1/events?since={since}&limit={limit}")
    return {int(e["seq"]): e["body"] for e in page["events"] if "seq" in e}


def integrity_of_killed_files(db: Any) -> list[str]:
    """integrity_check on the files exactly as the killed process left them (WAL included)."""
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]


def settle(d: DaemonProcess, quiet: float = 0.4, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = d.get("/v1/status")["events"]["last_seq"]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = d.get("/v1/status")["events"]["last_seq"]
        if now == last and d.get("/v1/status")["db"]["ingest_queue"] == 0:
            return
        last = now
    raise AssertionError("the event log never settled")


def verify(d: DaemonProcess, sim: SimProcess, ledger: Ledger, *, rebuild: bool) -> int:
    """Everything acknowledged or seen committed is there; returns how many are missing."""
    lost = 0
    messages = all_messages(d)
    for msg_id, tag in ledger.acked.items():
        m = messages.get(msg_id)
        if m is None or m["body"].get("tag") != tag:
            lost += 1
            continue
        assert m["state"] in ("queued", "sent", "delivered"), m
    # An Idempotency-Key acknowledged before a crash still names the same message.
    for key, (msg_id, body) in list(ledger.keyed.items())[-5:]:
        status, answer = d.client().request(
            "POST",
            "/v1/outbox",
            body.encode(),
            {"Content-Type": "application/json", "Idempotency-Key": key},
        )
        assert (status, answer["id"], answer["created"]) == (200, msg_id, False), answer
    seqs = sorted(ledger.events)
    i = 0
    while i < len(seqs):
        stored = events_range(d, seqs[i] - 1, 1000)
        j = i
        while j < len(seqs) and seqs[j] < seqs[i] + 1000:
            if stored.get(seqs[j]) != ledger.events[seqs[j]]:
                lost += 1
            j += 1
        i = j
    if rebuild:
        sim.control("rate", rate=0)
        settle(d)
        before = d.get("/v1/sessions?include_deleted=1")["sessions"]
        status, result = d.client(timeout=60).request("POST", "/v1/rebuild", b"")
        assert status == 200, result
        after = d.get("/v1/sessions?include_deleted=1")["sessions"]
        assert before == after, "incremental session state differs from a replay of the log"
        assert result["sessions"] == len(after)
        sim.control("rate", rate=RATE)
    return lost


def test_sigkill_under_load_loses_nothing_acknowledged(
    daemon_factory: Callable[..., DaemonProcess],
    sim_factory: Callable[..., SimProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(SEED)
    with capsys.disabled():
        print(f"\ncrash: seed {SEED} (KIMI_CRASH_SEED={SEED} to replay), {ROUNDS} rounds")
    started = time.monotonic()
    sim = sim_factory(rate=RATE, seed=SEED % 10_000).start()
    d = daemon_factory(sim.url)
    db = d.state_dir / "kimi-syncd.db"
    ledger = Ledger()
    lost = 0
    rebuilds = 0
    for round_no in range(ROUNDS + 1):
        d.start()
        if round_no:
            check_rebuild = round_no % REBUILD_EVERY == 0 or round_no == ROUNDS
            rebuilds += check_rebuild
            lost += verify(d, sim, ledger, rebuild=check_rebuild)
            assert lost == 0, f"round {round_no}: {lost} acknowledged items lost (seed {SEED})"
        if round_no == ROUNDS:
            break
        d.wait_for(lambda: d.get("/v1/status")["link"]["state"] == "connected", what="connected")
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=enqueuer,
                args=(d, ledger, stop, f"r{round_no}t{k}", random.Random(rng.random())),
                daemon=True,
            )
            for k in range(ENQUEUERS)
        ]
        for t in threads:
            t.start()
        if rng.random() < 0.6:
            sim.control("blast", n=rng.randint(500, 2500), size=rng.choice([150, 300, 800]))
        time.sleep(rng.uniform(0.2, 1.0))
        # Read back what is committed right now, then kill at a random moment after it.
        last = d.get("/v1/status")["events"]["last_seq"]
        ledger.events.update(events_range(d, max(last - 300, 0), 300))
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(d.pid, signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert integrity_of_killed_files(db) == ["ok"], f"round {round_no} (seed {SEED})"
    assert d.stop() == 0
    assert "corrupt" not in d.output()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"crash: {ROUNDS} rounds, {len(ledger.acked)} acknowledged, {lost} lost "
            f"({len(ledger.events)} committed events re-read, {rebuilds} rebuild comparisons, "
            f"{ledger.in_flight_lost} requests cut off unacknowledged, {elapsed:.0f} s, "
            f"seed {SEED})"
        )
    assert lost == 0
    assert len(ledger.acked) > ROUNDS  # the load really ran
