"""kimi-syncctl: every subcommand, human and --json, against a real daemon; exit statuses;
the gauge (colours, plain text off a terminal, the down marker, nothing heavy imported)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, SimProcess

from kimi_syncd import ctl

HEAVY = ("aiohttp", "pydantic", "pydantic_core", "websockets", "aiosqlite", "prometheus_client")
ANSI = "\033["


@pytest.fixture(scope="module")
def live() -> Iterator[DaemonProcess]:
    """One daemon with 40 events from the simulated backend, then cut off from it (so that
    queued messages stay pending and can be cancelled)."""
    directory = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    sim = SimProcess(directory, rate=0).start()
    d = DaemonProcess(directory, sim.url)
    try:
        d.start()
        d.wait_for(lambda: d.get("/v1/status")["link"]["state"] == "connected", what="link")
        sim.control("step", n=40)
        d.wait_for(lambda: d.get("/v1/status")["events"]["total"] >= 40, what="40 events")
        sim.control("fault", mode="refuse", status=503)
        sim.control("drop")
        d.wait_for(lambda: d.get("/v1/status")["link"]["state"] != "connected", what="cut off")
        yield d
    finally:
        d.kill()
        sim.stop()
        shutil.rmtree(directory, ignore_errors=True)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(live: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: str, stdin: str | None = None, socket_path: Path | None = None) -> Any:
        capsys.readouterr()
        old = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            code = ctl.main([*argv, "--socket", str(socket_path or live.socket)])
        finally:
            sys.stdin = old
        out, err = capsys.readouterr()
        return code, out, err

    return call


def ctl_process(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kimi_syncd.ctl", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


# -- reading ---------------------------------------------------------------------------------


def test_status(run: Run) -> None:
    code, out, _ = run("status")
    assert code == 0
    for word in ("kimi-syncd", "link", "breaker", "session", "events", "outbox", "database"):
        assert word in out, word
    code, out, _ = run("status", "--json")
    data = json.loads(out)
    assert code == 0 and data["events"]["last_seq"] >= 40 and "breaker" in data["link"]
    # --json before the command works too.
    code, out, _ = run("--json", "status")
    assert code == 0 and json.loads(out)["version"]


def test_sessions_and_session(run: Run, live: DaemonProcess) -> None:
    code, out, _ = run("sessions")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "PROVIDER"]
    assert sum(1 for r in rows if r.startswith("*")) == 1  # the active one
    code, out, _ = run("sessions", "--json")
    sessions = json.loads(out)["sessions"]
    assert code == 0 and sessions
    code, out, _ = run("sessions", "--all", "--json")
    assert len(json.loads(out)["sessions"]) >= len(sessions)
    active = live.get("/v1/sessions/active")
    code, out, _ = run("session")
    assert code == 0 and f"id{' ' * 27}{active['id']}" in out
    code, out, _ = run("session", "active", "--json")
    assert json.loads(out)["id"] == active["id"]
    code, out, _ = run("session", str(sessions[0]["id"]), "--json")
    assert code == 0 and json.loads(out)["id"] == sessions[0]["id"]
    code, _, err = run("session", "987654321")
    assert code == 1 and "HTTP 404" in err and "no_such_session" in err
    code, _, err = run("session", "abc")
    assert code == 2 and "integer" in err


def test_events(run: Run, live: DaemonProcess) -> None:
    code, out, _ = run("events", "--since", "0", "--limit", "5", "--json")
    data = json.loads(out)
    assert code == 0 and [e["seq"] for e in data["events"]] == [1, 2, 3, 4, 5]
    code, out, _ = run("events", "--since", "0", "--limit", "5")
    lines = out.splitlines()
    assert len(lines) == 5 and lines[0].split()[0] == "1"
    some = next(e for e in live.get("/v1/events?kind=event&limit=50")["events"] if e["session_id"])
    code, out, _ = run("events", "--session", str(some["session_id"]), "--json")
    assert {e["session_id"] for e in json.loads(out)["events"]} == {some["session_id"]}
    code, out, _ = run("events", "--type", some["type"], "--json")
    assert {e["type"] for e in json.loads(out)["events"]} == {some["type"]}
    code, out, _ = run("events", "--kind", "link")
    assert code == 0 and "link:connected" in out
    code, _, err = run("events", "--since", "-3")
    assert code == 1 and "bad_parameter" in err


def test_events_follow_streams(live: DaemonProcess) -> None:
    proc = ctl_process("events", "--follow", "--since", "0", "--json", "--socket", str(live.socket))
    try:
        assert proc.stdout is not None
        items = [json.loads(proc.stdout.readline()) for _ in range(10)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert [i["seq"] for i in items] == list(range(1, 11))
    assert proc.returncode == 0  # Ctrl-C is a normal way to stop following
    human = ctl_process("events", "-f", "--since", "38", "--socket", str(live.socket))
    try:
        assert human.stdout is not None
        first = human.stdout.readline().split()
    finally:
        human.kill()
        human.wait(timeout=10)
    assert first[0] == "39"


# -- writing ---------------------------------------------------------------------------------


def test_send_and_queue(run: Run, live: DaemonProcess) -> None:
    message = json.dumps({"type": "memory_compress_preview", "requestId": "ctl-1"})
    code, out, _ = run("send", message)
    assert code == 0 and out.startswith("queued as ")
    first = int(out.split()[2])
    code, out, _ = run("send", "-", "--json", "--ttl", "60", stdin=message)
    second = json.loads(out)
    assert code == 0 and second["state"] == "queued"
    shown = live.get(f"/v1/outbox/{second['id']}")
    assert shown["expires_at"] is not None and shown["body"]["requestId"] == "ctl-1"
    # Idempotency: the same key and body give the same message.
    code, out, _ = run("send", message, "--idempotency-key", "ctl-key", "--json")
    again_code, again, _ = run("send", message, "--idempotency-key", "ctl-key", "--json")
    assert (code, again_code) == (0, 0)
    assert json.loads(out)["id"] == json.loads(again)["id"]
    code, _, err = run("send", '{"type":"other"}', "--idempotency-key", "ctl-key")
    assert code == 1 and "idempotency_conflict" in err
    code, out, _ = run("send", "-", "--batch", stdin='{"type":"a"}\n{"type":"b"}\n')
    assert code == 0 and out.startswith("queued 2 messages")
    code, _, err = run("send", "{not json")
    assert code == 1 and "HTTP 400" in err and "bad_json" in err
    # The queue.
    code, out, _ = run("queue")
    assert code == 0 and out.split()[:3] == ["ID", "STATE", "TRIES"]
    code, out, _ = run("queue", "list", "--state", "pending", "--json")
    pending = [m["id"] for m in json.loads(out)["messages"]]
    assert first in pending and second["id"] in pending
    code, out, _ = run("queue", "show", str(first))
    assert code == 0 and "state" in out and "queued" in out
    code, out, _ = run("queue", "cancel", str(first), "--json")
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    code, _, err = run("queue", "cancel", str(first))
    assert code == 1 and "not_pending" in err
    code, _, err = run("queue", "show", "987654")
    assert code == 1 and "no_such_message" in err
    code, _, err = run("queue", "show")
    assert code == 2 and "needs a message id" in err
    code, out, _ = run("queue", "list", "--state", "cancelled")
    assert code == 0 and str(first) in out.split()


def test_rebuild(run: Run) -> None:
    code, out, _ = run("rebuild")
    assert code == 0 and out.startswith("rebuilt ") and " sessions from " in out
    code, out, _ = run("rebuild", "--json")
    assert json.loads(out)["events_replayed"] >= 40


def test_export(run: Run, live: DaemonProcess, tmp_path: Path) -> None:
    sid = live.get("/v1/status")["active_session_id"]
    expected = [
        e["seq"] for e in live.get(f"/v1/events?session={sid}&kind=event&limit=1000")["events"]
    ]
    assert expected
    target = tmp_path / "s.jsonl"
    code, _, err = run("export", "--session", str(sid), "--format", "jsonl", "-o", str(target))
    assert code == 0 and f"exported {len(expected)} events" in err
    items = [json.loads(line) for line in target.read_text().splitlines()]
    assert [i["seq"] for i in items] == expected and {i["session_id"] for i in items} == {sid}
    code, out, _ = run("export", "--session", str(sid), "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["seq", "received_at", "type", "session_id", "tokens", "percentage", "body"]
    assert [int(r[0]) for r in rows[1:]] == expected
    code, _, _ = run("export", "--session", "987654", "--format", "jsonl")
    assert code == 0
    with pytest.raises(SystemExit) as info:
        run("export", "--format", "csv")  # --session is required
    assert info.value.code == 2


def test_doctor(run: Run, live: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMI_SYNCD_CONFIG", str(live.config))
    code, out, _ = run("doctor", "--json")
    report = json.loads(out)
    checks = {c["check"]: c for c in report["checks"]}
    assert {"config", "socket", "database", "disk", "clock"} <= checks.keys()
    assert checks["socket"]["result"] == "ok" and checks["database"]["result"] == "ok"
    assert code == (0 if report["ok"] else 1)
    code, out, _ = run("doctor")
    assert "] socket: " in out and "] database: " in out
    code, out, _ = run("doctor", socket_path=live.directory / "nothing.sock")
    assert code == 1 and "[FAIL] socket" in out and "start the daemon" in out


# -- exit statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["sessions"],
        ["session", "active"],
        ["events"],
        ["events", "--follow"],
        ["send", '{"type":"a"}'],
        ["queue", "list"],
        ["queue", "cancel", "1"],
        ["rebuild"],
        ["export", "--session", "1"],
    ],
)
def test_daemon_down_is_69_with_help(
    argv: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl.main([*argv, "--socket", str(short_dir / "none.sock")])
    err = capsys.readouterr().err
    assert code == ctl.EXIT_UNAVAILABLE == 69
    assert "daemon not running" in err and "start it with `kimi-syncd`" in err
    assert "KIMI_SYNCD_SOCKET" in err


def test_stale_socket_is_69(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: like a crashed daemon's
    assert ctl.main(["status", "--socket", str(path)]) == 69
    assert "connection refused" in capsys.readouterr().err


@contextlib.contextmanager
def fake_daemon(path: Path, answer: bytes) -> Iterator[None]:
    """A Unix socket server that gives every request the same raw answer."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        server.close()


