"""Shared machinery of the fault campaigns: the scenario runner, processes, load, probes.

Every scenario is a function `fn(ctx)`: it starts what it needs through `ctx` (a real
daemon process, the simulated backend as a process, tmpfs mounts), records its checks with
`ctx.check()` and its figures in `ctx.figures`, and `ctx.close()` undoes everything. Every
loop here is bounded in count and in time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:  # `python -m tests.chaos`: make `conftest` importable
    sys.path.insert(0, str(_TESTS))

from conftest import DaemonProcess, SimProcess, free_port  # noqa: E402

from kimi_syncd import ctl  # noqa: E402

__all__ = [
    "CheckFailed",
    "Ctx",
    "DaemonGone",
    "DaemonProcess",
    "Enqueuers",
    "HealthProbe",
    "RecordReader",
    "Scenario",
    "SimProcess",
    "Skip",
    "api",
    "enqueue",
    "free_port",
    "integrity_check",
    "is_root",
    "percentiles",
    "rss_kib",
    "run_scenario",
    "sha256",
    "wait_until",
]

Json = dict[str, Any]


class Skip(Exception):
    """The scenario cannot run here (not root, tool missing); the reason is reported."""


class CheckFailed(AssertionError):
    """A check failed in a way that makes the rest of the scenario meaningless."""


class DaemonGone(Exception):
    """The daemon process exited when it should be serving (never swallowed by waits)."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    # A known daemon issue that shows only sometimes (so it cannot be a strict xfail): when
    # this check fails, the short test reports it without failing; the full run counts it.
    known: str | None = None


@dataclass
class Scenario:
    name: str
    fn: Callable[[Ctx], None]
    # CPU-heavy or timing-sensitive: the short test runs it alone, not beside others.
    heavy: bool = False


