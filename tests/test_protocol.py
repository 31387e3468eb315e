"""kimi_syncd.protocol: decoding, the event catalogue, redaction, and never raising."""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_syncd import protocol
from kimi_syncd.protocol import (
    DEAD_TYPES,
    KNOWN_TYPES,
    LEGACY_TYPES,
    LIVE_TYPES,
    MODELS,
    REDACTED,
    REJECT_REASONS,
    Event,
    Rejected,
    decode,
    decode_utf8,
    is_secret_key,
)

DATA = Path(__file__).parent / "data" / "examples.jsonl"
SHARED = Path(__file__).parents[2] / "shared/protocol/examples.jsonl"
LINES = DATA.read_text(encoding="utf-8").splitlines()

# line -> (type, session_id, session_ids), as the protocol document describes each frame
EXPECTED: list[tuple[str, int | None, tuple[int, ...]]] = [
    ("init", 42, ()),  # session.id: no top-level session_id
    ("log_metric", 42, ()),
    ("metric_updated", 45, ()),
    ("streaming_error", 45, ()),
    ("provider_context_limit_error", 42, ()),
    ("new_session", 43, ()),  # session.id
    ("session_activated", 41, ()),
    ("sessions_bulk_deleted", None, (37, 38, 40)),
    ("auto_session_created", 44, ()),  # session.id
    ("auto_session_toggled", 44, ()),
    ("compaction_event", 44, ()),  # 11a
    ("compaction_event", 44, ()),  # 11b
    ("reserved_tokens_updated", 44, ()),
    ("auto_compaction_toggled", 44, ()),
    ("compression_event", 44, ()),
    ("cline_usage_updated", None, ()),
    ("memory_compress_preview_response", None, ()),
    ("memory_compress_result_response", None, ()),
    ("memory_similarity_result_response", None, ()),
    ("memory_compression_completed", None, ()),
    ("sanitizer_event", 42, ()),
    ("auto_memory_stored", 42, ()),
    ("metric", 42, ()),
    ("memory_metrics_update", 42, ()),
    ("context_limit_violation", 42, ()),
    ("context_performance_alert", 42, ()),
    ("session_deleted", 39, ()),
]


def ev(frame: str, **kw: Any) -> Event:
    out = decode(frame, **kw)
    assert isinstance(out, Event), out
    return out


def rej(frame: str | bytes, **kw: Any) -> Rejected:
    out = decode(frame, **kw)
    assert isinstance(out, Rejected), out
    return out


def frame(**body: Any) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


# -- the examples --------------------------------------------------------------------------


def test_data_copy_matches_shared_examples() -> None:
    assert len(LINES) == len(EXPECTED) == 27
    if not SHARED.exists():
        pytest.skip("shared/protocol is not next to this checkout")
    assert DATA.read_bytes() == SHARED.read_bytes()


@pytest.mark.parametrize(
    ("line", "expected"), list(zip(LINES, EXPECTED, strict=True)), ids=[e[0] for e in EXPECTED]
)
def test_example_lines(line: str, expected: tuple[str, int | None, tuple[int, ...]]) -> None:
    e = ev(line)
    etype, session_id, session_ids = expected
    assert e.type == etype
    assert e.session_id == session_id
    assert e.session_ids == session_ids
    assert e.known is True
    assert e.invalid is None
    assert isinstance(e.model, MODELS[etype])
    assert e.body == json.loads(line)
    assert e.text is line  # nothing redacted: the raw frame is what gets stored


def test_catalogue() -> None:
    assert len(LIVE_TYPES) == 19
    assert sorted(DEAD_TYPES) == ["auto_memory_stored", "sanitizer_event"]
    assert sorted(LEGACY_TYPES) == [
        "context_limit_violation",
        "context_performance_alert",
        "memory_metrics_update",
        "metric",
        "session_deleted",
    ]
    assert not (LIVE_TYPES & DEAD_TYPES or LIVE_TYPES & LEGACY_TYPES or DEAD_TYPES & LEGACY_TYPES)
    assert KNOWN_TYPES == LIVE_TYPES | DEAD_TYPES | LEGACY_TYPES == set(MODELS)
    assert {e[0] for e in EXPECTED} == KNOWN_TYPES
    for name in ("compaction_alert", "session_updated", "model_fallback", "timeout_error"):
        assert name not in KNOWN_TYPES  # not top-level frames of any server


