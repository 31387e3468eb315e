"""kimi_syncd.systemd against real sockets: sd_notify receivers and passed listening fds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kimi_syncd.systemd import Notifier, listen_fds, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """What systemd does: an AF_UNIX datagram socket with SO_PASSCRED."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(5)

    @property
    def env_value(self) -> str:
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def recv(self) -> tuple[str, int]:
        """One message and the sender's pid from SCM_CREDENTIALS."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pids = [
            UCRED.unpack(cdata[: UCRED.size])[0]
            for level, kind, cdata in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1, ancdata
        return data.decode(), pids[0]

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("\0"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"\0kimi-syncd-test-{uuid.uuid4().hex}"
    rx = Receiver(address)
    yield rx
    rx.close()


def test_messages_and_sender_pid(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    assert notifier.enabled
    cases: list[tuple[Callable[[], bool], str]] = [
        (notifier.ready, "READY=1"),
        (lambda: notifier.ready("serving"), "READY=1\nSTATUS=serving"),
        (lambda: notifier.status("two\nlines"), "STATUS=two lines"),
        (notifier.stopping, "STOPPING=1"),
        (notifier.watchdog, "WATCHDOG=1"),
        (lambda: notifier.extend_timeout(2.5), "EXTEND_TIMEOUT_USEC=2500000"),
        (lambda: notifier.errno(5), "ERRNO=5"),
        (lambda: notifier.send(main_pid=7, barrier=True), "MAIN_PID=7\nBARRIER=1"),
        (lambda: notifier.send_raw("X=1\nY=2"), "X=1\nY=2"),
    ]
    for call, expected in cases:
        assert call() is True
        assert receiver.recv() == (expected, os.getpid())
    notifier.close()


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message, _pid = receiver.recv()
    fields = dict(line.split("=", 1) for line in message.split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_child_process_sends_with_its_own_pid(receiver: Receiver) -> None:
    code = (
        "import os; from kimi_syncd.systemd import Notifier; "
        "print(os.getpid(), flush=True); Notifier.from_env().ready('child')"
    )
    env = {**os.environ, "NOTIFY_SOCKET": receiver.env_value, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    child_pid = int(out.stdout)
    assert child_pid != os.getpid()
    assert receiver.recv() == ("READY=1\nSTATUS=child", child_pid)


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_disabled_is_a_noop(env: dict[str, str]) -> None:
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()


def test_relative_notify_socket_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_vanished_socket_never_raises_and_warns_once(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(tmp_path / "n.sock") if kind == "path" else f"\0kimi-gone-{uuid.uuid4().hex}"
    rx = Receiver(address)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": rx.env_value})
    assert notifier.ready()
    rx.close()
    with caplog.at_level(logging.WARNING, logger="kimi_syncd.systemd"):
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_full_receive_queue_does_not_block(tmp_path: Path) -> None:
    rx = Receiver(str(tmp_path / "full.sock"))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": rx.env_value})
    started = time.monotonic()
    results = [notifier.status("x" * 1000) for _ in range(2000)]  # nobody reads
    assert time.monotonic() - started < 5
    assert results[0] is True
    assert results[-1] is False
    rx.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "30000000"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "soon"}, 10, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": ""}, 10, 0.25),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid=pid) == expected


def test_watchdog_interval_defaults_to_our_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0


# --- listen_fds: in process, for the cases that return before touching any fd ------------


def test_listen_pid_mismatch_returns_nothing_and_unsets() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
    assert listen_fds(env) == {}
    assert env == {}


def test_listen_pid_mismatch_keeps_env_when_asked() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "OTHER": "x"}
    assert listen_fds(env, unset_env=False) == {}
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "OTHER": "x"}


def test_not_activated() -> None:
    assert listen_fds({}) == {}
    assert listen_fds({"LISTEN_FDS": "1"}) == {}


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "one"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api:extra"},
    ],
)
def test_bad_values_warn_and_return_nothing(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert listen_fds(env) == {}
    assert env == {}
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_zero_fds() -> None:
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == {}


# --- listen_fds in a child, where fd numbers are real ------------------------------------

CHILD = r"""
import json, os, socket, sys
from kimi_syncd.systemd import listen_fds
srcs = [int(a) for a in sys.argv[1:]]
for target, src in enumerate(srcs, 3):
    os.dup2(src, target)  # dup2 makes the copy inheritable, like systemd's fds
    os.close(src)
os.environ["LISTEN_PID"] = str(os.getpid())
unset = os.environ.pop("TEST_UNSET", "1") == "1"
got = listen_fds(unset_env=unset)
out = {"env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}, "fds": {}}
for name, socks in got.items():
    out["fds"][name] = [
        [s.fileno(), s.family.name, s.type.name, s.getsockname(), os.get_inheritable(s.fileno())]
        for s in socks
    ]
api = got.get("api", [])
if api:  # prove it is the live listening socket
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(api[0].getsockname())
    conn, _ = api[0].accept()
    client.sendall(b"ping")
    out["echo"] = conn.recv(4).decode()
print(json.dumps(out))
"""


def run_child(fds: list[int], env: dict[str, str]) -> dict[str, object]:
    """Run CHILD with ``fds`` moved to 3, 4, ... and ``env`` added."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, fds)],
        pass_fds=fds,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "api.sock"))
    sock.listen()
    yield sock
    sock.close()


def test_listen_fds_in_child(unix_listener: socket.socket) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with udp:
        result = run_child(
            [unix_listener.fileno(), udp.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "api:"}
        )
        udp_name = list(udp.getsockname())
    assert result["fds"] == {
        "api": [[3, "AF_UNIX", "SOCK_STREAM", unix_listener.getsockname(), False]],
        "unknown": [[4, "AF_INET", "SOCK_DGRAM", udp_name, False]],
    }
    assert result["echo"] == "ping"
    assert result["env"] == {}


def test_listen_fds_without_names_keeps_env_when_asked(unix_listener: socket.socket) -> None:
    result = run_child([unix_listener.fileno()], {"LISTEN_FDS": "1", "TEST_UNSET": "0"})
    assert result["fds"] == {
        "unknown": [[3, "AF_UNIX", "SOCK_STREAM", unix_listener.getsockname(), False]]
    }
    env = result["env"]
    assert isinstance(env, dict)
    assert set(env) == {"LISTEN_FDS", "LISTEN_PID"}


def test_listen_fds_skips_a_fd_that_is_not_a_socket(unix_listener: socket.socket) -> None:
    read_end, write_end = os.pipe()  # what ListenFIFO= would pass
    try:
        result = run_child(
            [unix_listener.fileno(), read_end], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "api:fifo"}
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    fds = result["fds"]
    assert isinstance(fds, dict)
    assert list(fds) == ["api"]
    assert result["echo"] == "ping"


ACTIVATED = r"""
import json, os
from kimi_syncd.systemd import listen_fds
got = listen_fds()
conn, _ = got["api"][0].accept()
conn.sendall(json.dumps({
    "names": sorted(got), "pid": os.getpid(),
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}).encode())
conn.close()
"""


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing"
)
def test_with_systemd_socket_activate(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            "systemd-socket-activate", "-l", str(path), "--fdname=api", "-E", "PYTHONPATH",
            sys.executable, "-c", ACTIVATED,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            data = b""
            while chunk := client.recv(4096):
                data += chunk
        reply = json.loads(data)
        assert reply["names"] == ["api"]
        assert reply["left"] == []
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
