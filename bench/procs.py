"""The processes a benchmark drives: a real daemon, the simulated backend, client helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil

from kimi_syncd import ctl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProc:
    """A real `python -m kimi_syncd` process on short temporary paths."""

    def __init__(
        self,
        directory: Path,
        upstream: str,
        *,
        env: dict[str, str] | None = None,
        notify_socket: Path | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.directory = directory
        self.socket = directory / "api.sock"
        self.state_dir = state_dir or directory / "state"
        self.upstream = upstream
        self.log = directory / "daemon.log"
        config = directory / "config.toml"
        config.touch()
        base = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_SYNCD_")}
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            base.pop(var, None)
        self.env = {**base, "KIMI_SYNCD_CONFIG": str(config), **(env or {})}
        if notify_socket is not None:
            self.env["NOTIFY_SOCKET"] = str(notify_socket)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, wait: bool = True, timeout: float = 60.0) -> DaemonProc:
        with self.log.open("ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kimi_syncd",
                    "--upstream",
                    self.upstream,
                    "--state-dir",
                    str(self.state_dir),
                    "--socket",
                    str(self.socket),
                ],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss_mib(self) -> float:
        return float(self.ps().memory_info().rss) / 2**20

    def cpu_seconds(self) -> float:
        t = self.ps().cpu_times()
        return float(t.user + t.system)

    def client(self, timeout: float = 10.0) -> ctl.Client:
        return ctl.Client(self.socket, timeout=timeout)

    def get(self, target: str) -> Any:
        status, body = self.client().request("GET", target)
        if status != 200:
            raise RuntimeError(f"GET {target}: {status} {body}")
        return body

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/v1/status")
        return body

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels or with their label text in the key."""
        _status, body = self.client().request("GET", "/metrics")
        text = body if isinstance(body, str) else json.dumps(body)
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^(\S+)\s+(\S+)$", line)
            if m:
                with contextlib.suppress(ValueError):
                    out[m.group(1)] = float(m.group(2))
        return out

    def commits(self) -> float:
        return self.metrics().get("kimi_syncd_commit_batch_size_count", 0.0)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            with contextlib.suppress(ctl.CtlError, OSError):
                if self.client(1.0).request("GET", "/v1/health")[0] in (200, 503):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"daemon not ready within {timeout} s:\n{self.output()[-3000:]}")

    def wait_connected(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ctl.CtlError, OSError, RuntimeError):
                if self.status()["link"]["state"] == "connected":
                    return
            time.sleep(0.02)
        raise RuntimeError(f"daemon not connected within {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DaemonProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] is not None else self.stop()


class SimProc:
    """`python -m kimi_syncd.sim` in its own process; `up_at` is when it printed 'listening'."""

    def __init__(self, directory: Path, port: int | None = None, rate: float = 0.0) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.up_at = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> SimProc:
        log = (self.directory / f"sim-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kimi_syncd.sim",
                "--port",
                str(self.port),
                "--rate",
                str(self.rate),
                "--seed",
                "7",
                "--ping-interval",
                "0",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # "kimi-syncd-sim listening on ws://..."
        self.up_at = time.time()
        if b"listening" not in line:
            raise RuntimeError(f"simulated backend did not start: {line!r}")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.control("stats")
                return self
            time.sleep(0.02)
        raise RuntimeError("simulated backend's control endpoint did not answer")

    def control(self, path: str, **params: Any) -> Any:
        query = f"?{urlencode(params)}" if params else ""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/_sim/{path}{query}", timeout=10
        ) as resp:
            return json.loads(resp.read())

    def blast(self, n: int, size: int = 300) -> None:
        self.control("blast", n=n, size=size)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> SimProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_json(args: list[str], timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run `python -m bench.<module> ...` that prints one JSON document; return it."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ReadyClient:
    """A `python -m bench.clients ws-*` process: waits for its "ready", then its JSON result."""

    def __init__(self, args: list[str], timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clients", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError(f"client {args[0]} did not get ready: {line!r}\n{err[-2000:]}")

    def result(self, timeout: float) -> Any:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError(f"client timed out after {timeout:g} s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"client failed ({self.proc.returncode}):\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])