def test_both_compaction_shapes_validate_into_one_model() -> None:
    a, b = ev(LINES[10]), ev(LINES[11])
    assert type(a.model) is type(b.model) is protocol.CompactionEvent
    assert isinstance(a.model, protocol.CompactionEvent)
    assert isinstance(b.model, protocol.CompactionEvent)
    assert a.model.history_id == 7 and a.model.compaction.compacted is True
    assert b.model.history_id is None and b.model.compaction.trigger_reason == "manual"


# -- rejections ----------------------------------------------------------------------------

DEEP_OK = '{"type":"x","a":' + "[" * 63 + "]" * 63 + "}"  # depth 64 exactly
DEEP_BAD = '{"type":"x","a":' + "[" * 64 + "]" * 64 + "}"  # depth 65

REJECTIONS: list[tuple[str | bytes, str]] = [
    (b'{"type":"init"}', "binary"),
    (b"\x00\x01", "binary"),
    ('{"type":"x","p":"' + "a" * 100 + '"}', "too_large"),
    ('{"type":"x","p":"' + "é" * 40 + '"}', "too_large"),  # 60 characters, 100 bytes
    ('{"type":"\ud800"}', "not_utf8"),  # a lone surrogate no text frame can carry
    ("", "not_json"),
    ("   ", "not_json"),
    ("{", "not_json"),
    ("nope", "not_json"),
    ('{"type":"x",}', "not_json"),
    ('{"type":"x"} {"type":"y"}', "not_json"),
    ('{"type":"x","n":' + "9" * 5000 + "}", "not_json"),  # > 4300 digits: Python refuses
    ("\ufeff{}", "not_json"),
    ("[]", "not_object"),
    ('[{"type":"x"}]', "not_object"),
    ("42", "not_object"),
    ('"init"', "not_object"),
    ("null", "not_object"),
    ("{}", "no_type"),
    ('{"Type":"init"}', "no_type"),
    ('{"type":1}', "no_type"),
    ('{"type":null}', "no_type"),
    ('{"type":""}', "no_type"),
    ('{"type":["init"]}', "no_type"),
    (DEEP_BAD, "too_deep"),
    ('{"type":"x","a":' * 3000 + "1" + "}" * 3000, "too_deep"),  # the parser's own limit
    ("[" * 100_000, "too_deep"),
]


@pytest.mark.parametrize(("raw", "reason"), REJECTIONS)
def test_rejections(raw: str | bytes, reason: str) -> None:
    r = rej(raw, max_bytes=90 if reason == "too_large" else protocol.DEFAULT_MAX_BYTES)
    assert r.reason == reason
    assert r.reason in REJECT_REASONS
    assert r.detail
    assert len(r.excerpt) <= 1000
    r.excerpt.encode("utf-8")  # storable


def test_bytes_like_frames_are_binary() -> None:
    for data in (bytearray(b'{"type":"x"}'), memoryview(b'{"type":"x"}')):
        r = decode(cast(Any, data))
        assert isinstance(r, Rejected) and r.reason == "binary" and "type" in r.excerpt
    odd = decode(cast(Any, 42))  # not a frame at all: still no exception
    assert isinstance(odd, Rejected) and odd.reason == "not_json"


def test_every_rejection_reason_is_exercised() -> None:
    assert {reason for _, reason in REJECTIONS} == REJECT_REASONS


def test_rejection_details_are_specific() -> None:
    assert "4300" in rej('{"type":"x","n":' + "9" * 5000 + "}").detail
    assert "64" in rej(DEEP_BAD).detail
    assert "missing" in rej("{}").detail
    assert "array" in rej("[]").detail
    big = rej('{"type":"x","p":"' + "a" * 300 + '"}', max_bytes=100)
    assert big.excerpt == ('{"type":"x","p":"' + "a" * 300)[:200]


