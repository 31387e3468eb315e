"""Shared fixtures: settings on short temporary paths, a store, the simulated backend, and a
real daemon process driven through its Unix socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kimi_syncd import ctl
from kimi_syncd.config import Settings
from kimi_syncd.sim import SimBackend
from kimi_syncd.store import Store

collect_ignore = ["system"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: AF_UNIX socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def settings_for(directory: Path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "store": {"state_dir": directory / "state"},
        "api": {"socket": directory / "api.sock"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings.model_validate(base)


@pytest.fixture
def make_settings(short_dir: Path) -> Callable[..., Settings]:
    def make(**sections: dict[str, Any]) -> Settings:
        return settings_for(short_dir, **sections)

    return make


@pytest.fixture
async def store(make_settings: Callable[..., Settings]) -> AsyncIterator[Store]:
    s = make_settings()
    st = await Store.open(s.store, s.outbox)
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
async def sim() -> AsyncIterator[SimBackend]:
    async with SimBackend(seed=7, rate=None) as backend:
        yield backend


class DaemonProcess:
    """A real `kimi-syncd` process on temporary paths."""

    def __init__(
        self,
        directory: Path,
        upstream: str,
        *,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.socket = directory / "api.sock"
        self.state_dir = directory / "state"
        self.upstream = upstream
        self.config = directory / "config.toml"
        if not self.config.exists():
            self.config.write_text("")
        base = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_SYNCD_")}
        base.pop("NOTIFY_SOCKET", None)
        base.pop("WATCHDOG_USEC", None)
        self.env = {**base, "KIMI_SYNCD_CONFIG": str(self.config), **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "daemon.log"

    def start(self, wait: bool = True) -> DaemonProcess:
        with self.log.open("ab") as log:
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
                    *self.args,
                ],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 10.0) -> ctl.Client:
        return ctl.Client(self.socket, timeout=timeout)

    def get(self, target: str) -> Any:
        status, body = self.client().request("GET", target)
        assert status == 200, (status, body)
        return body

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(ctl.CtlError, OSError):
                if self.client(1.0).request("GET", "/v1/health")[0] in (200, 503):
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.output()}")

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ctl.CtlError, OSError, AssertionError, KeyError):
                if predicate():
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored signal {sig}:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon_factory(short_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(upstream: str, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(short_dir, upstream, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimProcess:
    """The simulated backend in its own process, controlled over HTTP (for daemon tests)."""

    def __init__(
        self,
        directory: Path,
        *,
        rate: float = 0,
        seed: int = 7,
        port: int | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.rate = rate
        self.seed = seed
        self.record = directory / f"sim-{self.port}.jsonl"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> SimProcess:
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
                str(self.seed),
                "--record",
                str(self.record),
                "--log-level",
                "WARNING",
                *self.extra,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.control("stats")
                return self
            time.sleep(0.05)
        raise AssertionError("simulated backend did not start")

    def control(self, path: str, **params: Any) -> Any:
        import json
        import urllib.request
        from urllib.parse import urlencode

        query = f"?{urlencode(params)}" if params else ""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/_sim/{path}{query}", timeout=5
        ) as resp:
            return json.loads(resp.read())

    def received(self) -> list[dict[str, Any]]:
        import json

        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sim_factory(short_dir: Path) -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def make(**kwargs: Any) -> SimProcess:
        s = SimProcess(short_dir, **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