def _answer(status: str, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    ).encode() + raw


@pytest.mark.parametrize(
    ("answer", "code", "says"),
    [
        (
            _answer("503 Service Unavailable", {"error": {"code": "io_error", "message": "x"}}),
            75,
            "HTTP 503: x (io_error)",
        ),
        (
            _answer("507 Insufficient Storage", {"error": {"code": "disk_full", "message": "y"}}),
            75,
            "HTTP 507",
        ),
        (b"", 75, "malformed answer"),
        (b"garbage\r\n\r\n", 75, "malformed answer"),
        (_answer("404 Not Found", {"error": {"code": "not_found", "message": "z"}}), 1, "HTTP 404"),
        (_answer("403 Forbidden", {"error": {"code": "forbidden", "message": "ask"}}), 1, "ask"),
    ],
)
def test_error_answers_map_to_exit_statuses(
    short_dir: Path, capsys: pytest.CaptureFixture[str], answer: bytes, code: int, says: str
) -> None:
    path = short_dir / "fake.sock"
    with fake_daemon(path, answer):
        assert ctl.main(["status", "--socket", str(path)]) == code
    assert says in capsys.readouterr().err


def test_usage_errors_are_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["no-such-command"], [], ["events", "--since", "x"], ["gauge", "--color", "x"]):
        with pytest.raises(SystemExit) as info:
            ctl.main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def test_follow_that_the_daemon_ends_is_75_with_where_to_resume(
    daemon_factory: Callable[..., DaemonProcess], sim_factory: Callable[..., SimProcess]
) -> None:
    sim = sim_factory(rate=0).start()
    d = daemon_factory(sim.url).start()
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= 1, what="a first record")
    proc = ctl_process("events", "--follow", "--socket", str(d.socket))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.split()[0] == "1"
    assert d.stop() == 0
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == ctl.EXIT_TEMPFAIL == 75
    assert "-- end:" in out and "daemon stopping" in err and "resume with --since " in err
    status = ctl_process("status", "--socket", str(d.socket))
    _, err = status.communicate(timeout=20)
    assert status.returncode == 69 and "daemon not running" in err


