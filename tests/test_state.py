"""kimi_syncd.state: the per-session reducer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_syncd import protocol
from kimi_syncd.protocol import KNOWN_TYPES, Event, decode
from kimi_syncd.state import (
    HANDLERS,
    RECENT_METRICS_MAX,
    SessionState,
    State,
    Touched,
    apply,
    replay,
)

LINES = (Path(__file__).parent / "data" / "examples.jsonl").read_text("utf-8").splitlines()
T0 = 1_780_000_000.0


def ev(body: dict[str, Any] | str) -> Event:
    out = decode(body if isinstance(body, str) else json.dumps(body))
    assert isinstance(out, Event), out
    return out


def example(n: int, **changes: Any) -> dict[str, Any]:
    """Line ``n`` (1-based, as in the protocol document's appendix) as a dict, patched."""
    body: dict[str, Any] = json.loads(LINES[n - 1])
    body.update(changes)
    return body


def run(*bodies: dict[str, Any] | str, state: State | None = None) -> State:
    state = state if state is not None else State()
    start = (state.last_seq or 0) + 1
    for i, body in enumerate(bodies, start):
        apply(state, ev(body), i, T0 + i)
    return state


def jsonrt(value: Any) -> Any:
    """Through JSON as the store does it (and refuse NaN, and lone surrogates)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text.encode("utf-8")
    return json.loads(text)


# -- one example line at a time ------------------------------------------------------------

Check = Callable[[State], None]


def _init(s: State) -> None:
    x = s.sessions[42]
    assert s.active_session_id == 42 and x.active
    assert (x.name, x.provider, x.model) == (
        "Session Nvidia 14:03:27",
        "nvidia",
        "moonshotai/kimi-k2.5",
    )
    assert x.created_at == "2026-05-29 12:03:27" and x.external_session_id is None
    assert (x.reserved_tokens, x.compaction_count, x.last_compaction_at) == (
        0,
        1,
        "2026-05-29 12:40:02",
    )
    assert (x.auto_compaction_enabled, x.auto_compaction_threshold) == (True, 0.85)
    assert x.consecutive_auto_compactions == 0 and x.max_context is None
    assert x.stats is not None
    assert x.stats["total_requests"] == 2 and x.stats["cumulative_total_tokens"] == 72211
    assert x.stats["max_tokens"] == 48210 and x.stats["avg_tokens"] == 36105.5
    assert sorted(x.recent_metrics) == [317, 318]
    assert x.recent_metrics[317]["is_estimated"] is False
    assert x.recent_metrics[318]["is_estimated"] is True
    # the newest row (318, still an estimate) is the session's current size
    assert (x.tokens, x.percentage, x.context_source) == (24001, 9.155654907226562, "init")


def _log_metric(s: State) -> None:
    x = s.sessions[42]
    assert x.name is None and not x.active and s.active_session_id is None  # lazily created
    fam = x.log_metrics["kimi_session"]
    assert fam["count"] == 1 and fam["source"] == "kimi_session_usage"
    assert fam["label"] == "Session Kimi" and fam["timestamp"] == "2026-05-29T14:09:03.511204"
    assert fam["metrics"]["total_tokens"] == 58213
    assert fam["metrics"]["percentage"] == 22.206497192382812
    assert x.tokens is None  # log lines are not the session's context


def _metric_updated(s: State) -> None:
    x = s.sessions[45]
    assert (x.tokens, x.percentage, x.context_source) == (
        118500,
        90.4083251953125,
        "metric_updated",
    )
    assert x.metric_id == 319 and x.cumulative_tokens == 118500
    assert x.real_tokens == {"total": 118500, "prompt": 116210, "completion": 2290} | {
        "percentage": 90.4083251953125
    }
    assert x.alert is not None and x.alert["level"] == "warning" and x.last_alert == x.alert
    assert x.recent_metrics[319]["estimated_tokens"] == 118500
    assert x.recent_metrics[319]["is_estimated"] is False
    assert x.stats is None  # no snapshot to keep up to date


def _streaming_error(s: State) -> None:
    err = s.sessions[45].errors["streaming_error"]
    assert err["count"] == 1 and err["seq"] == 1
    assert err["last"]["error_type"] == "read_error" and err["last"]["metric_id"] == 319


def _provider_error(s: State) -> None:
    x = s.sessions[42]
    err = x.errors["provider_context_limit_error"]
    assert err["count"] == 1 and err["last"]["model"] == "moonshotai/kimi-k2.5"
    assert "270011" in err["last"]["error"]
    assert x.max_context == 262144


def _new_session(s: State) -> None:
    x = s.sessions[43]
    assert s.active_session_id == 43 and x.active and x.name == "Refactoring sprint"
    assert x.max_context == 262144 and x.to_dict()["context"]["max_context"] == 262144
    assert x.stats is not None and x.stats["total_requests"] == 0  # a brand-new session
    assert x.auto_compaction_enabled is True and x.last_compaction_at is None


def _session_activated(s: State) -> None:
    x = s.sessions[41]
    assert s.active_session_id == 41 and x.active and x.name == "Session Kimi Code 11:20:09"
    assert (x.reserved_tokens, x.compaction_count, x.consecutive_auto_compactions) == (5000, 2, 1)
    assert x.stats is None  # activation of an old session says nothing about its metrics


def _bulk_deleted(s: State) -> None:
    assert sorted(s.sessions) == [37, 38, 40]
    for sid in (37, 38, 40):
        x = s.sessions[sid]
        assert (x.deleted, x.deleted_seq, x.deleted_at, x.active) == (True, 1, T0 + 1, False)
        assert x.counters == {"sessions_bulk_deleted": 1}


def _auto_session_created(s: State) -> None:
    x = s.sessions[44]
    assert s.active_session_id == 44 and x.active
    assert x.external_session_id == "cline-task-8f3a" and x.provider == "nvidia"


def _auto_session_toggled(s: State) -> None:
    assert s.auto_session == {"enabled": False, "session_id": 44, "seq": 1}
    assert not s.sessions[44].active


def _compaction_11a(s: State) -> None:
    x = s.sessions[44]
    d = x.to_dict()["compaction"]
    assert (d["count"], d["tokens_saved"], d["last_ratio"]) == (1, 3309, 62.19924812030075)
    assert d["last"]["shape"] == "persist" and d["last"]["history_id"] == 7
    assert d["last"]["messages_after"] == 7 and d["last"]["compacted"] is True


def _compaction_11b(s: State) -> None:
    d = s.sessions[44].to_dict()["compaction"]
    assert (d["count"], d["tokens_saved"]) == (1, 3309)
    assert d["last"]["shape"] == "manual" and d["last"]["trigger_reason"] == "manual"


def _reserved(s: State) -> None:
    x = s.sessions[44]
    assert x.reserved_tokens == 5000 and x.to_dict()["compaction"]["reserved_tokens"] == 5000


def _auto_compaction(s: State) -> None:
    assert s.sessions[44].auto_compaction_enabled is True


def _compression(s: State) -> None:
    d = s.sessions[44].to_dict()["compression"]
    assert (d["count"], d["compressed"], d["tokens_saved"]) == (1, 1, 1150)
    assert d["last"]["compression_ratio"] == 62.5


def _cline(s: State) -> None:
    assert s.sessions == {}
    assert s.cline == {
        "latest_ts": 1780060411000,
        "latest_count": 128,
        "imported_count": 128,
        "timestamp": "2026-05-29T14:20:00.881201",
        "seq": 1,
        "updates": 1,
    }


def _memory(key: str, request_id: str | None, **values: Any) -> Check:
    def check(s: State) -> None:
        assert s.sessions == {}
        rec = s.memory[key]
        assert rec["count"] == 1 and rec["seq"] == 1
        if request_id is not None:
            assert rec["request_id"] == request_id
        for k, v in values.items():
            assert rec[k] == v

    return check


def _sanitizer(s: State) -> None:
    x = s.sessions[42]
    assert x.model == "nvidia/kimi-k2-thinking" and x.max_context == 262144
    assert x.sanitizer is not None and x.sanitizer["last"]["type"] == "model_fallback"


def _auto_memory(s: State) -> None:
    assert s.sessions[42].auto_memory == {"events": 1, "memories": 1, "last_count": 1, "seq": 1}


def _legacy_metric(s: State) -> None:
    x = s.sessions[42]
    assert (x.tokens, x.percentage, x.context_source) == (104211, 39.75334167480469, "metric")


def _memory_metrics(s: State) -> None:
    m = s.sessions[42].memory
    assert m is not None and (m["memory_tokens"], m["memory_ratio"]) == (2150, 6.74)


def _violation(s: State) -> None:
    x = s.sessions[42]
    assert x.errors["context_limit_violation"]["last"]["excess_tokens"] == 17969
    assert x.max_context == 262144


def _performance(s: State) -> None:
    x = s.sessions[42]
    assert x.errors["context_performance_alert"]["last"]["level"] == "warning"
    assert x.max_context == 262144


def _session_deleted(s: State) -> None:
    x = s.sessions[39]
    assert x.deleted and x.deleted_seq == 1 and not x.active


TABLE: list[tuple[Check, set[int]]] = [  # line n -> (check, session ids touched)
    (_init, {42}),
    (_log_metric, {42}),
    (_metric_updated, {45}),
    (_streaming_error, {45}),
    (_provider_error, {42}),
    (_new_session, {43}),
    (_session_activated, {41}),
    (_bulk_deleted, {37, 38, 40}),
    (_auto_session_created, {44}),
    (_auto_session_toggled, {44}),
    (_compaction_11a, {44}),
    (_compaction_11b, {44}),
    (_reserved, {44}),
    (_auto_compaction, {44}),
    (_compression, {44}),
    (_cline, set()),
    (_memory("preview", "compress-preview-1780060455120", projected_count=3), set()),
    (
        _memory("result", "compress-exec-1780060470310", compression_ratio=0.24956822107081175),
        set(),
    ),
    (_memory("similarity", "similarity-1780060490777", result_ids=["mem_004"]), set()),
    (_memory("completed", None, strategy="token", threshold=0.3, memories_processed=5), set()),
    (_sanitizer, {42}),
    (_auto_memory, {42}),
    (_legacy_metric, {42}),
    (_memory_metrics, {42}),
    (_violation, {42}),
    (_performance, {42}),
    (_session_deleted, {39}),
]


@pytest.mark.parametrize(("n", "check", "touched"), [(i + 1, *t) for i, t in enumerate(TABLE)])
def test_each_example_line(n: int, check: Check, touched: set[int]) -> None:
    state = State()
    event = ev(LINES[n - 1])
    result = apply(state, event, 1, T0 + 1)
    assert result == Touched(frozenset(touched), True)
    check(state)
    assert state.counters == {event.type: 1} and state.invalid == {}
    assert (state.first_seq, state.last_seq) == (1, 1)
    assert (state.first_received_at, state.last_received_at) == (T0 + 1, T0 + 1)
    assert state.handler_errors == {}
    for sid in touched:
        x = state.sessions[sid]
        assert x.counters == {event.type: 1}
        assert (x.first_seq, x.last_seq, x.last_received_at) == (1, 1, T0 + 1)
    assert State.load([jsonrt(x.to_dict()) for x in state.sessions.values()], state.global_dict())
    assert state == State.load(
        [jsonrt(x.to_dict()) for x in state.sessions.values()], jsonrt(state.global_dict())
    )


def test_every_known_type_has_a_handler() -> None:
    assert set(HANDLERS) == KNOWN_TYPES


def test_all_examples_in_order() -> None:
    state = run(*LINES)
    assert state.active_session_id == 44  # auto_session_created came last among activations
    assert [sid for sid, x in sorted(state.sessions.items()) if x.active] == [44]
    assert sorted(sid for sid, x in state.sessions.items() if x.deleted) == [37, 38, 39, 40]
    assert sum(state.counters.values()) == 27 and state.counters["compaction_event"] == 2
    assert state.sessions[44].compaction_events == 2
    assert state.sessions[44].compaction_tokens_saved == 2 * 3309


# -- sequences -------------------------------------------------------------------------------


def test_session_lifecycle_sequence() -> None:
    state = run(example(1))  # init: 42 active
    assert state.active_session_id == 42
    state = run(example(6), state=state)  # new_session 43: 42 no longer active
    assert state.active_session_id == 43
    assert not state.sessions[42].active and state.sessions[43].active
    before = state.last_seq or 0
    touched = apply(state, ev(example(7)), before + 1, T0)  # session_activated 41
    assert touched.session_ids == {41, 43}  # the old active row changed too
    assert state.active_session_id == 41
    assert [sid for sid, x in state.sessions.items() if x.active] == [41]

    mu = example(3, session_id=41)  # metric_updated for 41
    state = run(mu, state=state)
    x41 = state.sessions[41]
    assert (x41.tokens, x41.percentage, x41.metric_id) == (118500, 90.4083251953125, 319)

    # bulk delete, ids echoed as a string and an int; the active one survives
    state = run(example(8, session_ids=[42, "43"], deleted_count=2), state=state)
    assert state.sessions[42].deleted and state.sessions[43].deleted
    assert state.sessions[43].deleted_seq == state.last_seq
    assert state.active_session_id == 41 and state.sessions[41].active

    # a deleted session cannot become active again
    state = run(example(7, session_id=43, session={**example(7)["session"], "id": 43}), state=state)
    assert state.active_session_id is None
    assert not any(x.active for x in state.sessions.values())
    assert state.sessions[43].deleted and state.sessions[43].deleted_seq == 5

    # deleting the active session (the server allows it when the ids are strings) clears it
    state = run(example(7), example(8, session_ids=["41"]), state=state)
    assert state.active_session_id is None and not state.sessions[41].active
    assert state.sessions[41].deleted

    # unknown and invalid events only count
    snapshot = {sid: x.to_dict() for sid, x in state.sessions.items()}
    state = run(
        {"type": "from_the_future", "session_id": 41},
        example(3, session_id=41, real_tokens={"total": "lots"}),
        state=state,
    )
    x41 = state.sessions[41]
    assert x41.counters["from_the_future"] == 1 and x41.invalid == {"metric_updated": 1}
    assert x41.counters["metric_updated"] == 2
    assert state.invalid == {"metric_updated": 1} and state.counters["from_the_future"] == 1
    assert x41.tokens == snapshot[41]["context"]["tokens"]
    assert x41.metric_updates == 1


def test_init_snapshot_reconciles_metrics_and_stats() -> None:
    state = run(example(1))
    x = state.sessions[42]
    assert x.stats is not None
    # usage arrives for the estimated row 318: it becomes real, stats follow
    row = {"total": 23000, "prompt": 22000, "completion": 1000, "percentage": 8.7738037109375}
    upd = example(3, session_id=42, metric_id=318, real_tokens=row, cumulative_tokens=23000)
    state = run(upd | {"cumulative_percentage": 8.7738037109375, "alert": None}, state=state)
    assert x.stats["total_requests"] == 2
    assert x.stats["cumulative_input_tokens"] == 70981 - 24001 + 22000
    assert x.stats["cumulative_output_tokens"] == 1230 + 1000
    assert (
        x.stats["cumulative_total_tokens"]
        == x.stats["current_total_tokens"]
        == 70981 - 24001 + 22000 + 2230
    )
    assert x.stats["avg_tokens"] == (48210 + 23000) / 2
    assert x.recent_metrics[318]["is_estimated"] is False
    assert x.recent_metrics[318]["timestamp"] == "2026-05-29 12:07:45"  # kept from the row
    assert (x.tokens, x.alert) == (23000, None)
    assert x.last_alert is None
    # a brand-new row: one more request
    upd2 = upd | {
        "metric_id": 400,
        "real_tokens": {**row, "total": 60000},
        "cumulative_tokens": 60000,
    }
    state = run(upd2, state=state)
    assert x.stats["total_requests"] == 3 and x.stats["max_tokens"] == 60000
    assert x.tokens == 60000
    # after a reconnect the snapshot wins for the totals; rows merge by id
    snap = example(1)
    snap["stats"] = {**snap["stats"], "total_requests": 7, "cumulative_total_tokens": 1}
    snap["recent_metrics"] = [dict(snap["recent_metrics"][0], id=399, estimated_tokens=555)]
    state = run(snap, state=state)
    assert x.stats["total_requests"] == 7 and x.stats["cumulative_total_tokens"] == 1
    assert sorted(x.recent_metrics) == [317, 318, 399, 400]
    assert x.tokens == 60000  # row 400 is still the newest
    assert x.context_source == "init"


def test_recent_metrics_are_bounded() -> None:
    state = run(example(1))
    for mid in range(1000, 1000 + RECENT_METRICS_MAX + 10):
        state = run(example(3, session_id=42, metric_id=mid), state=state)
    x = state.sessions[42]
    assert len(x.recent_metrics) == RECENT_METRICS_MAX
    assert min(x.recent_metrics) == 1010
    assert x.stats is not None and x.stats["total_requests"] == 2 + RECENT_METRICS_MAX + 10


def test_provider_error_without_session_is_global() -> None:
    state = run(example(5, session_id=None))
    assert state.sessions == {}
    assert state.errors["provider_context_limit_error"]["count"] == 1


def test_log_metric_families() -> None:
    frames = [
        example(2, source="continue_compile_chat", source_family="continue_compile"),
        example(2, source="compile_chat", source_family="compile_chat"),
        example(2, source="continue_api_error", source_family="error"),
        example(2, source="api_error", source_family="api_error"),
        example(2, source="kimi_global_auth_error", source_family="kimi_global"),
        example(2, source="mystery", source_family="mystery"),
    ]
    fams = run(*frames).sessions[42].log_metrics
    assert {k: v["count"] for k, v in fams.items()} == {
        "continue_compile": 2,
        "error": 2,
        "kimi_global": 1,
        "mystery": 1,
    }
    assert fams["error"]["source"] == "api_error"


def test_echoed_values_are_coerced() -> None:
    state = run(
        example(13, reserved_tokens="7000"),
        example(14, enabled="false"),
        example(10, enabled=1),
    )
    x = state.sessions[44]
    assert x.reserved_tokens == 7000 and x.auto_compaction_enabled is False
    assert state.auto_session["enabled"] is True
    state = run(example(13, reserved_tokens="lots"), example(14, enabled=[1]), state=state)
    assert x.reserved_tokens is None and x.auto_compaction_enabled is None


def test_to_dict_contract() -> None:
    state = run(*LINES)
    for x in state.sessions.values():
        d = x.to_dict()
        assert type(d["id"]) is int and isinstance(d["active"], bool)
        assert isinstance(d["deleted"], bool)
        assert "name" in d
        assert set(d["context"]) >= {"tokens", "max_context", "percentage"}
        assert jsonrt(d) == d
        assert SessionState.from_dict(jsonrt(d)) == x
    g = state.global_dict()
    assert jsonrt(g) == g and sum(g["counters"].values()) == 27
    assert g["active_session_id"] == 44


def test_weird_values_never_break_serialisation() -> None:
    big = 10**30
    state = run(
        '{"type":"metric_updated","metric_id":1,"session_id":7,"real_tokens":{"total":'
        + str(big)
        + ',"prompt":1,"completion":2,"percentage":NaN},"cumulative_tokens":5,'
        '"cumulative_percentage":Infinity,"alert":{"level":"\\ud800"}}',
        example(17, requestId={"deep": [1.5, None, "\ud83d\ude00", float("inf")]}),
        example(5, error="x" * 100_000, session_id=7),
    )
    x = state.sessions[7]
    assert x.real_tokens == {"total": None, "prompt": 1, "completion": 2, "percentage": None}
    assert x.percentage is None and x.tokens == 5
    assert len(x.errors["provider_context_limit_error"]["last"]["error"]) == 500
    assert state == State.load([jsonrt(x.to_dict())], jsonrt(state.global_dict()))


def test_unknown_types_are_counted_within_bounds() -> None:
    state = State()
    for i in range(400):
        apply(state, ev({"type": f"t{i}"}), i + 1, T0)
    assert len(state.counters) <= 257 and sum(state.counters.values()) == 400


# -- properties ------------------------------------------------------------------------------

SIDS = [1, 2, 3, 4]
EXAMPLES = [json.loads(line) for line in LINES]
UNKNOWN = [
    {"type": "brand_new", "session_id": 1, "x": [1, {"y": 2}]},
    {"type": "compaction_alert", "alert": {"message": "m", "tokens": 1, "percentage": 2.0}},
]
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(["", "1", "x", "\ud800", "é", "true", " 2 "]),
    st.lists(st.integers(0, 3), max_size=2),
)


@st.composite
def mutated(draw: st.DrawFn, value: Any, key: str = "") -> Any:
    """A variant of an example frame: ids drawn from a small set, numbers varied, now and
    then a value replaced by something of another type (making the frame invalid)."""
    if key in ("session_id", "id") and type(value) is int:
        return draw(st.sampled_from(SIDS))
    if key == "metric_id":
        return draw(st.integers(1, 6))
    if key == "session_ids":
        return draw(st.lists(st.sampled_from([*SIDS, "2", " 3 ", "x", 1.0, True]), max_size=3))
    if key in ("enabled", "reserved_tokens", "requestId", "threshold") and draw(st.booleans()):
        return draw(ODD)
    roll = draw(st.integers(0, 99))
    if roll < 2 and key not in ("type", ""):
        return draw(ODD)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k != "type" and draw(st.integers(0, 60)) == 0:
                continue  # a missing field
            out[k] = draw(mutated(v, k))
        return out
    if isinstance(value, list):
        return [draw(mutated(v, key)) for v in value[:3]]
    if type(value) is int and roll < 50:
        return draw(st.integers(0, 300_000))
    if type(value) is float and roll < 50:
        return draw(st.floats(0, 300) | st.sampled_from([float("nan"), 1e308]))
    if type(value) is bool and roll < 50:
        return draw(st.booleans())
    return value


@st.composite
def events(draw: st.DrawFn) -> Event:
    template = draw(st.sampled_from(EXAMPLES + UNKNOWN))
    body = draw(mutated(template))
    out = decode(json.dumps(body))
    assert isinstance(out, Event), out
    return out


def _store(state: State, touched: Touched, rows: dict[int, Any]) -> dict[str, Any]:
    """What the store writer does after each event: upsert touched rows and the global row."""
    for sid in touched.session_ids:
        rows[sid] = jsonrt(state.sessions[sid].to_dict())
    global_: dict[str, Any] = jsonrt(state.global_dict())
    return global_


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), max_size=40), st.data())
def test_incremental_equals_replay_and_survives_restarts(
    evs: list[Event], data: st.DataObject
) -> None:
    log = [(seq, T0 + seq * 0.25, e) for seq, e in enumerate(evs, 1)]

    # incremental, checking after every event that the touched rows were all that changed
    state = State()
    rows: dict[int, Any] = {}
    global_: dict[str, Any] | None = None
    for seq, ts, e in log:
        touched = apply(state, e, seq, ts)
        assert touched.global_changed
        global_ = _store(state, touched, rows)
        assert rows == {sid: jsonrt(x.to_dict()) for sid, x in state.sessions.items()}
        assert sum(1 for x in state.sessions.values() if x.active) == (
            state.active_session_id is not None
        )
        if state.active_session_id is not None:
            assert state.sessions[state.active_session_id].active
            assert not state.sessions[state.active_session_id].deleted
    assert state.handler_errors == {}  # no reducer bug on any valid frame

    # == replay of the whole log
    assert replay(log) == state

    # == what the stored rows load back to
    assert State.load(rows.values(), global_) == state

    # == applying in chunks with a store round trip (a daemon restart) between chunks
    cuts = sorted(data.draw(st.lists(st.integers(0, len(log)), max_size=4)))
    chunked = State()
    rows2: dict[int, Any] = {}
    global2: dict[str, Any] | None = None
    for lo, hi in zip([0, *cuts], [*cuts, len(log)], strict=True):
        chunked = State.load(list(rows2.values()), global2)
        for seq, ts, e in log[lo:hi]:
            global2 = _store(chunked, apply(chunked, e, seq, ts), rows2)
    assert chunked == state
    assert State.load(rows2.values(), global2) == state


# -- the hot types' handlers read the validated body, not the model -------------------------


def test_hot_handlers_do_not_build_models() -> None:
    state = run(example(1))
    for body in (example(2), example(3, session_id=42)):
        e = ev(body)
        apply(state, e, 100, T0)
        assert e._model is protocol._Pending.PENDING  # decoding and reducing: no model
    assert state.sessions[42].log_metrics and state.sessions[42].metric_id == 319


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"alert": None},
        {"source": None},
        {"real_tokens": {"total": 1, "prompt": 2, "completion": 3, "percentage": 7}},  # int
        {"cumulative_percentage": 10**20},  # an int a float field takes (as 1e20)
        {"cumulative_tokens": 2**63},  # beyond int64: not kept
        {"alert": {"level": "x", "api_key": "k", "n": 1}},  # extra keys: via pydantic
        {"extra": [1, {"token": "t"}]},
    ],
)
def test_hot_handlers_agree_with_the_model(changes: dict[str, Any]) -> None:
    """What the handlers read from the body is what the model holds (old handlers read it)."""
    body = example(3, session_id=42, **changes)
    fast = run(example(1), body)
    with mock.patch.dict(protocol._FAST_CHECKS, clear=True):  # every frame through pydantic
        slow = run(example(1), body)
    assert fast.sessions[42].to_dict() == slow.sessions[42].to_dict()
    e = ev(body)
    assert isinstance(e.model, protocol.MetricUpdated)
    x = fast.sessions[42]
    pct = e.model.cumulative_percentage
    assert x.cumulative_percentage == (pct if abs(pct) < 1e300 else None)
    assert type(x.cumulative_percentage) is float
    assert type(x.real_tokens and x.real_tokens["percentage"]) is float


def test_touched_of_one_session_is_shared_and_right() -> None:
    state = State()
    t1 = apply(state, ev(example(3, session_id=42)), 1, T0)
    t2 = apply(state, ev(example(3, session_id=42, metric_id=320)), 2, T0)
    assert t1 == t2 == Touched(frozenset({42})) and t1.global_changed
    assert apply(state, ev(example(16)), 3, T0) == Touched(frozenset())  # no session