def test_depth_limit_boundary() -> None:
    assert ev(DEEP_OK).type == "x"
    assert rej(DEEP_BAD).reason == "too_deep"
    assert ev(DEEP_BAD, max_depth=65).type == "x"
    # many brackets inside strings: the cheap count says "maybe deep", the walk says no
    assert ev(frame(type="x", s="[" * 500 + "{" * 500)).body["s"].startswith("[[")


def test_decode_utf8() -> None:
    e = decode_utf8(LINES[2].encode("utf-8"))
    assert isinstance(e, Event) and e.type == "metric_updated" and e.text == LINES[2]
    bad = decode_utf8(b'{"type":"\xff"}')
    assert isinstance(bad, Rejected) and bad.reason == "not_utf8" and "byte 9" in bad.detail
    big = decode_utf8(b'{"type":"x"}' + b" " * 100, max_bytes=50)
    assert isinstance(big, Rejected) and big.reason == "too_large"
    inner = decode_utf8(b"[1]")
    assert isinstance(inner, Rejected) and inner.reason == "not_object"


def test_size_limit_counts_utf8_bytes() -> None:
    text = frame(type="x", p="é" * 20)
    size = len(text.encode())
    assert len(text) < size - 1
    assert rej(text, max_bytes=size - 1).reason == "too_large"
    assert ev(text, max_bytes=size).type == "x"


def test_nan_and_infinity_are_accepted_and_survive_a_redump() -> None:
    e = ev('{"type":"x","v":NaN,"w":-Infinity,"api_key":"k"}')
    assert math.isnan(e.body["v"]) and e.body["w"] == -math.inf
    again = ev(e.text)  # the re-dumped text (redaction happened) decodes again
    assert math.isnan(again.body["v"]) and again.body["api_key"] == REDACTED


# -- validation ----------------------------------------------------------------------------

INVALID: list[tuple[str, str, list[str]]] = [
    # (example line index to corrupt, JSON patch as "path=value", fields the reason names)
    ("2", "session_id='45'", ["session_id", "integer", "string"]),
    ("2", "real_tokens.total='lots'", ["real_tokens.total"]),
    ("2", "alert.level=3", ["alert.level"]),
    ("0", "session.id=True", ["session.id"]),
    ("0", "recent_metrics.0.percentage='9%'", ["recent_metrics.0.percentage"]),
    ("0", "stats=None", ["stats"]),
    ("1", "metrics=[]", ["metrics"]),
    ("5", "session.name=7", ["session.name"]),
    ("7", "session_ids='37'", ["session_ids"]),
    ("10", "compaction.compaction_ratio='62%'", ["compaction.compaction_ratio"]),
    ("14", "compression.compressed='yes'", ["compression.compressed"]),
    ("15", "latest_count=1.5", ["latest_count"]),
    ("16", "result.preview=7", ["result.preview"]),
    ("18", "result.results.0.similarity_score='high'", ["result.results.0.similarity_score"]),
    ("20", "event.type=None", ["event.type"]),
    ("22", "metric.estimated_tokens='n'", ["metric.estimated_tokens"]),
    ("26", "session_id=None", ["session_id"]),
]