# -- the gauge -------------------------------------------------------------------------------


def session(pct: float | None, **extra: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "name": "work",
        "model": "k2",
        "context": {"percentage": pct, "tokens": 1234, "max_context": 262144},
        **extra,
    }


@pytest.mark.parametrize(
    ("pct", "shade"),
    [
        (0.0, ctl.GREEN),
        (79.9, ctl.GREEN),
        (80.0, ctl.YELLOW),
        (89.9, ctl.YELLOW),
        (90.0, ctl.RED),
        (140.0, ctl.RED),
    ],
)
def test_gauge_colours_by_threshold(pct: float, shade: str) -> None:
    text = ctl.gauge_text(session(pct), "kimi {pct:.0f}%", 80, 90, True, "kimi -")
    assert text == f"{shade}kimi {pct:.0f}%{ctl.RESET}"
    assert ctl.gauge_text(session(pct), "kimi {pct:.0f}%", 80, 90, False, "-") == f"kimi {pct:.0f}%"


def test_gauge_text_formats_and_unknowns() -> None:
    fmt = "{name}#{id} {model} {pct:.1f}% {tokens}/{max}"
    assert ctl.gauge_text(session(42.25), fmt, 80, 90, False, "-") == "work#7 k2 42.2% 1234/262144"
    custom = ctl.gauge_text(session(50), "{pct:.0f}", 40, 60, True, "-")
    assert custom.startswith(ctl.YELLOW)  # thresholds are options
    unknown = ctl.gauge_text(session(None), "kimi {pct:.1f}%", 80, 90, True, "-")
    assert unknown == f"{ctl.DIM}kimi ?%{ctl.RESET}"  # no figure: neither green nor red
    assert ctl.gauge_text(None, "kimi {pct}%", 80, 90, True, "kimi -") == "kimi -"
    for bad in ("{nope}", "{pct:d}", "{id.x}", "{", "{0}"):
        with pytest.raises(ctl.CtlError) as info:
            ctl.gauge_text(session(10.5), bad, 80, 90, False, "-")
        assert info.value.exit_code == 2, bad


