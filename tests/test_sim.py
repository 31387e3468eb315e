"""Tests for the simulated backend (kimi_syncd.sim): real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from kimi_syncd.sim import (
    DEFAULT_HOSTILE_KINDS,
    HOSTILE_KINDS,
    Scenario,
    SimBackend,
    hostile_frames,
)

TS_LOCAL = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
TS_DB = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
SESSION_KEYS = [
    "id",
    "name",
    "provider",
    "model",
    "external_session_id",
    "created_at",
    "is_active",
    "reserved_tokens",
    "compaction_count",
    "last_compaction_at",
    "auto_compaction_enabled",
    "auto_compaction_threshold",
    "consecutive_auto_compactions",
]
# Types whose top-level session_id must be a JSON int (provider_context_limit_error and the
# legacy context_limit_violation may carry null).
INT_SESSION_ID = {
    "log_metric",
    "metric_updated",
    "streaming_error",
    "session_activated",
    "auto_session_toggled",
    "compaction_event",
    "reserved_tokens_updated",
    "auto_compaction_toggled",
    "compression_event",
    "metric",
    "memory_metrics_update",
    "context_performance_alert",
    "session_deleted",
    "sanitizer_event",
    "auto_memory_stored",
}
ALL_SCENARIO_TYPES = INT_SESSION_ID | {
    "new_session",
    "auto_session_created",
    "sessions_bulk_deleted",
    "provider_context_limit_error",
    "cline_usage_updated",
    "context_limit_violation",
}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[SimBackend]:
    async with SimBackend(seed=7, ping_interval=None) as backend:
        yield backend


def client(url: str, **kwargs: Any) -> connect:
    kwargs.setdefault("open_timeout", 2)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", None)
    return connect(url, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str)
    frame = json.loads(raw)
    assert isinstance(frame, dict)
    return frame


async def assert_silent(ws: ClientConnection, timeout: float = 0.15) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), timeout)


async def until(predicate: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def http_get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


# -- scenario ---------------------------------------------------------------------------------


def test_scenario_is_deterministic() -> None:
    a, b = Scenario(seed=11), Scenario(seed=11)
    assert a.init_frame() == b.init_frame()
    assert [a.next_frame() for _ in range(500)] == [b.next_frame() for _ in range(500)]


def check_session_row(row: dict[str, Any], *, with_max_context: bool = False) -> None:
    expected = SESSION_KEYS + (["max_context"] if with_max_context else [])
    assert list(row) == expected
    assert is_int(row["id"])
    assert row["is_active"] == 1
    assert TS_DB.match(row["created_at"])
    assert row["last_compaction_at"] is None or TS_DB.match(row["last_compaction_at"])
    assert row["auto_compaction_enabled"] in (0, 1)


def test_init_frame_shape() -> None:
    for seed in range(8):
        scenario = Scenario(seed=seed)
        init = scenario.init_frame()
        assert list(init) == ["type", "session", "stats", "recent_metrics"]
        assert init["type"] == "init"
        check_session_row(init["session"])
        assert init["session"]["id"] == scenario.active_session_id
        rows = init["recent_metrics"]
        assert len(rows) <= 50
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
        for row in rows:
            assert row["session_id"] == init["session"]["id"]
            assert TS_DB.match(row["timestamp"])
            assert row["is_estimated"] in (0, 1) and row["source"] == "proxy"
        stats = init["stats"]
        assert stats["current_total_tokens"] == stats["cumulative_total_tokens"]
        if stats["total_requests"] == 0:
            assert stats["max_tokens"] is None and stats["avg_tokens"] is None
        if stats["total_requests"] <= 50:
            assert stats["total_requests"] == len(rows)


def test_scenario_frames_follow_the_protocol() -> None:
    seen: set[str] = set()
    alerts: set[str] = set()
    compressed: set[bool] = set()
    null_provider_error = False
    for seed in range(4):
        scenario = Scenario(seed=seed)
        known = set(scenario.session_ids)
        active = scenario.active_session_id
        previous: dict[str, Any] | None = None
        for _ in range(4000):
            frame = scenario.next_frame()
            kind = frame["type"]
            assert isinstance(kind, str)
            json.dumps(frame)  # serialisable
            seen.add(kind)
            if kind in INT_SESSION_ID:
                assert is_int(frame["session_id"]), frame
            if kind in ("new_session", "auto_session_created", "session_activated"):
                check_session_row(frame["session"], with_max_context=kind == "new_session")
                active = frame["session"]["id"]
                known.add(active)
                if kind == "session_activated":
                    assert frame["session_id"] == active
            elif kind in ("sessions_bulk_deleted", "session_deleted"):
                ids = frame.get("session_ids", [frame.get("session_id")])
                assert active not in ids
                assert all(is_int(i) and i in known for i in ids)
                known -= set(ids)
                if kind == "sessions_bulk_deleted":
                    assert frame["deleted_count"] == len(ids)
            elif kind in ("log_metric", "metric_updated", "compaction_event", "compression_event"):
                assert frame["session_id"] == active
            if kind == "metric_updated":
                pct = frame["cumulative_percentage"]
                level = (frame["alert"] or {}).get("level")
                expected = (
                    "critical"
                    if pct >= 95
                    else "warning"
                    if pct >= 90
                    else "caution"
                    if pct >= 80
                    else None
                )
                assert level == expected
                if level:
                    alerts.add(level)
                assert set(frame["real_tokens"]) == {"total", "prompt", "completion", "percentage"}
            if kind == "streaming_error":
                assert previous is not None and previous["type"] == "metric_updated"
                assert previous["metric_id"] == frame["metric_id"]
                assert previous["session_id"] == frame["session_id"]
            if kind == "compaction_event":
                assert TS_LOCAL.match(frame["timestamp"]) and is_int(frame["history_id"])
                assert set(frame["compaction"]) == {
                    "compacted",
                    "original_tokens",
                    "compacted_tokens",
                    "tokens_saved",
                    "compaction_ratio",
                    "messages_before",
                    "messages_after",
                    "summarized_count",
                }
            if kind == "compression_event":
                compressed.add(frame["compression"]["compressed"])
            if kind == "provider_context_limit_error":
                assert frame["session_id"] is None or is_int(frame["session_id"])
                null_provider_error |= frame["session_id"] is None
            if kind == "log_metric":
                assert frame["source_family"] in {
                    "kimi_session",
                    "kimi_global",
                    "continue_logs",
                    "continue_compile",
                    "error",
                }
                assert TS_LOCAL.match(frame["timestamp"])
            previous = frame
    assert seen >= ALL_SCENARIO_TYPES, ALL_SCENARIO_TYPES - seen
    assert alerts == {"caution", "warning", "critical"}
    assert compressed == {True, False}
    assert null_provider_error


def test_hostile_frames_cover_all_kinds() -> None:
    frames = hostile_frames(len(DEFAULT_HOSTILE_KINDS), seed=3, oversize=5000)
    assert {f.kind for f in frames} == set(DEFAULT_HOSTILE_KINDS)
    oversized = next(f for f in frames if f.kind == "oversized")
    assert len(oversized.payload) == 5000
    assert hostile_frames(len(HOSTILE_KINDS), seed=3, kinds=HOSTILE_KINDS)[0].kind in HOSTILE_KINDS
    with pytest.raises(ValueError):
        hostile_frames(1, kinds=["nope"])


# -- connection basics ------------------------------------------------------------------------


async def test_init_on_connect(sim: SimBackend) -> None:
    assert sim.url == f"ws://127.0.0.1:{sim.port}/ws"
    async with client(sim.url) as ws:
        init = await recv_json(ws)
        assert init["type"] == "init"
        assert init["session"]["id"] == sim.scenario.active_session_id
        await assert_silent(ws)
    assert sim.stats.accepted == 1 and sim.stats.handshake_attempts == 1


async def test_no_init_without_active_session() -> None:
    async with SimBackend(seed=1, active_session=False) as sim, client(sim.url) as ws:
        await assert_silent(ws)
        await sim.broadcast({"type": "marker"})
        assert (await recv_json(ws))["type"] == "marker"


async def test_step_and_rate_deliver_scenario_frames() -> None:
    async with SimBackend(seed=2, rate=200) as sim, client(sim.url) as ws:
        await recv_json(ws)  # init
        for _ in range(20):
            frame = await recv_json(ws)
            assert isinstance(frame["type"], str)
            if frame["type"] in INT_SESSION_ID:
                assert is_int(frame["session_id"])
        sim.set_rate(None)
        frames = await sim.step(3)
        assert frames


async def test_unknown_path_is_refused(sim: SimBackend) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with client(sim.url.replace("/ws", "/nope")):
            pass
    assert info.value.response.status_code == 403


# -- client messages --------------------------------------------------------------------------


async def test_memory_compress_preview(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        await ws.send(json.dumps({"type": "memory_compress_preview", "requestId": "p-1"}))
        reply = await recv_json(ws)
        assert reply["type"] == "memory_compress_preview_response"
        assert reply["requestId"] == "p-1"
        result = reply["result"]
        assert result["success"] is True
        assert result["space_saved"] == "423 tokens"
        assert result["preview"][0]["action"] == "fusionner"
        assert set(result) == {
            "success",
            "current_count",
            "projected_count",
            "space_saved",
            "preview",
            "compression_ratio",
            "error",
        }
        await ws.send(json.dumps({"type": "memory_compress_preview", "strategy": "semantic"}))
        reply = await recv_json(ws)
        assert reply["requestId"] is None
        assert reply["result"]["preview"][0]["action"] == "regrouper"


async def test_memory_compress_execute_broadcasts_first(sim: SimBackend) -> None:
    async with client(sim.url) as requester, client(sim.url) as other:
        await recv_json(requester)
        await recv_json(other)
        execute = {"type": "memory_compress_execute", "requestId": 9, "threshold": 0.5}
        await requester.send(json.dumps(execute))
        completed = await recv_json(requester)
        assert completed["type"] == "memory_compression_completed"
        assert completed["strategy"] == "token" and completed["threshold"] == 0.5
        assert completed["memories_processed"] == 5
        assert TS_LOCAL.match(completed["timestamp"])
        reply = await recv_json(requester)
        assert reply["type"] == "memory_compress_result_response" and reply["requestId"] == 9
        assert (await recv_json(other))["type"] == "memory_compression_completed"

        # dryRun: no broadcast, only the reply.
        await requester.send(json.dumps({**execute, "dryRun": True, "requestId": "dry"}))
        reply = await recv_json(requester)
        assert reply["type"] == "memory_compress_result_response" and reply["requestId"] == "dry"
        await sim.broadcast({"type": "marker"})
        assert (await recv_json(other))["type"] == "marker"


async def test_memory_similarity_search(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        payload = {"reference_id": "mem_004", "method": "jaccard", "threshold": 0.5}
        await ws.send(
            json.dumps({"type": "memory_similarity_search", "requestId": "s", "payload": payload})
        )
        reply = await recv_json(ws)
        assert reply["type"] == "memory_similarity_result_response" and reply["requestId"] == "s"
        result = reply["result"]
        assert result["success"] is True and result["method_used"] == "jaccard"
        assert result["total_found"] == len(result["results"]) >= 1
        item = result["results"][0]
        assert item["id"] == "mem_004" and item["similarity_score"] == 1.0
        assert list(item) == [
            "id",
            "title",
            "content",
            "content_preview",
            "type",
            "tokens",
            "created_at",
            "similarity_score",
        ]

        # Validation failures: {type, requestId, error} with no result.
        for bad in ({"threshold": 0.2}, {"method": "euclid"}, {"limit": 1000}, "not-an-object"):
            await ws.send(
                json.dumps({"type": "memory_similarity_search", "requestId": "b", "payload": bad})
            )
            reply = await recv_json(ws)
            assert set(reply) == {"type", "requestId", "error"}
            assert reply["requestId"] == "b" and isinstance(reply["error"], str)

        # No reference at all: a result with success false.
        await ws.send(json.dumps({"type": "memory_similarity_search"}))
        reply = await recv_json(ws)
        assert reply["result"]["success"] is False and reply["result"]["error"]


async def test_invalid_and_unknown_messages_are_recorded_without_reply(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        for text in ("{not json", '{"type":"memory_error_log"}', "[1,2]", '{"no":"type"}'):
            await ws.send(text)
        await ws.send(json.dumps({"type": "memory_compress_preview", "requestId": "after"}))
        reply = await recv_json(ws)
        assert reply["requestId"] == "after"  # nothing was answered before it
    assert [r.text for r in sim.received][:4] == [
        "{not json",
        '{"type":"memory_error_log"}',
        "[1,2]",
        '{"no":"type"}',
    ]
    assert sim.stats.messages_received == 5
    assert all(r.conn == sim.received[0].conn for r in sim.received)


async def test_binary_frame_drops_connection_without_close_frame(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        await ws.send(b'{"type":"memory_compress_preview"}')
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), 2)
        assert info.value.rcvd is None  # 1006: no close frame
    assert sim.stats.binary_received == 1
    assert sim.received == []


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404, 429, 503])
async def test_refuse(sim: SimBackend, status: int) -> None:
    sim.set_fault("refuse", status=status, retry_after=7)
    for _ in range(3):
        with pytest.raises(InvalidStatus) as info:
            async with client(sim.url):
                pass
        assert info.value.response.status_code == status
        assert info.value.response.headers["Retry-After"] == "7"
    assert sim.stats.refused == 3 and sim.stats.handshake_attempts == 3
    assert len(sim.stats.handshake_times) == 3 and sim.stats.accepted == 0
    sim.clear_fault()
    async with client(sim.url) as ws:
        assert (await recv_json(ws))["type"] == "init"


@pytest.mark.parametrize("code", [1000, 1011, "abnormal"])
async def test_accept_then_close(sim: SimBackend, code: int | str) -> None:
    sim.set_fault("accept_then_close", delay=0.05, code=code)
    async with client(sim.url) as ws:
        assert (await recv_json(ws))["type"] == "init"
        expected = ConnectionClosedOK if code == 1000 else ConnectionClosedError
        with pytest.raises(expected) as info:
            await asyncio.wait_for(ws.recv(), 2)
        if code == "abnormal":
            assert info.value.rcvd is None
        else:
            assert info.value.rcvd is not None and info.value.rcvd.code == code


async def test_stall_stops_pongs_and_frames_then_resumes(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        sim.set_fault("stall")
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.2)
        await sim.broadcast({"type": "lost"})
        await ws.send(json.dumps({"type": "memory_compress_preview", "requestId": "held"}))

        # A new connection during the stall is accepted but gets nothing, not even init.
        async with client(sim.url) as late:
            await assert_silent(late, 0.1)
            await assert_silent(ws, 0.05)
            assert sim.received == []
            sim.clear_fault()
            await asyncio.wait_for(pong, 2)
            assert (await recv_json(late))["type"] == "init"
        reply = await recv_json(ws)
        assert reply["requestId"] == "held"  # read after the resume, never the "lost" frame


async def test_stall_handshake_hangs_new_connections(sim: SimBackend) -> None:
    sim.set_fault("stall", handshake=True)
    with pytest.raises(TimeoutError):
        async with client(sim.url, open_timeout=0.2):
            pass
    sim.clear_fault()
    async with client(sim.url) as ws:
        assert (await recv_json(ws))["type"] == "init"


async def test_stop_reading_backs_up_client_sends(sim: SimBackend) -> None:
    # No compression: a padded frame would otherwise deflate to almost nothing.
    async with client(sim.url, compression=None) as ws:
        await recv_json(ws)
        sim.set_fault("stop_reading")
        chunk = json.dumps({"type": "filler", "pad": "x" * 256 * 1024})
        sent = 0
        blocked = False
        for _ in range(200):
            try:
                await asyncio.wait_for(ws.send(chunk), 0.2)
            except TimeoutError:
                blocked = True
                break
            sent += 1
        assert blocked, "client sends never backed up"
        assert len(sim.received) <= 1
        # Events still flow to the client.
        await sim.broadcast({"type": "still_sending"})
        assert (await recv_json(ws))["type"] == "still_sending"
        sim.clear_fault()
        await until(lambda: len(sim.received) >= sent, timeout=5)


async def test_malformed_mode_sends_hostile_frames_each_tick() -> None:
    async with SimBackend(seed=3, rate=100) as sim, client(sim.url) as ws:
        await recv_json(ws)
        sim.set_fault("malformed", kinds=["binary", "non_object"], per_tick=1)
        seen_binary = seen_non_object = False
        for _ in range(200):
            raw = await asyncio.wait_for(ws.recv(), 2)
            if isinstance(raw, bytes):
                seen_binary = True
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(value, dict):
                seen_non_object = True
            if seen_binary and seen_non_object:
                break
        assert seen_binary and seen_non_object
        assert sim.stats.hostile_sent >= 2


async def test_send_hostile_and_inject(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        kinds = await sim.send_hostile(len(DEFAULT_HOSTILE_KINDS), seed=5, oversize=4096)
        assert set(kinds) == set(DEFAULT_HOSTILE_KINDS)
        received = [await asyncio.wait_for(ws.recv(), 2) for _ in kinds]
        for kind, raw in zip(kinds, received, strict=True):
            if kind == "binary":
                assert isinstance(raw, bytes)
            elif kind == "oversized":
                assert len(raw) == 4096
        await sim.inject(b"\x00\x01")
        assert await asyncio.wait_for(ws.recv(), 2) == b"\x00\x01"


async def test_oversized_hostile_frame_trips_client_max_size(sim: SimBackend) -> None:
    async with client(sim.url, max_size=64 * 1024) as ws:
        await recv_json(ws)
        await sim.send_hostile(1, kinds=["oversized"], oversize=100_000)
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), 2)


@pytest.mark.parametrize("abnormal", [False, True])
async def test_drop_all(sim: SimBackend, abnormal: bool) -> None:
    async with client(sim.url) as a, client(sim.url) as b:
        await recv_json(a)
        await recv_json(b)
        assert await sim.drop_all(abnormal=abnormal, code=1012) == 2
        for ws in (a, b):
            with pytest.raises(ConnectionClosedError) as info:
                await asyncio.wait_for(ws.recv(), 2)
            if abnormal:
                assert info.value.rcvd is None
            else:
                assert info.value.rcvd is not None and info.value.rcvd.code == 1012
    await until(lambda: sim.stats.open == 0)


# -- blast, recording, restart ----------------------------------------------------------------


@pytest.mark.parametrize("size", [150, 300, 400, 1000])
async def test_blast(sim: SimBackend, size: int) -> None:
    n = 500
    async with client(sim.url) as a, client(sim.url) as b:
        await recv_json(a)
        await recv_json(b)
        assert await sim.blast(n, size=size) == 2 * n
        for ws in (a, b):
            frames = [await recv_json(ws) for _ in range(n)]
            assert len({json.dumps(f) for f in frames}) == n  # all distinct
            lengths = [
                len(json.dumps(f, ensure_ascii=False, separators=(",", ":"))) for f in frames
            ]
            assert 0.4 * size < sum(lengths) / n < 1.6 * size
            await assert_silent(ws, 0.05)


async def test_record_file_survives_restart(tmp_path: Path) -> None:
    record = tmp_path / "received.jsonl"
    sim = SimBackend(seed=4, record_path=record)
    await sim.start()
    url = sim.url
    try:
        async with client(url) as ws:
            await recv_json(ws)
            await ws.send('{"type":"one"}')
            await until(lambda: len(sim.received) == 1)
        await sim.stop()
        await sim.start()
        assert sim.url == url  # same port after a restart
        async with client(url) as ws:
            await recv_json(ws)
            await ws.send('{"type":"two","é":"ü"}')
            await until(lambda: len(sim.received) == 2)
    finally:
        await sim.stop()
    lines = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == ['{"type":"one"}', '{"type":"two","é":"ü"}']
    assert all(set(line) == {"conn", "at", "text"} for line in lines)
    assert lines[0]["conn"] != lines[1]["conn"]
    assert lines[0]["at"] <= lines[1]["at"]


# -- HTTP control -----------------------------------------------------------------------------


async def test_control_endpoints(sim: SimBackend) -> None:
    base = sim.control_url
    status, stats = await http_get(f"{base}/stats")
    assert status == 200 and stats["open"] == 0 and stats["url"] == sim.url

    status, body = await http_get(f"{base}/fault?mode=refuse&status=429&retry_after=3")
    assert status == 200 and body["fault"]["params"] == {"status": 429, "retry_after": 3}
    with pytest.raises(InvalidStatus) as info:
        async with client(sim.url):
            pass
    assert info.value.response.status_code == 429
    assert (await http_get(f"{base}/fault?mode=none"))[1] == {"fault": None}
    assert (await http_get(f"{base}/fault?mode=bogus"))[0] == 400

    async with client(sim.url) as ws:
        await recv_json(ws)
        frame = json.dumps([{"type": "marker", "n": 1}, {"type": "marker", "n": 2}])
        status, body = await http_get(f"{base}/emit?frame={quote(frame)}")
        assert status == 200 and body["sent"] == 2
        assert [(await recv_json(ws))["n"] for _ in range(2)] == [1, 2]

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/emit", params={"raw": "{broken"}) as resp:
                assert resp.status == 200
            assert await asyncio.wait_for(ws.recv(), 2) == "{broken"
            async with session.post(f"{base}/blast", params={"n": "50", "size": "300"}) as resp:
                assert resp.status == 202
        for _ in range(50):
            assert (await recv_json(ws))["type"] == "metric_updated"

        status, body = await http_get(f"{base}/step?n=2")
        assert status == 200 and len(body["frames"]) >= 2
        for _ in body["frames"]:
            await recv_json(ws)

        await ws.send('{"type":"hello"}')
        await ws.send('{"type":"again"}')
        await until(lambda: len(sim.received) == 2)
        status, body = await http_get(f"{base}/received?since=1")
        assert status == 200 and [r["text"] for r in body] == ['{"type":"again"}']

        status, stats = await http_get(f"{base}/stats")
        assert stats["open"] == 1 and stats["messages_received"] == 2 and len(stats["clients"]) == 1

        status, body = await http_get(f"{base}/drop?abnormal=1")
        assert status == 200 and body["dropping"] == 1
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), 2)

    assert (await http_get(f"{base}/nope"))[0] == 404
    # Control requests are not counted as handshake attempts.
    assert sim.stats.handshake_attempts == 2


async def test_control_stall_via_http(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        status, _ = await http_get(f"{sim.control_url}/fault?mode=stall")
        assert status == 200
        await sim.broadcast({"type": "lost"})
        await assert_silent(ws, 0.1)
        await http_get(f"{sim.control_url}/fault")
        await sim.broadcast({"type": "back"})
        assert (await recv_json(ws))["type"] == "back"


async def test_received_endpoint_handles_large_bodies(sim: SimBackend) -> None:
    async with client(sim.url) as ws:
        await recv_json(ws)
        big = json.dumps({"type": "big", "pad": "y" * 300_000})
        for _ in range(3):
            await ws.send(big)
        await until(lambda: len(sim.received) == 3)
    status, body = await http_get(f"{sim.control_url}/received")
    assert status == 200 and len(body) == 3 and body[2]["text"] == big


# -- CLI --------------------------------------------------------------------------------------


async def test_cli_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    record = tmp_path / "cli.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kimi_syncd.sim",
        "--port",
        "0",
        "--rate",
        "0",
        "--seed",
        "1",
        "--record",
        str(record),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
        assert match, line
        async with client(match.group(0)) as ws:
            assert (await recv_json(ws))["type"] == "init"
            await ws.send('{"type":"via-cli"}')
            await until(lambda: record.exists() and "via-cli" in record.read_text())
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