def _patch(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize(("index", "patch", "words"), INVALID)
def test_wrong_field_types_make_invalid_events_not_rejections(
    index: str, patch: str, words: list[str]
) -> None:
    body = json.loads(LINES[int(index)])
    path, value = patch.split("=", 1)
    _patch(body, path, ast.literal_eval(value))
    e = ev(frame(**body))
    assert e.known is True
    assert e.model is None
    assert e.invalid is not None
    for word in words:
        assert word in e.invalid
    assert e.type == body["type"]
    assert json.loads(e.text) == body  # still stored in full


def test_missing_required_field_is_named() -> None:
    body = json.loads(LINES[2])
    del body["metric_id"]
    e = ev(frame(**body))
    assert e.invalid == "metric_id: missing"
    assert e.session_id == 45  # the id is still extracted for an invalid frame


def test_invalid_reason_is_short_even_with_many_errors() -> None:
    e = ev(frame(type="metric_updated"))
    assert e.invalid is not None and "(+" in e.invalid and len(e.invalid) <= 500


def test_extra_keys_are_kept() -> None:
    body = json.loads(LINES[2])
    body["new_in_v2"] = {"x": 1}
    body["real_tokens"]["cached"] = 12
    e = ev(frame(**body))
    assert e.invalid is None and isinstance(e.model, protocol.MetricUpdated)
    assert e.model.model_extra == {"new_in_v2": {"x": 1}}
    assert e.model.real_tokens.model_extra == {"cached": 12}


@pytest.mark.parametrize(
    "body",
    [
        {"type": "auto_session_toggled", "session_id": 44, "enabled": "yes"},
        {"type": "auto_session_toggled", "session_id": None, "enabled": None},
        {"type": "auto_compaction_toggled", "session_id": 44, "enabled": 0},
        {"type": "reserved_tokens_updated", "session_id": 44, "reserved_tokens": "5000"},
        {"type": "reserved_tokens_updated", "session_id": 44, "reserved_tokens": [1]},
        {"type": "sessions_bulk_deleted", "session_ids": ["37", 38, "x"], "deleted_count": 2},
        {"type": "memory_compression_completed", "strategy": 1, "threshold": "0.3"}
        | {"memories_processed": 5},
        {"type": "memory_compress_preview_response", "requestId": {"any": ["thing"]}}
        | {"error": "boom"},
        {"type": "provider_context_limit_error", "session_id": None, "error": "e"}
        | {"provider": "p", "model": "unknown", "estimated_tokens": 1, "max_context": 2}
        | {"message": "m"},
        {"type": "compression_event", "session_id": 44, "compression": {"compressed": False}},
        {"type": "cline_usage_updated", "latest_ts": None, "latest_count": 0}
        | {"imported_count": 0},
    ],
    ids=lambda b: str(b["type"]),
)
def test_echoed_and_nullable_values_are_tolerated(body: dict[str, Any]) -> None:
    e = ev(frame(**body))
    assert e.invalid is None, e.invalid
    assert e.model is not None


def test_unknown_type_is_stored_not_validated() -> None:
    raw = '{"type":"brand_new_event","session_id":7,"payload":{"x":[1,2]}}'
    e = ev(raw)
    assert (e.type, e.session_id, e.known, e.invalid, e.model) == (
        "brand_new_event",
        7,
        False,
        None,
        None,
    )
    assert e.text is raw and e.body["payload"] == {"x": [1, 2]}


@pytest.mark.parametrize(
    ("body", "session_id"),
    [
        ({"type": "x", "session_id": 5}, 5),
        ({"type": "x", "session_id": True}, None),  # a bool is not an id
        ({"type": "x", "session_id": 5.0}, None),
        ({"type": "x", "session_id": "5"}, None),
        ({"type": "x", "session_id": None}, None),
        ({"type": "x"}, None),
        ({"type": "new_session", "session": {"id": 9}, "session_id": 3}, 9),  # nested wins
        ({"type": "init", "session": {"id": "9"}, "session_id": 3}, 3),
        ({"type": "init", "session": None}, None),
        ({"type": "session_activated", "session_id": 4, "session": {"id": 9}}, 4),
        ({"type": "x", "session": {"id": 9}}, None),  # nested only for the three types
    ],
)
def test_session_id_extraction(body: dict[str, Any], session_id: int | None) -> None:
    assert ev(frame(**body)).session_id == session_id


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([37, 38, 40], (37, 38, 40)),
        (["37", " 38 ", "+39", "-1"], (37, 38, 39, -1)),
        ([1, "1", 1.0, 2.5, True, None, "x", "1e3", "", [3], {"id": 4}], (1,)),
        ("37", ()),
        (None, ()),
        ([], ()),
    ],
)
def test_bulk_deleted_ids_are_coerced(ids: Any, expected: tuple[int, ...]) -> None:
    e = ev(frame(type="sessions_bulk_deleted", session_ids=ids, deleted_count=1))
    assert e.session_ids == expected
    assert e.session_id is None