# -- small helpers ---------------------------------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def integrity_check(db: Path) -> list[str]:
    """PRAGMA integrity_check on a read-only connection (the WAL is read, not replayed)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def percentiles(values: list[float]) -> Json:
    """p50 / p99 / max in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {
        "n": len(ordered),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> float:
    """Poll until `predicate()` is truthy; returns the seconds it took. Errors raised by the
    predicate (the daemon restarting, a socket not there yet) count as "not yet"."""
    start = time.monotonic()
    deadline = start + timeout
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (ctl.CtlError, OSError, KeyError, ValueError, TypeError, AssertionError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last})" if last is not None else ""
            raise CheckFailed(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def api(
    d: DaemonProcess,
    method: str,
    target: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    try:
        status, answer = ctl.Client(d.socket, timeout=timeout).request(method, target, body, hdrs)
    except (ctl.CtlError, OSError):
        if d.proc is not None and d.proc.poll() is not None:
            errors = [ln for ln in d.output().splitlines() if "ERROR" in ln][-3:]
            raise DaemonGone(f"the daemon exited {d.proc.returncode}: {errors}") from None
        raise
    return int(status), answer


def get(d: DaemonProcess, target: str, timeout: float = 10.0) -> Any:
    status, body = api(d, "GET", target, timeout=timeout)
    if status != 200:
        raise CheckFailed(f"GET {target}: HTTP {status}: {body}")
    return body


def enqueue(d: DaemonProcess, message: Json, timeout: float = 10.0) -> tuple[int, Any]:
    return api(d, "POST", "/v1/outbox", json.dumps(message).encode(), timeout=timeout)


def toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def raise_nofile(target: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(target, hard) if hard != resource.RLIM_INFINITY else target
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def mount_tmpfs(path: Path, size: str, *, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0750" + (",ro" if read_only else "")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "kimi-chaos", str(path)],
        check=True,
        capture_output=True,
        timeout=20,
    )


def umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, timeout=20, check=False)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20, check=False)


# -- the context of one scenario ---------------------------------------------------------------


class Ctx:
    def __init__(
        self, campaign: str, scenario: str, seed: int, quick: bool, verbose: bool = False
    ) -> None:
        self.campaign = campaign
        self.scenario = scenario
        self.seed = seed
        self.quick = quick
        self.verbose = verbose
        self.rng = random.Random(f"{seed}:{campaign}:{scenario}")
        self.checks: list[Check] = []
        self.figures: Json = {}
        self.skipped: str | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="ksc-", dir="/tmp"))
        self._cleanups: list[Callable[[], None]] = []
        self._names = collections.Counter[str]()
        self.started = time.monotonic()

    # counts
    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def t(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    # reporting
    def log(self, message: str) -> None:
        if self.verbose:
            elapsed = time.monotonic() - self.started
            print(f"    [{self.scenario} {elapsed:6.1f}s] {message}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "", *, known: str | None = None) -> bool:
        self.checks.append(Check(name, bool(ok), detail, known))
        if not ok:
            self.log(f"FAILED {name}: {detail}" + (f" [known: {known}]" if known else ""))
        return bool(ok)

    def require(self, name: str, ok: bool, detail: str = "") -> None:
        if not self.check(name, ok, detail):
            raise CheckFailed(f"{name}: {detail}")

    @property
    def failed(self) -> list[Check]:
        """Every failed check, known issues included."""
        return [c for c in self.checks if not c.ok]

    @property
    def failed_unknown(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.known is None]

    # resources
    def cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def subdir(self, name: str) -> Path:
        self._names[name] += 1
        suffix = "" if self._names[name] == 1 else str(self._names[name])
        path = self.dir / f"{name}{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def daemon(
        self,
        upstream: str,
        config: dict[str, dict[str, Any]] | None = None,
        *,
        directory: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> DaemonProcess:
        """A daemon on its own directory (socket, state/, config.toml, daemon.log)."""
        where = directory or self.subdir("d")
        (where / "config.toml").write_text(toml(config or {}))
        d = DaemonProcess(where, upstream, env=env)
        self.cleanup(d.kill)
        return d

    def sim(self, *, rate: float = 0, extra: list[str] | None = None) -> SimProcess:
        s = SimProcess(self.subdir("sim"), rate=rate, seed=self.rng.randrange(1 << 30), extra=extra)
        self.cleanup(lambda: stop_sim(s))
        return s

    def mount(self, path: Path, size: str, *, read_only: bool = False) -> None:
        if not is_root():
            raise Skip("mounting a tmpfs needs root")
        mount_tmpfs(path, size, read_only=read_only)
        self.cleanup(lambda: umount(path))

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        self._cleanups.clear()
        if self.failed and not os.environ.get("KIMI_CHAOS_CLEAN"):
            return  # keep the logs for the post-mortem
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_sim(s: SimProcess) -> None:
    if s.proc is not None and s.proc.poll() is None:
        s.stop()


def kill_sim(s: SimProcess) -> None:
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(timeout=10)


def run_scenario(
    campaign: str, scenario: Scenario, seed: int, quick: bool, verbose: bool = False
) -> Ctx:
    ctx = Ctx(campaign, scenario.name, seed, quick, verbose)
    try:
        scenario.fn(ctx)
    except Skip as exc:
        ctx.skipped = str(exc)
    except (CheckFailed, DaemonGone) as exc:
        if not ctx.failed or isinstance(exc, DaemonGone):
            ctx.check("scenario", False, str(exc))
    except Exception:
        ctx.check("scenario", False, f"unexpected error:\n{traceback.format_exc()}")
    finally:
        ctx.figures["seconds"] = round(time.monotonic() - ctx.started, 1)
        ctx.close()
    return ctx


# -- load ------------------------------------------------------------------------------------


class Enqueuers:
    """Client threads enqueueing unique messages through the API until stopped.

    Each message carries `chaos_id`, unique in the run; `acked` maps the ids of those that got
    a 202/200 to their outbox ids. A request whose answer never came (the daemon died) is
    neither acknowledged nor counted as lost.
    """

    def __init__(
        self,
        socket_path: Path,
        threads: int,
        prefix: str,
        *,
        pad: int = 0,
        pause: float = 0.0,
        timeout: float = 5.0,
        max_seconds: float = 900.0,
        msg_type: str = "chaos_probe",
    ) -> None:
        self.socket_path = socket_path
        self.threads = threads
        self.prefix = prefix
        self.pad = "x" * pad
        self.pause = pause
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.msg_type = msg_type
        self.acked: dict[str, int] = {}
        self.refused: set[str] = set()  # answered with an error status: not stored
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> Enqueuers:
        self._stop.clear()
        for t in range(self.threads):
            worker = threading.Thread(target=self._run, args=(t,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)
        self._workers.clear()

    def _run(self, t: int) -> None:
        client = ctl.Client(self.socket_path, timeout=self.timeout)
        deadline = time.monotonic() + self.max_seconds
        headers = {"Content-Type": "application/json"}
        i = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            i += 1
            cid = f"{self.prefix}-{t}-{i}"
            body = json.dumps({"type": self.msg_type, "chaos_id": cid, "pad": self.pad}).encode()
            started = time.monotonic()
            try:
                status, answer = client.request("POST", "/v1/outbox", body, headers)
            except (ctl.CtlError, OSError):
                with self._lock:
                    self.errors += 1
                self._stop.wait(0.05)  # the daemon is down: don't spin
                continue
            elapsed = time.monotonic() - started
            with self._lock:
                self.statuses[status] += 1
                self.latencies.append(elapsed)
                if status in (200, 202) and isinstance(answer, dict):
                    self.acked[cid] = int(answer["id"])
                else:
                    self.refused.add(cid)
            if status not in (200, 202):
                self._stop.wait(0.01)
            if self.pause:
                self._stop.wait(self.pause)

    def snapshot(self) -> tuple[dict[str, int], collections.Counter[int], int]:
        with self._lock:
            return dict(self.acked), collections.Counter(self.statuses), self.errors


class RecordReader:
    """Reads the simulated backend's record file (JSONL, append-only, survives restarts).

    Sim restarts are marked by the file size at the moment the old process had exited: lines
    after a mark come from the next incarnation, whose connection ids start again at 1. So a
    connection is identified by (epoch, conn).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.boundaries: list[int] = []
        self.seen: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.lines = 0
        self._lock = threading.Lock()

    def mark_restart(self) -> None:
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            self.boundaries.append(size)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self._lock, self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
            end = data.rfind(b"\n")
            if end < 0:
                return
            pos = self.offset
            for raw in data[: end + 1].splitlines(keepends=True):
                start = pos
                pos += len(raw)
                line = raw.strip()
                if not line:
                    continue
                self.lines += 1
                try:
                    record = json.loads(line)
                    message = json.loads(record["text"])
                except (ValueError, KeyError, TypeError):
                    continue
                cid = message.get("chaos_id") if isinstance(message, dict) else None
                if not isinstance(cid, str):
                    continue
                epoch = sum(1 for b in self.boundaries if b <= start)
                self.seen[cid].append((epoch, int(record.get("conn", 0))))
            self.offset = pos


def restart_sim(s: SimProcess, record: RecordReader | None, *, hard: bool) -> None:
    """Kill (SIGKILL) or stop (SIGTERM) the simulated backend and start it on the same port."""
    if hard:
        kill_sim(s)
    else:
        stop_sim(s)
    if record is not None:
        record.mark_restart()
    s.start()


class HealthProbe:
    """Measures the /v1/health round trip every `interval` seconds, labelled by phase
    (connect included; a momentarily full listen backlog is waited out, not failed)."""

    def __init__(self, socket_path: Path, interval: float = 0.05, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.interval = interval
        self.timeout = timeout
        self.phase = "baseline"
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HealthProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)

    def _run(self) -> None:
        deadline = time.monotonic() + 1800
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample(self.phase)
            self._stop.wait(self.interval)

    def sample(self, phase: str) -> None:
        started = time.monotonic()
        try:
            ok = http_get_status(self.socket_path, "/v1/health", self.timeout) == 200
        except OSError:
            ok = False
        if ok:
            self.samples[phase].append(time.monotonic() - started)
        else:
            self.failures[phase] += 1

    def stats(self, phase: str) -> Json:
        out = percentiles(self.samples.get(phase, []))
        out["failures"] = self.failures.get(phase, 0)
        return out


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def unix_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    """Connect like a patient client: a full listen backlog (EAGAIN on a non-blocking
    AF_UNIX connect) is retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
            continue
        except OSError:
            sock.close()
            raise
        return sock


def http_get_status(path: Path, target: str, timeout: float = 10.0) -> int:
    """GET over the socket with a patient connect; the status code (0: no valid answer)."""
    with unix_connect(path, timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: kimi\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclass
class Counters:
    values: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] += n


def run_campaign(
    campaign: str,
    scenarios: list[Scenario],
    seed: int,
    *,
    quick: bool,
    concurrent: bool = True,
    verbose: bool = False,
) -> dict[str, Ctx]:
    """Run scenarios; with `concurrent`, the light ones run side by side (in threads) while
    the heavy ones run one after the other: each has its own processes, paths and ports."""
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, Ctx] = {}
    light = [s for s in scenarios if concurrent and not s.heavy]
    heavy = [s for s in scenarios if s not in light]
    with ThreadPoolExecutor(max_workers=max(len(light), 1)) as pool:
        futures = {
            s.name: pool.submit(run_scenario, campaign, s, seed, quick, verbose) for s in light
        }
        for s in heavy:
            results[s.name] = run_scenario(campaign, s, seed, quick, verbose)
        for name, future in futures.items():
            results[name] = future.result()
    return {s.name: results[s.name] for s in scenarios}
