"""The daemon as a process: start, serve, stop cleanly; keep retrying without a backend."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

from conftest import DaemonProcess, SimProcess, free_port


def test_runs_and_retries_politely_without_a_backend(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    port = free_port()  # nothing listens there
    d = daemon_factory(f"ws://127.0.0.1:{port}/ws").start()
    time.sleep(3)
    st = d.get("/v1/status")
    assert st["link"]["state"] in ("backoff", "connecting", "open")
    assert "refused" in (st["link"]["last_error"] or "")
    # Politely: a handful of attempts in 3 s, not a tight loop.
    assert 1 <= st["link"]["attempts"] <= 6, st["link"]
    assert d.stop() == 0
    assert not d.socket.exists()


def test_end_to_end_frames_state_and_outbox(
    daemon_factory: Callable[..., DaemonProcess], sim_factory: Callable[..., SimProcess]
) -> None:
    sim = sim_factory(rate=0).start()
    d = daemon_factory(sim.url).start()
    d.wait_for(lambda: d.get("/v1/status")["link"]["state"] == "connected", what="connected")
    sim.control("step", n=40)
    d.wait_for(lambda: d.get("/v1/status")["events"]["last_seq"] >= 40, what="40 events")
    sessions = d.get("/v1/sessions")["sessions"]
    assert sessions and all(isinstance(s["id"], int) for s in sessions)
    active = d.get("/v1/status")["active_session_id"]
    assert active is not None
    assert d.get("/v1/sessions/active")["id"] == active
    status, body = d.client().request(
        "POST",
        "/v1/outbox",
        json.dumps({"type": "memory_compress_preview", "requestId": "t1"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 202, body
    d.wait_for(lambda: d.get(f"/v1/outbox/{body['id']}")["state"] == "delivered", what="delivery")
    assert any(json.loads(r["text"]).get("requestId") == "t1" for r in sim.received())
    assert d.stop(signal.SIGTERM) == 0


def test_deleted_socket_file_is_bound_again(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(f"ws://127.0.0.1:{free_port()}/ws").start()
    d.socket.unlink()
    d.wait_for(lambda: d.get("/v1/health")["ok"], timeout=15, what="socket bound again")
    assert "binding it again" in d.output()
    assert d.stop() == 0


def test_sighup_reloads_and_a_broken_file_is_refused(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(f"ws://127.0.0.1:{free_port()}/ws")
    d.config.write_text('[log]\nlevel = "INFO"\n[outbox]\nmax_messages = 5\n')
    d.start()
    d.config.write_text('[log]\nlevel = "DEBUG"\n[outbox]\nmax_messages = 1\n')
    d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    d.wait_for(lambda: "configuration reloaded" in d.output(), what="reload")
    body = json.dumps({"type": "memory_compress_preview"}).encode()
    assert d.client().request("POST", "/v1/outbox", body)[0] == 202
    status, err = d.client().request("POST", "/v1/outbox", body)
    assert status == 429, err  # the new bound applies without a restart
    d.config.write_text("[outbox]\nmax_mesages = 3\n")
    d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    d.wait_for(lambda: "reload refused" in d.output(), what="refused reload")
    assert d.get("/v1/health")["ok"]
    assert d.stop() == 0