def test_session_ids_only_for_bulk_deletion() -> None:
    assert ev(frame(type="x", session_ids=[1, 2])).session_ids == ()


# -- redaction -----------------------------------------------------------------------------

SECRET_VALUES = ["sk-live-1", "k2", "k3", "Bearer abc", "Basic zzz", "hunter2", "cs-4"]
SECRET_VALUES += ["at-5", "rt-6", "t-7", "b-8", "s-9", "pw-10", "csrf-11", "nv-12"]


def test_redaction_at_any_depth_and_case() -> None:
    body = {
        "type": "x",
        "session_id": 1,
        "provider": {"info": {"api_key": "sk-live-1", "apiKey": "k2", "X-Api-Key": "k3"}},
        "headers": [{"Authorization": "Bearer abc"}, [{"authorization": "Basic zzz"}]],
        "cfg": {
            "password": "hunter2",
            "client_secret": "cs-4",
            "access_token": "at-5",
            "refreshToken": "rt-6",
            "token": "t-7",
            "bearer": "b-8",
            "SECRET": "s-9",
            "db": {"Passwd": "pw-10"},
            "csrf_token": "csrf-11",
            "NVIDIA_API_KEY": "nv-12",
            "unset_api_key": None,
            "empty_password": "",
        },
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 7,
        "reserved_tokens": 8,
        "tokens": 9,
        "max_tokens": 10,
        "tokens_saved": 11,
        "max_token": 12,
        "key_count": 13,
        "monkey": "banana",
        "note": "my api_key is in the value, not the key",
        "otp": {"token": 123456},  # exactly "token": redacted even when it is a number
    }
    e = ev(frame(**body))
    for secret in SECRET_VALUES:
        assert secret not in e.text
    out = json.loads(e.text)
    assert out == e.body
    assert out["provider"]["info"] == {"api_key": "***", "apiKey": "***", "X-Api-Key": "***"}
    assert out["headers"] == [{"Authorization": "***"}, [{"authorization": "***"}]]
    cfg = out["cfg"]
    assert cfg["db"] == {"Passwd": "***"}
    assert cfg["unset_api_key"] is None and cfg["empty_password"] == ""
    others = {k: v for k, v in cfg.items() if k not in ("db", "unset_api_key", "empty_password")}
    assert set(others.values()) == {REDACTED} and len(others) == 9
    for k in ("prompt_tokens", "completion_tokens", "total_tokens", "reserved_tokens", "tokens"):
        assert out[k] == body[k]
    for k in ("max_tokens", "tokens_saved", "max_token", "key_count", "monkey", "note"):
        assert out[k] == body[k]
    assert out["otp"] == {"token": REDACTED}
    assert e.session_id == 1
    assert ev(e.text).text == e.text  # idempotent: already redacted, nothing more to do


def test_redaction_keeps_known_types_valid_and_text_compact() -> None:
    body = json.loads(LINES[0])
    body["session"]["provider_info"] = {"api_key": "sk-very-secret", "name": "Nvidia é"}
    e = ev(frame(**body))
    assert e.invalid is None and isinstance(e.model, protocol.Init)
    assert "sk-very-secret" not in e.text
    assert "Nvidia é" in e.text  # ensure_ascii=False, like the server
    assert ", " not in e.text[:50] and '": ' not in e.text  # compact separators
    assert e.model.session.model_extra == {"provider_info": {"api_key": "***", "name": "Nvidia é"}}


def test_redaction_sees_through_unicode_escapes() -> None:
    e = ev('{"type":"x","api\\u005fkey":"sk-esc","\\u0074oken":"t"}')
    assert e.body == {"type": "x", "api_key": "***", "token": "***"}
    assert "sk-esc" not in e.text


def test_redaction_with_a_lone_surrogate_escape_stays_storable() -> None:
    e = ev('{"type":"x","s":"\\ud800","password":"p"}')
    e.text.encode("utf-8")
    assert json.loads(e.text) == {"type": "x", "s": "\ud800", "password": "***"}