IMPORT_PROBE = """
import json, sys
from kimi_syncd import ctl
code = ctl.main(sys.argv[1:])
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def gauge(*argv: str) -> tuple[int, str, dict[str, Any]]:
    """Run the gauge in a fresh interpreter; return (status, stdout, import report)."""
    probe = IMPORT_PROBE.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", probe, "gauge", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.returncode, proc.stdout, report


def test_gauge_against_the_daemon_imports_nothing_heavy(live: DaemonProcess) -> None:
    active = live.get("/v1/sessions/active")
    pct = active["context"]["percentage"]
    code, out, report = gauge("--socket", str(live.socket))
    assert code == 0 and report == {"code": 0, "heavy": []}
    assert ANSI not in out  # stdout is a pipe, not a terminal: plain text
    assert out == (f"kimi {pct:.0f}%\n" if pct is not None else "kimi ?%\n")
    code, out, report = gauge(
        "--socket",
        str(live.socket),
        "--color",
        "always",
        "--format",
        "{name}: {pct:.0f}",
        "--warn",
        "0",
        "--crit",
        "1000",
    )
    assert report["heavy"] == []
    name = active["name"] or f"#{active['id']}"
    if pct is None:
        assert out == f"{ctl.DIM}{name}: ?{ctl.RESET}\n"
    else:
        assert out == f"{ctl.YELLOW}{name}: {pct:.0f}{ctl.RESET}\n"


def test_gauge_when_the_daemon_is_down_prints_the_neutral_marker(short_dir: Path) -> None:
    code, out, report = gauge("--socket", str(short_dir / "none.sock"), "--color", "always")
    assert (code, out) == (0, "kimi -\n")
    assert report["heavy"] == []
    code, out, _ = gauge("--socket", str(short_dir / "none.sock"), "--down", "[kimi off]")
    assert (code, out) == (0, "[kimi off]\n")


def test_gauge_does_not_hang_on_a_stuck_daemon(short_dir: Path) -> None:
    path = short_dir / "stuck.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)  # accepts (kernel backlog) but never answers
    try:
        code, out, _ = gauge("--socket", str(path))
    finally:
        server.close()
    assert (code, out) == (0, "kimi -\n")


def test_gauge_with_no_active_session(short_dir: Path) -> None:
    path = short_dir / "fake.sock"
    body = {"error": {"code": "no_active_session", "message": "none"}}
    with fake_daemon(path, _answer("404 Not Found", body)):
        code, out, _ = gauge("--socket", str(path), "--none", "kimi idle")
    assert (code, out) == (0, "kimi idle\n")


def test_importing_ctl_is_light() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import kimi_syncd.ctl"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "kimi_syncd.ctl" in imported
    for name in HEAVY:
        assert not any(m == name or m.startswith(name + ".") for m in imported), name
