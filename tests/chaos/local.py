"""Local faults: the disk, the database file, the socket file and the clock.

- disk_full: the state directory is a small tmpfs that we fill while the backend streams and
  clients enqueue. Enqueue answers 202 (and the message is really stored) or 507 (and it is
  not); ingest pauses; once space is freed the daemon recovers by itself.
- readonly_state_dir: a read-only state directory at start, empty or holding a database:
  a clear error and exit 73.
- db_deleted: the database file deleted under a running daemon (with or without its -wal and
  -shm): the daemon restores it from its open connection and exits 74; restarted like
  systemd would, nothing committed (events seen, messages acknowledged) is lost.
- corrupt_at_start: a corrupt database (garbage pages, a foreign header, truncated): exit 65,
  the file byte-for-byte untouched.
- corrupt_while_running: the database file overwritten with garbage under a running daemon;
  what the daemon does is recorded; the next start refuses it with 65, untouched.
- socket_deleted: the API socket file removed while running; the daemon should notice and
  bind it again.
- clock_jump: wall clock jumps (libfaketime, when the Debian package faketime is installed):
  the link stays up, sequence numbers stay monotonic, nothing is pruned or expired.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import (
    Ctx,
    DaemonProcess,
    Enqueuers,
    RecordReader,
    Scenario,
    Skip,
    api,
    get,
    integrity_check,
    is_root,
    sha256,
    wait_until,
)
from .crash import EventReader, _check_events

DB = "kimi-syncd.db"


def _config(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base: dict[str, dict[str, Any]] = {
        "upstream": {"ping_interval": 1.0, "ping_timeout": 3.0, "open_timeout": 2.0},
        "reconnect": {"initial_delay": 0.05, "max_delay": 0.5},
        "breaker": {"failure_threshold": 1000, "cooldown": 2.0, "min_healthy_seconds": 0.3},
        "store": {"retention_days": 0, "max_events": 0},
        "outbox": {"max_attempts": 100000, "default_ttl": 0},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return base


def _wait_exit(d: DaemonProcess, timeout: float) -> int | None:
    assert d.proc is not None
    with contextlib.suppress(subprocess.TimeoutExpired):
        return d.proc.wait(timeout=timeout)
    return None


def _connected(d: DaemonProcess) -> bool:
    return bool(get(d, "/v1/status")["link"]["state"] == "connected")


def _state_is(d: DaemonProcess, msg_id: int, state: str) -> bool:
    return bool(get(d, f"/v1/outbox/{msg_id}")["state"] == state)


def _outbox_all(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    """chaos_id -> outbox item, for every message in the outbox."""
    out: dict[str, dict[str, Any]] = {}
    after = 0
    for _ in range(10_000):
        page = get(d, f"/v1/outbox?after={after}&limit=10000", timeout=30)
        for item in page["messages"]:
            body = item["body"]
            if isinstance(body, dict) and isinstance(body.get("chaos_id"), str):
                out[body["chaos_id"]] = item
        if len(page["messages"]) < 10000:
            break
        after = int(page["next_after"])
    return out


# -- disk full -------------------------------------------------------------------------------


def _fill(path: Path, limit: int = 1 << 30) -> int:
    """Write zeros into `path` until the file system is full; returns the bytes written."""
    written = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return 0  # full already
        raise
    try:
        for size in (65536, 4096, 512):  # big blocks, then the last crumbs
            block = b"\0" * size
            while written < limit:
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
    finally:
        os.close(fd)
    return written


def disk_full(ctx: Ctx) -> None:
    directory = ctx.subdir("d")
    state = directory / "state"
    ctx.mount(state, "24m")
    sim = ctx.sim(rate=100).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(sim.url, _config(), directory=directory)
    d.start()
    wait_until(lambda: _connected(d), 10, "the first connection")
    load = Enqueuers(d.socket, 2, "df", pad=2000, pause=0.01).start()
    time.sleep(1.5)
    filler = state / "filler"
    try:
        filled = _fill(filler)
        t0 = time.monotonic()
        detected = wait_until(
            lambda: get(d, "/v1/status")["db"]["fault"] is not None,
            ctx.t(30, 20),
            "the daemon to report the full disk",
            interval=0.1,
        )
        fault = get(d, "/v1/status")["db"]["fault"]
        # Ingest paused: no sequence number is committed while the disk is full.
        seq1 = get(d, "/v1/status")["events"]["last_seq"]
        time.sleep(ctx.t(4.0, 2.0))
        st = get(d, "/v1/status")
        paused = st["events"]["last_seq"] == seq1 and st["db"]["fault"] is not None
        ctx.check("ingest paused while the disk is full", paused, f"{seq1} -> {st['events']}")
        status, body = api(
            d,
            "POST",
            "/v1/outbox",
            json.dumps({"type": "chaos_probe", "chaos_id": "full"}).encode(),
        )
        ctx.check(
            "enqueue on a full disk answers 507 with a reason",
            status == 507 and "disk" in json.dumps(body),
            f"{status} {body}",
        )
        health = api(d, "GET", "/v1/health")
        ctx.figures["health_while_full"] = health
        filler.unlink()
        t1 = time.monotonic()
        recovered = wait_until(
            lambda: get(d, "/v1/status")["db"]["fault"] is None,
            ctx.t(30, 20),
            "the daemon to recover after space was freed",
            interval=0.1,
        )
        seq2 = get(d, "/v1/status")["events"]["last_seq"]
        wait_until(
            lambda: get(d, "/v1/status")["events"]["last_seq"] > seq2,
            15,
            "ingest to resume",
        )
        full_for = t1 - t0
    finally:
        load.stop()
        with contextlib.suppress(OSError):
            filler.unlink()
    acked, statuses, _ = load.snapshot()
    ctx.check(
        "enqueue answered 202 or 507 only",
        set(statuses) <= {200, 202, 507},
        f"statuses {dict(statuses)}",
    )
    stored = _outbox_all(d)
    record.poll()
    lies = [cid for cid in acked if cid not in stored]
    ctx.check("every 202 is really stored", not lies, f"{len(lies)} missing, e.g. {lies[:3]}")
    phantom = [cid for cid in load.refused if cid in stored]
    ctx.check(
        "no message answered 507 was stored", not phantom, f"{len(phantom)}, e.g. {phantom[:3]}"
    )
    assert d.proc is not None
    ctx.check("daemon kept running", d.proc.poll() is None, d.output()[-1500:])
    code = d.stop()
    ctx.check("clean stop", code == 0, f"exit {code}")
    result = integrity_check(state / DB)
    ctx.check("integrity_check ok", result == ["ok"], str(result[:3]))
    ctx.figures.update(
        {
            "tmpfs": "24 MiB",
            "filler_bytes": filled,
            "fault": fault,
            "detected_in_s": round(detected, 2),
            "full_for_s": round(full_for, 1),
            "recovered_in_s": round(recovered, 2),
            "enqueue_statuses": dict(statuses),
        }
    )


# -- read-only state directory -----------------------------------------------------------------


def readonly_state_dir(ctx: Ctx) -> None:
    sim = ctx.sim(rate=0).start()
    cases: list[tuple[str, bool]] = [("empty", False), ("with a database", True)]
    for label, with_db in cases:
        directory = ctx.subdir("d")
        state = directory / "state"
        d = ctx.daemon(sim.url, _config(), directory=directory)
        if with_db:
            if is_root():
                ctx.mount(state, "8m")
            d.start()
            d.stop()
        if is_root():
            if with_db:
                subprocess.run(
                    ["mount", "-o", "remount,ro", str(state)], check=True, capture_output=True
                )
            else:
                ctx.mount(state, "1m", read_only=True)
        else:
            state.mkdir(exist_ok=True)
            for p in [state, *state.iterdir()]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            ctx.cleanup(functools.partial(_chmod_back, state))
        d.start(wait=False)
        code = _wait_exit(d, 20)
        log = d.output()
        line = next((ln for ln in log.splitlines() if "ERROR" in ln), "")
        ctx.check(
            f"{label}: exit 73 with a clear error",
            code == 73 and str(state) in line,
            f"exit {code}; {line or log[-800:]}",
        )
        ctx.figures[label] = {"exit": code, "error": line.split(": ", 1)[-1][:200]}


def _chmod_back(state: Path) -> None:
    for p in [state, *state.iterdir()]:
        with contextlib.suppress(OSError):
            p.chmod(0o750 if p.is_dir() else 0o640)


# -- database deleted while running ------------------------------------------------------------


def db_deleted(ctx: Ctx) -> None:
    sim = ctx.sim(rate=100).start()
    record = RecordReader(sim.record)
    d = ctx.daemon(sim.url, _config())
    runs = ctx.n(3, 1)
    seen: dict[int, str] = {}
    acked_all: dict[str, int] = {}
    exits: list[int | None] = []
    to_exit: list[float] = []
    d.start()
    for run in range(runs):
        sim.control("fault")
        wait_until(lambda: _connected(d), 10, "connected")
        load = Enqueuers(d.socket, 4, f"dd{run}", pad=100).start()
        reader = EventReader(d, seen).start()
        time.sleep(ctx.rng.uniform(1.0, 2.0))
        # From here on nothing is delivered: every message acknowledged must be in the file.
        sim.control("fault", mode="refuse", status=503)
        sim.control("drop", abnormal=1)
        db = d.state_dir / DB
        everything = ctx.rng.random() < 0.5  # like `rm kimi-syncd.db*`
        for suffix in ("", "-wal", "-shm") if everything else ("",):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{db}{suffix}").unlink()
        t0 = time.monotonic()
        code = _wait_exit(d, 20)
        to_exit.append(time.monotonic() - t0)
        exits.append(code)
        load.stop()
        reader.stop()
        acked, _, _ = load.snapshot()
        acked_all.update(acked)
        ctx.check(
            f"run {run}: exit 74 after the file vanished",
            code == 74,
            f"exit {code}: {d.output()[-1500:]}",
        )
        if code is None:
            d.kill()
        ctx.check(f"run {run}: the file was restored", db.exists(), "no database at the path")
        if db.exists():
            result = integrity_check(db)
            ctx.check(
                f"run {run}: restored file passes integrity_check", result == ["ok"], str(result)
            )
        d.start()  # as systemd would (Restart=on-failure)
        checked, bad = _check_events(d, seen, list(seen))
        ctx.check(
            f"run {run}: every event seen before is still there",
            bad == 0,
            f"{bad} of {checked} events changed or vanished",
        )
        stored = _outbox_all(d)
        record.poll()
        lost = [c for c in acked_all if c not in stored and c not in record.seen]
        ctx.check(
            f"run {run}: every acknowledged message survived",
            not lost,
            f"{len(lost)} of {len(acked_all)} lost, e.g. {lost[:3]}",
        )
    ctx.check("clean stop", d.stop() == 0)
    ctx.figures.update(
        {
            "runs": runs,
            "exit_codes": exits,
            "seconds_to_exit": [round(x, 1) for x in to_exit],
            "events_checked": len(seen),
            "messages_acknowledged": len(acked_all),
        }
    )


# -- corruption ---------------------------------------------------------------------------------


def _populate(ctx: Ctx, d: DaemonProcess, sim_step: Any) -> None:
    d.start()
    wait_until(lambda: _connected(d), 10, "connected")
    sim_step()
    for i in range(50):
        api(
            d,
            "POST",
            "/v1/outbox",
            json.dumps({"type": "chaos_probe", "chaos_id": f"p{i}"}).encode(),
        )
    wait_until(lambda: get(d, "/v1/status")["events"]["last_seq"] >= 100, 15, "100 events")


def _corrupt(path: Path, how: str, rng_bytes: bytes) -> None:
    size = path.stat().st_size
    if how == "garbage_pages":
        with path.open("r+b") as fh:
            fh.seek(4096)
            fh.write((rng_bytes * (size // len(rng_bytes) + 1))[: max(size - 4096, 4096)])
    elif how == "foreign_header":
        with path.open("r+b") as fh:
            fh.write(b"This is not SQLite at all, sorry.".ljust(100, b"\0"))
    elif how == "truncated":
        with path.open("r+b") as fh:
            fh.truncate(max(size // 2, 4096 + 100))
    else:
        raise ValueError(how)


def corrupt_at_start(ctx: Ctx) -> None:
    sim = ctx.sim(rate=0).start()
    variants = ["garbage_pages", "foreign_header", "truncated"]
    for how in variants if not ctx.quick else [ctx.rng.choice(variants)]:
        d = ctx.daemon(sim.url, _config())
        _populate(ctx, d, lambda: sim.control("step", n=120))
        ctx.require(f"{how}: clean stop first", d.stop() == 0)
        db = d.state_dir / DB
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{db}{suffix}").unlink()
        _corrupt(db, how, ctx.rng.randbytes(4096))
        digest, mtime = sha256(db), db.stat().st_mtime_ns
        d.start(wait=False)
        code = _wait_exit(d, 20)
        line = next((ln for ln in d.output().splitlines() if "ERROR" in ln), "")
        ctx.check(f"{how}: exit 65", code == 65, f"exit {code}: {line or d.output()[-800:]}")
        ctx.check(
            f"{how}: file untouched",
            sha256(db) == digest and db.stat().st_mtime_ns == mtime,
            "the database file changed",
        )
        leftovers = sorted(p.name for p in db.parent.iterdir() if p.name != DB)
        ctx.figures[how] = {
            "exit": code,
            "error": line.split(": ", 1)[-1][:160],
            "beside": leftovers,
        }


def corrupt_while_running(ctx: Ctx) -> None:
    sim = ctx.sim(rate=50).start()
    d = ctx.daemon(sim.url, _config())
    _populate(ctx, d, lambda: sim.control("step", n=400))
    # A clean stop checkpoints everything into the main file; the restarted daemon has cold
    # caches, so it must read the pages we are about to destroy.
    ctx.require("clean stop first", d.stop() == 0)
    d.start()
    wait_until(lambda: _connected(d), 10, "connected")
    db = d.state_dir / DB
    _corrupt(db, "garbage_pages", ctx.rng.randbytes(4096))
    load = Enqueuers(d.socket, 1, "cw", pad=100, pause=0.02).start()
    observed: dict[str, Any] = {}
    window = ctx.t(20, 12)
    deadline = time.monotonic() + window
    statuses: dict[str, int] = {}
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        assert d.proc is not None
        if d.proc.poll() is not None:
            break
        with contextlib.suppress(Exception):  # provoke reads of the damaged pages too
            status, _ = api(d, "GET", "/v1/events?since=0&limit=500", timeout=5)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(0.2)
    load.stop()
    _, enqueue_statuses, _ = load.snapshot()
    assert d.proc is not None
    code = d.proc.poll()
    observed["exit_while_running"] = code
    observed["exit_after_s"] = round(time.monotonic() - t0, 1) if code is not None else None
    observed["events_read_statuses"] = statuses
    observed["enqueue_statuses"] = dict(enqueue_statuses)
    ctx.check(
        "the daemon notices and exits 74 (to be restarted onto the start-up check)",
        code == 74,
        f"still running after {window:g} s" if code is None else f"exit {code}",
    )
    if code is None:
        observed["exit_on_sigterm"] = d.stop()
    digest = sha256(db)
    d.start(wait=False)
    restart = _wait_exit(d, 20)
    observed["exit_on_restart"] = restart
    ctx.check("restart refuses the corrupt file: exit 65", restart == 65, f"exit {restart}")
    ctx.check("file untouched by the refused start", sha256(db) == digest, "changed")
    errors = [ln.split(": ", 1)[-1][:200] for ln in d.output().splitlines() if "ERROR" in ln]
    observed["errors"] = errors[:4]
    ctx.figures.update(observed)


# -- socket file deleted -------------------------------------------------------------------------


def socket_deleted(ctx: Ctx) -> None:
    sim = ctx.sim(rate=5).start()
    d = ctx.daemon(sim.url, _config())
    d.start()
    wait_until(lambda: _connected(d), 10, "connected")
    d.socket.unlink()
    t0 = time.monotonic()
    try:
        back = wait_until(
            lambda: api(d, "GET", "/v1/health", timeout=2)[0] == 200,
            ctx.t(15, 7),
            "the socket to be bound again",
            interval=0.2,
        )
        ctx.check("socket re-created", True)
        ctx.figures["recreated_in_s"] = round(back, 1)
    except AssertionError:
        ctx.check(
            "socket re-created",
            False,
            f"after {time.monotonic() - t0:.0f} s the daemon still listens on the unlinked "
            "inode only: no new client can connect (kimi-syncctl: 'daemon not running')",
        )
    assert d.proc is not None
    ctx.figures["daemon_running"] = d.proc.poll() is None
    code = d.stop()
    ctx.check("SIGTERM still stops it cleanly", code == 0, f"exit {code}")
    ctx.figures["exit"] = code


# -- clock jumps -------------------------------------------------------------------------------


LIBFAKETIME = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def clock_jump(ctx: Ctx) -> None:
    lib = next((p for p in LIBFAKETIME if os.path.exists(p)), None)
    if lib is None or shutil.which("faketime") is None:
        raise Skip("libfaketime not installed (Debian package faketime); clock jumps not tested")
    offset_file = ctx.dir / "faketime.offset"
    offset_file.write_text("+0\n")
    env = {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": "1",  # re-read the offset file every second
        # A suspend/resume moves the wall clock, not CLOCK_MONOTONIC.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    sim = ctx.sim(rate=20).start()
    d = ctx.daemon(sim.url, _config(outbox={"default_ttl": 3600.0}), env=env)
    d.start()
    wait_until(lambda: _connected(d), 10, "connected")
    conns0 = get(d, "/v1/status")["link"]["connections"]
    results: dict[str, Any] = {}
    jumps = (("forward_1h", "+3600"), ("back_2h", "-3600"), ("forward_1h_to_real_time", "+0"))
    for label, offset in jumps:
        seq0 = get(d, "/v1/status")["events"]["last_seq"]
        offset_file.write_text(f"{offset}\n")
        time.sleep(ctx.t(3.0, 2.0))
        st = get(d, "/v1/status")
        status, body = api(
            d, "POST", "/v1/outbox", json.dumps({"type": "chaos_probe", "chaos_id": label}).encode()
        )
        # Delivered before the next jump (with a 1 h TTL, a message still pending when the
        # clock then jumps forward 1 h would expire: by design, the TTL is wall-clock time).
        delivered_in: float | None = None
        if status in (200, 202):
            with contextlib.suppress(AssertionError):
                delivered_in = wait_until(
                    functools.partial(_state_is, d, int(body["id"]), "delivered"), 15, "delivery"
                )
        results[label] = {
            "link": st["link"]["state"],
            "seq_advanced": st["events"]["last_seq"] > seq0,
            "enqueue": status,
            "delivered_in_s": None if delivered_in is None else round(delivered_in, 2),
        }
        ctx.check(
            f"{label}: link up, ingest on, enqueue ok, delivered",
            st["link"]["state"] == "connected"
            and st["events"]["last_seq"] > seq0
            and status in (200, 202)
            and delivered_in is not None,
            json.dumps(results[label]),
        )
    noticed = sum("clock jumped" in ln for ln in d.output().splitlines())
    st = get(d, "/v1/status")
    ctx.check("no reconnect needed", st["link"]["connections"] == conns0, str(st["link"]))
    pending = get(d, "/v1/outbox?state=expired")["messages"]
    ctx.check("nothing expired by the jumps", not pending, f"{len(pending)} expired")
    ctx.figures.update({"jumps": results, "jumps_noticed_in_log": noticed})
    ctx.check("clean stop", d.stop() == 0)


SCENARIOS = [
    Scenario("disk_full", disk_full),
    Scenario("readonly_state_dir", readonly_state_dir),
    Scenario("db_deleted", db_deleted),
    Scenario("corrupt_at_start", corrupt_at_start),
    Scenario("corrupt_while_running", corrupt_while_running),
    Scenario("socket_deleted", socket_deleted),
    Scenario("clock_jump", clock_jump),
]