def test_rejected_excerpts_are_redacted() -> None:
    truncated = '{"type":"x","provider":{"api_key":"sk-leaky-value","n":1'
    r = rej(truncated)
    assert r.reason == "not_json" and "sk-leaky-value" not in r.excerpt
    assert '"api_key":"***"' in r.excerpt
    cut = rej('{"type":"x","Authorization":"Bearer ' + "z" * 300 + '"}', max_bytes=100)
    assert cut.reason == "too_large" and "zzz" not in cut.excerpt
    counts = rej('[{"prompt_tokens":5,"max_token":6,"password":7}]')
    assert '"prompt_tokens":5' in counts.excerpt and '"max_token":6' in counts.excerpt
    assert '"password":"***"' in counts.excerpt
    binary = rej(b'{"type":"x","api_key":"sk-bin-secret"}')
    assert binary.reason == "binary" and "sk-bin-secret" not in binary.excerpt


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("api_key", True),
        ("apiKey", True),
        ("api-key", True),
        ("X-API-KEY", True),
        ("openai_api_key", True),
        ("Authorization", True),
        ("Proxy-Authorization", True),
        ("password", True),
        ("secret", True),
        ("client_secret", True),
        ("access_token", True),
        ("refresh_token", True),
        ("token", True),
        ("bearer", True),
        ("private_key", True),
        ("prompt_tokens", False),
        ("total_tokens", False),
        ("reserved_tokens", False),
        ("tokens", False),
        ("tokens_saved", False),
        ("max_tokens", False),
        ("keyword", False),
        ("session_id", False),
        ("auth_mode", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


# -- never raise -------------------------------------------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(sorted(KNOWN_TYPES))
)
KEYS = st.sampled_from(
    ["type", "session_id", "session", "id", "session_ids", "api_key", "token", "tokens", "x"]
) | st.text(max_size=6)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
    max_leaves=20,
)


def _check(out: Event | Rejected) -> None:
    if isinstance(out, Rejected):
        assert out.reason in REJECT_REASONS
        out.excerpt.encode("utf-8")
        return
    assert out.known == (out.type in KNOWN_TYPES)
    assert (out.model is not None) == (out.known and out.invalid is None)
    assert out.invalid is None or out.known
    out.text.encode("utf-8")
    out.type.encode("utf-8")
    assert out.session_id is None or type(out.session_id) is int


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_text(text: str) -> None:
    _check(decode(text))


@FUZZ
@given(st.text(alphabet=st.sampled_from('{}[]":,\\ udtype0123456789.eE-+ntrlsfaNI\ud800')))
def test_fuzz_json_like_text(text: str) -> None:
    _check(decode(text, max_depth=8))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_bytes(data: bytes) -> None:
    out = decode(data)
    assert isinstance(out, Rejected) and out.reason == "binary"
    _check(decode_utf8(data))


@FUZZ
@given(JSON_VALUES)
def test_fuzz_json_values(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    out = decode(text, max_depth=6)
    _check(out)
    if isinstance(out, Event):
        assert json.loads(out.text) == out.body
        again = decode(out.text, max_depth=6)  # what is stored decodes to the same event
        assert isinstance(again, Event)
        assert (again.type, again.session_id, again.body) == (out.type, out.session_id, out.body)
        assert again.text == out.text


@FUZZ
@given(st.sampled_from(LINES), st.data())
def test_fuzz_example_mutations(line: str, data: st.DataObject) -> None:
    body = json.loads(line)
    keys = list(body)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3)):
        if key != "type":
            body[key] = data.draw(JSON_VALUES)
    _check(decode(json.dumps(body)))


# -- the fast paths (pydantic-core's parser, the hot types' checks, lazy models) ------------
#
# Each must be invisible: the same Event (or Rejected) as the general path would give.

