"""The real daemon under systemd's protocols, without systemd as PID 1.

A datagram NOTIFY_SOCKET (path and abstract forms) receives READY/STATUS/WATCHDOG/STOPPING
from the daemon's own pid; the real `systemd-socket-activate` starts the daemon on the first
connection and hands it the listening socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_systemd import Receiver

from kimi_syncd import ctl


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Receiver]:
    if request.param == "path":
        address = str(short_dir / "notify.sock")
    else:
        address = f"\0kimi-syncd-daemon-{uuid.uuid4().hex}"
    rx = Receiver(address)
    yield rx
    rx.close()


def daemon_env(short_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KIMI_SYNCD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))
    }
    config = short_dir / "config.toml"
    config.write_text("")
    env["KIMI_SYNCD_CONFIG"] = str(config)
    env.update(extra)
    return env


def collect(rx: Receiver, until: str, timeout: float = 20) -> list[tuple[str, int]]:
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message, pid = rx.recv()
        except TimeoutError:
            continue
        got.append((message, pid))
        if until in message:
            return got
    raise AssertionError(f"no {until!r} within {timeout} s; got {got}")


def test_notify_ready_status_watchdog_stopping_from_the_daemon_pid(
    notify: Receiver, short_dir: Path
) -> None:
    port = free_port()  # no backend: the STATUS line must say why
    sock = short_dir / "api.sock"
    env = daemon_env(short_dir, NOTIFY_SOCKET=notify.env_value, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kimi_syncd",
            "--upstream",
            f"ws://127.0.0.1:{port}/ws",
            "--state-dir",
            str(short_dir / "state"),
            "--socket",
            str(sock),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        before_ready = collect(notify, "READY=1")
        ready = before_ready[-1][0]
        # READY only once the API answers: the socket exists and serves at that moment.
        assert ctl.Client(sock, timeout=5).request("GET", "/v1/health")[0] == 200
        assert "STATUS=" in ready
        messages = collect(notify, "backoff", timeout=20)
        watchdogs = [m for m, _ in before_ready + messages if m == "WATCHDOG=1"]
        assert watchdogs, "no WATCHDOG=1 within the interval"
        status_lines = [m for m, _ in messages if m.startswith("STATUS=")]
        assert any("connection refused" in m for m in status_lines), status_lines
        proc.send_signal(signal.SIGTERM)
        stopping = collect(notify, "STOPPING=1")
        assert proc.wait(timeout=20) == 0
        pids = {pid for _, pid in before_ready + messages + stopping}
        assert pids == {proc.pid}, "every notification must come from the main pid"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_startup_exits_zero(notify: Receiver, short_dir: Path) -> None:
    env = daemon_env(short_dir, NOTIFY_SOCKET=notify.env_value)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kimi_syncd",
            "--upstream",
            "ws://127.0.0.1:9/ws",
            "--state-dir",
            str(short_dir / "state"),
            "--socket",
            str(short_dir / "api.sock"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # inside interpreter start-up or store opening
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed",
)
def test_socket_activation_with_the_real_tool(short_dir: Path) -> None:
    sock = short_dir / "activated.sock"
    env = daemon_env(short_dir)
    # The tool passes a minimal environment: forward what the daemon needs with -E.
    forwarded = [
        "-E",
        f"KIMI_SYNCD_CONFIG={env['KIMI_SYNCD_CONFIG']}",
        "-E",
        f"PATH={env.get('PATH', '/usr/bin:/bin')}",
        "-E",
        "HOME=/root",
    ]
    tool = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(sock),
            "--fdname=api",
            *forwarded,
            sys.executable,
            "-m",
            "kimi_syncd",
            "--upstream",
            "ws://127.0.0.1:9/ws",
            "--state-dir",
            str(short_dir / "state"),
            "--socket",
            str(short_dir / "unused.sock"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "systemd-socket-activate did not bind"
        # The first connection starts the daemon, which answers on the passed socket.
        status, body = ctl.Client(sock, timeout=30).request("GET", "/v1/status")
        assert status == 200, body
        assert body["version"]
        assert not (short_dir / "unused.sock").exists(), "the passed fd must be used"
        status, body = ctl.Client(sock, timeout=10).request(
            "POST", "/v1/outbox", json.dumps({"type": "memory_compress_preview"}).encode()
        )
        assert status == 202, body
    finally:
        tool.send_signal(signal.SIGTERM)
        try:
            tool.wait(timeout=20)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait()
        with contextlib.suppress(OSError):
            socket.socket(socket.AF_UNIX).close()