HOT = [line for line in LINES if json.loads(line)["type"] in protocol._FAST_TYPES]
ODD_SCALARS = [None, True, 0, -1, 2**63, 10**30, 80, 1.5, -0.0, math.inf, math.nan, "", "\ud800"]
ODD_OBJECTS = [[], [1], {}, {"a": 1}, {"level": "w"}, {"level": 3}, {"api_key": "sk"}]
ODD_OBJECTS += [{"token": 5}, {"level": "w", "color": None, "x": 1}, {"level": "w", "Api-Key": "s"}]
ODD_VALUES = st.sampled_from([*ODD_SCALARS, *ODD_OBJECTS])
ODD_KEYS = st.sampled_from(["api_key", "x", "max_token", "Authorization", "p-a-s-s", "tokens"])


def _strict_same(a: Any, b: Any) -> bool:
    """Equal, with the same types and key order (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_strict_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_strict_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b) and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


def _view(out: Event | Rejected) -> Any:
    if isinstance(out, Rejected):
        return ("rejected", out.reason, out.detail, out.excerpt)
    model = out.model
    dumped = (type(model).__name__, model.model_dump()) if model is not None else None
    fields = (out.type, out.session_id, out.session_ids, out.body, out.text, out.known)
    return (*fields, out.invalid, dumped)


def _general(text: str, **kw: Any) -> Event | Rejected:
    """`decode` without the hot types' checks (sweep and pydantic for every frame)."""
    with mock.patch.dict(protocol._FAST_CHECKS, clear=True):
        return decode(text, **kw)


def _json_only(text: str, **kw: Any) -> Event | Rejected:
    """`decode` with json's parser only (as before pydantic-core's was tried first)."""
    with mock.patch.object(protocol, "from_json", side_effect=ValueError("off")):
        return decode(text, **kw)


@st.composite
def hot_mutations(draw: st.DrawFn) -> str:
    """A log_metric or metric_updated example with a few values, keys or nestings changed."""
    body = json.loads(draw(st.sampled_from(HOT)))
    for _ in range(draw(st.integers(1, 3))):
        subs = [v for v in body.values() if isinstance(v, dict)]
        target = draw(st.sampled_from([body, *subs]))
        keys = [k for k in target if k != "type"]
        action = draw(st.sampled_from(["set", "drop", "add"] if keys else ["add"]))
        if action == "set":
            target[draw(st.sampled_from(keys))] = copy.deepcopy(draw(ODD_VALUES))
        elif action == "drop":
            del target[draw(st.sampled_from(keys))]
        else:
            target[draw(ODD_KEYS)] = copy.deepcopy(draw(ODD_VALUES))
    return json.dumps(body, ensure_ascii=draw(st.booleans()))


def test_hot_examples_take_the_fast_path_and_build_models_lazily() -> None:
    assert set(protocol._FAST_CHECKS) == {"log_metric", "metric_updated"}
    for line in HOT:
        e = ev(line)
        assert e._model is protocol._Pending.PENDING  # not built by decoding
        assert e == ev(line)  # equality does not depend on whether the model is built
        model = e.model
        assert isinstance(model, MODELS[e.type]) and e.model is model  # built once
        assert e == ev(line)


@FUZZ
@given(hot_mutations(), st.sampled_from([64, 64, 64, 1, 2, 3]))
def test_fast_check_is_sound_and_invisible(text: str, max_depth: int) -> None:
    fast = decode(text, max_depth=max_depth)
    assert _strict_same(_view(fast), _view(_general(text, max_depth=max_depth)))
    body = json.loads(text)
    check, depth = protocol._FAST_CHECKS[body["type"]]
    if check(body):  # proven valid: pydantic agrees, nothing to redact, not deeper than said
        MODELS[body["type"]].model_validate(body)
        assert protocol._sweep(body, depth) is False


def test_fast_check_defers_what_it_cannot_prove() -> None:
    body = json.loads(LINES[2])  # metric_updated
    check, depth = protocol._FAST_CHECKS["metric_updated"]
    assert check(body) and depth == 2  # the frame, and real_tokens or alert in it
    for key, value in [
        ("cumulative_percentage", 90),  # an int in a float field: pydantic decides
        ("new_field", 1),  # an extra key: could need redaction, or fail validation
        ("alert", {"level": "w", "api_key": "k"}),
        ("source", 5),
    ]:
        changed = dict(body, **{key: value})
        assert not check(changed)
    e = ev(frame(**dict(body, cumulative_percentage=90)))
    assert e.invalid is None and isinstance(e.model, protocol.MetricUpdated)
    assert e.model.cumulative_percentage == 90.0
    # Models with fields a type check cannot judge have no shape.
    assert protocol._shape(protocol.ReservedTokensUpdated) is None  # Any
    assert protocol._shape(protocol.Init) is None  # a list of rows
    assert protocol._shape(protocol.MemorySimilarityItem) is None  # required str | int
    shape = protocol._shape(protocol.MetricUpdated)
    assert shape is not None and shape.required_types == (str, int, int, dict, int, float)
    named = {
        *shape.required,
        *(n for n, _ in shape.optional),
        *(n for n, _ in shape.optional_nested),
    }
    assert named == set(protocol.MetricUpdated.model_fields)  # every field judged
    assert "def check(o0):" in protocol._FAST_CHECK_SOURCE["metric_updated"]


def test_hot_frame_with_a_lone_surrogate_is_not_utf8() -> None:
    body = json.loads(LINES[2])
    body["source"] = "a\ud800b"  # raw in the text: no text frame can carry it
    r = rej(json.dumps(body, ensure_ascii=False))
    assert r.reason == "not_utf8" and "lone surrogate" in r.detail
    e = ev(json.dumps(body))  # escaped ("\\ud800"): valid JSON, stored escaped
    assert e.body["source"] == "a\ud800b" and e.invalid is None
    e.text.encode("utf-8")


def test_size_limit_with_and_without_the_quick_bound() -> None:
    text = frame(type="metric_updated", p="é" * 30)  # 30 characters of 2 bytes each
    size = len(text.encode())
    assert ev(text, max_bytes=4 * len(text)).type == "metric_updated"  # bound: no encode
    assert ev(text, max_bytes=size).type == "metric_updated"  # measured: exactly fits
    assert rej(text, max_bytes=size - 1).reason == "too_large"


def test_secret_values_are_redacted_before_depth_is_measured() -> None:
    deep = "[" * 100 + "]" * 100
    e = ev('{"type":"x","api_key":' + deep + ',"token":{"password":"p","n":' + deep + "}}")
    assert e.body == {"type": "x", "api_key": REDACTED, "token": REDACTED}
    assert rej('{"type":"x","note":' + deep + "}").reason == "too_deep"


JSONISH = st.text(alphabet=st.sampled_from('{}[]":,\\ \tudtype0123456789.eE-+ntrlsfaNI\ud800'))
JSON_TEXTS = JSON_VALUES.map(lambda v: json.dumps({"type": "x", "v": v}, ensure_ascii=False))


@FUZZ
@given(JSONISH | JSON_TEXTS | hot_mutations(), st.sampled_from([64, 3]))
def test_pydantic_core_parse_is_invisible(text: str, max_depth: int) -> None:
    a, b = decode(text, max_depth=max_depth), _json_only(text, max_depth=max_depth)
    assert _strict_same(_view(a), _view(b))


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"log_metric","session_id":18446744073709551617}',
        '{"type":"session_deleted","session_id":-9223372036854775809}',
        '{"type":"new_session","session":{"id":9223372036854775808}}',
    ],
)
def test_session_ids_beyond_64_bits_name_no_session(frame: str) -> None:
    event = decode(frame)
    assert isinstance(event, Event)
    assert event.session_id is None  # SQLite could not store it, and no session has it


def test_bulk_deleted_ids_beyond_64_bits_are_dropped() -> None:
    event = decode(
        '{"type":"sessions_bulk_deleted","session_ids":[1,"9999999999999999999",'
        '9223372036854775807,1e300],"deleted_count":2}'
    )
    assert isinstance(event, Event)
    assert event.session_ids == (1, 9223372036854775807)
