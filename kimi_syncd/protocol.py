"""Decoding of `/ws` frames and the catalogue of known event types.

Pure: no I/O, no logging. `decode` turns one received WebSocket frame into either an
`Event` (a JSON object with a string ``type``: stored whatever the type) or a `Rejected`
(why it cannot be stored as an event). It never raises.

Every frame type of the Kimi Proxy backend (live, dead and legacy, see
``shared/protocol/kimi-ws-protocol.md``) has a pydantic model in `MODELS`. The models are
strict about the types of the fields they name (``"45"`` is not an ``int``), tolerant about
everything else: unknown keys are kept (``extra="allow"``), values the server echoes without
validation (``enabled``, ``reserved_tokens``, ``session_ids``, ``requestId``, ``threshold``)
accept anything, and only the fields a frame always carries are required.

Secrets are redacted before anything is stored: the value of any key that names a
credential (``api_key``, ``apiKey``, ``x-api-key``, ``Authorization``, ``password``,
``client_secret``, ``access_token``, ``token``, ``bearer`` …, any depth, any case) becomes
``"***"``. Token *counts* (``prompt_tokens``, ``tokens``, ``reserved_tokens`` …) are not
credentials and are left alone. The stored ``text`` is the raw frame unless something was
redacted, then a compact re-dump.

Cost (the daemon decodes every frame; figures from ``bench/micro_decode.py``): frames are
parsed by pydantic-core's Rust parser (``from_json``, ~2.5× faster than ``json``'s C
scanner), with ``json`` as the judge of anything it refuses, so results and rejection
details are ``json``'s. Redaction and the depth limit are one walk over the parsed dicts,
which skips dicts whose keys are all in a cache of harmless keys (a regex over the raw text
measured 3-35 µs per 300-byte frame, more than the parse itself). ``log_metric`` and
``metric_updated``, ~80 % of traffic, skip both the walk and pydantic when plain type checks
derived from their models prove the frame valid and free of unknown keys (`_FAST_CHECKS`);
their model is then built only if ``Event.model`` is read.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Final, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

__all__ = [
    "DEAD_TYPES",
    "KNOWN_TYPES",
    "LEGACY_TYPES",
    "LIVE_TYPES",
    "MODELS",
    "REDACTED",
    "REJECT_REASONS",
    "Event",
    "Rejected",
    "decode",
    "decode_utf8",
    "is_secret_key",
    "redact_excerpt",
]

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_MAX_DEPTH: Final = 64
EXCERPT_CHARS: Final = 200
REDACTED: Final = "***"
REJECT_REASONS: Final = frozenset(
    {"binary", "too_large", "not_utf8", "not_json", "not_object", "no_type", "too_deep"}
)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class _Pending(enum.Enum):
    """`Event._model` of a frame already proven valid whose model is not built yet."""

    PENDING = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One received frame that is a JSON object with a string ``type``.

    ``model`` is the validated pydantic model of a known type's frame, None if the type is
    unknown or the frame failed validation (then ``invalid`` says why). For log_metric and
    metric_updated (`_FAST_TYPES`), decoding mostly proves validity with cheap type checks
    and the model is built on first access: the reducer reads their (validated) ``body``
    instead, and building models was the largest single cost per frame. ``body`` is the
    parsed frame (redacted); treat it as read-only.
    """

    type: str
    session_id: int | None
    session_ids: tuple[int, ...]
    body: dict[str, Any]
    text: str
    known: bool
    invalid: str | None
    _model: BaseModel | _Pending | None = field(repr=False, compare=False)

    @property
    def model(self) -> BaseModel | None:
        model = self._model
        if model is _Pending.PENDING:
            model = _VALIDATORS[self.type](self.body)  # cannot fail: proven valid
            object.__setattr__(self, "_model", model)
        return model


# `Event(...)` without its ``__init__``: a frozen dataclass sets each field through
# ``object.__setattr__``, ~1.7 µs for eight fields here, ~0.9 µs through the slots' own
# descriptors. The instance is the same (and as frozen) as one built by ``__init__``.
_new_object = object.__new__
(_set_type, _set_sid, _set_sids, _set_body, _set_text, _set_known, _set_invalid, _set_model) = (
    Event.__dict__[name].__set__
    for name in ("type", "session_id", "session_ids", "body", "text", "known", "invalid", "_model")
)


def _event(
    etype: str,
    session_id: int | None,
    session_ids: tuple[int, ...],
    body: dict[str, Any],
    text: str,
    known: bool,
    invalid: str | None,
    model: BaseModel | _Pending | None,
) -> Event:
    event: Event = _new_object(Event)
    _set_type(event, etype)
    _set_sid(event, session_id)
    _set_sids(event, session_ids)
    _set_body(event, body)
    _set_text(event, text)
    _set_known(event, known)
    _set_invalid(event, invalid)
    _set_model(event, model)
    return event


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame that cannot be an event; ``reason`` is one of `REJECT_REASONS`."""

    reason: str
    detail: str
    excerpt: str


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class _Obj(BaseModel):
    """Base of every model: strict field types, unknown keys kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Frame(_Obj):
    type: str


# -- shared pieces ---------------------------------------------------------------------


class SessionRow(_Obj):
    """A ``sessions`` row (``SELECT *``); ``max_context`` only in `new_session`."""

    id: int
    name: str
    provider: str
    created_at: str
    model: str | None = None
    external_session_id: str | None = None
    is_active: int | bool | None = None
    reserved_tokens: Any = None  # written unvalidated by POST /api/compaction/{id}/reserved
    compaction_count: int | None = None
    last_compaction_at: str | None = None
    auto_compaction_enabled: Any = None  # 1/0, or whatever toggle-auto echoed into the column
    auto_compaction_threshold: float | None = None
    consecutive_auto_compactions: int | None = None
    max_context: int | None = None


class InitStats(_Obj):
    total_requests: int
    cumulative_input_tokens: int
    cumulative_output_tokens: int
    cumulative_total_tokens: int
    max_tokens: int | None = None
    avg_tokens: float | None = None
    current_input_tokens: int | None = None
    current_output_tokens: int | None = None
    current_total_tokens: int | None = None


class MetricRow(_Obj):
    """A ``metrics`` row as carried by ``init.recent_metrics`` (newest first)."""

    id: int
    session_id: int
    timestamp: str
    estimated_tokens: int
    percentage: float
    content_preview: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    is_estimated: int | bool | None = None
    source: str | None = None
    memory_tokens: int | None = None
    chat_tokens: int | None = None
    memory_ratio: float | None = None


class Alert(_Obj):
    level: str
    color: str | None = None
    message: str | None = None


# -- live types ------------------------------------------------------------------------


class Init(_Frame):
    session: SessionRow
    stats: InitStats
    recent_metrics: list[MetricRow]


class LogMetrics(_Obj):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    context_length: int
    max_context: int
    percentage: float
    tools_tokens: int | None = None
    system_message_tokens: int | None = None


class LogMetric(_Frame):
    source: str
    source_family: str
    source_label: str
    metrics: LogMetrics
    session_id: int
    timestamp: str


class RealTokens(_Obj):
    total: int
    prompt: int
    completion: int
    percentage: float


class MetricUpdated(_Frame):
    metric_id: int
    session_id: int
    real_tokens: RealTokens
    cumulative_tokens: int  # NOT cumulative: the tokens of the session's latest metric row
    cumulative_percentage: float
    alert: Alert | None = None
    source: str | None = None


class StreamingError(_Frame):
    session_id: int
    metric_id: int
    error_type: str
    error_message: str
    timestamp: str


class ProviderContextLimitError(_Frame):
    session_id: int | None = None  # null when no session exists
    error: str
    provider: str
    model: str
    estimated_tokens: int
    max_context: int
    message: str


class NewSession(_Frame):
    session: SessionRow


class SessionActivated(_Frame):
    session_id: int
    session: SessionRow


class SessionsBulkDeleted(_Frame):
    session_ids: list[Any]  # the REST caller's list, echoed: normally ints, strings pass too
    deleted_count: int | None = None


class AutoSessionCreated(_Frame):
    session: SessionRow
    provider: str | None = None
    model: str | None = None
    external_session_id: str | None = None


class AutoSessionToggled(_Frame):
    session_id: int | None = None
    enabled: Any  # echoed unchanged (normally a bool)


class CompactionInfo(_Obj):
    original_tokens: int
    compacted_tokens: int
    tokens_saved: int
    compaction_ratio: float  # a percentage, 0-100
    compacted: bool | None = None  # 11a only
    messages_before: int | None = None  # 11a only
    messages_after: int | None = None  # 11a only
    summarized_count: int | None = None  # 11a only
    trigger_reason: str | None = None  # 11b only ("manual")


class CompactionEvent(_Frame):
    """Both shapes: 11a (persist: timestamp, history_id) and 11b (manual route)."""

    session_id: int
    compaction: CompactionInfo
    timestamp: str | None = None
    history_id: int | None = None


class ReservedTokensUpdated(_Frame):
    session_id: int
    reserved_tokens: Any  # echoed unvalidated (normally an int)


class AutoCompactionToggled(_Frame):
    session_id: int
    enabled: Any  # echoed unvalidated
    timestamp: str | None = None


class CompressionInfo(_Obj):
    compressed: bool
    original_tokens: int | None = None
    compressed_tokens: int | None = None
    tokens_saved: int | None = None
    compression_ratio: float | None = None  # a percentage, 2 decimals
    messages_before: int | None = None
    messages_after: int | None = None


class CompressionEvent(_Frame):
    session_id: int
    compression: CompressionInfo
    timestamp: str | None = None


class ClineUsageUpdated(_Frame):
    latest_count: int
    imported_count: int
    latest_ts: int | float | None = None  # epoch milliseconds
    timestamp: str | None = None


class MemoryPreviewItem(_Obj):
    action: str | None = None
    items: str | None = None
    tokens: int | None = None
    preview: str | None = None


class MemoryCompressResult(_Obj):
    success: bool
    current_count: int | None = None
    projected_count: int | None = None
    space_saved: str | None = None
    preview: list[MemoryPreviewItem] = Field(default_factory=list)
    compression_ratio: float | None = None  # a FRACTION 0-1 here
    error: str | None = None


class MemoryCompressPreviewResponse(_Frame):
    requestId: Any = None  # the client's value, echoed
    result: MemoryCompressResult | None = None
    error: str | None = None


class MemoryCompressResultResponse(MemoryCompressPreviewResponse):
    pass


class MemorySimilarityItem(_Obj):
    id: str | int
    title: str | None = None
    content: str | None = None
    content_preview: str | None = None
    type: str | None = None
    tokens: int | None = None
    created_at: str | None = None
    similarity_score: float | None = None


class MemorySimilarityResult(_Obj):
    success: bool
    results: list[MemorySimilarityItem] = Field(default_factory=list)
    total_found: int | None = None
    method_used: str | None = None
    threshold_used: float | None = None
    error: str | None = None


class MemorySimilarityResultResponse(_Frame):
    requestId: Any = None
    result: MemorySimilarityResult | None = None
    error: str | None = None


class MemoryCompressionCompleted(_Frame):
    strategy: Any  # from the client's message, echoed
    threshold: Any  # idem
    memories_processed: int
    timestamp: str | None = None


# -- dead types ------------------------------------------------------------------------


class SanitizerNotification(_Obj):
    type: str  # model_fallback | context_warning
    level: str | None = None
    message: str | None = None
    old_model: str | None = None
    new_model: str | None = None
    old_context: int | None = None
    new_context: int | None = None
    prompt_tokens: int | None = None
    reason: str | None = None
    current_model: str | None = None
    max_context: int | None = None


class SanitizerEvent(_Frame):
    session_id: int
    event: SanitizerNotification
    timestamp: str | None = None


class AutoMemoryRef(_Obj):
    id: Any = None
    type: str | None = None
    confidence: float | None = None
    reason: str | None = None


class AutoMemoryStored(_Frame):
    session_id: int
    count: int
    memories: list[AutoMemoryRef] = Field(default_factory=list)


# -- legacy types ----------------------------------------------------------------------


class LegacyMetricInfo(_Obj):
    estimated_tokens: int
    percentage: float
    id: int | None = None
    timestamp: str | None = None
    cumulative_tokens: int | None = None
    content_preview: str | None = None
    is_estimated: bool | int | None = None
    source: str | None = None


class LegacyMetric(_Frame):
    session_id: int
    metric: LegacyMetricInfo
    session_updated: bool | None = None
    alert: dict[str, Any] | None = None
    sanitizer: dict[str, Any] | None = None
    mcp_memory: dict[str, Any] | None = None


class MemoryInfo(_Obj):
    memory_tokens: int
    chat_tokens: int
    memory_ratio: float  # a percentage
    total_tokens: int | None = None
    segment_count: int | None = None


class MemoryMetricsUpdate(_Frame):
    session_id: int
    memory: MemoryInfo
    timestamp: str | None = None


class Violation(_Obj):
    violation: bool | None = None
    estimated_tokens: int | None = None
    max_context: int | None = None
    effective_limit: int | None = None
    violation_ratio: float | None = None  # a fraction (1.07 = 7 % over)
    excess_tokens: int | None = None
    recommendations: list[str] = Field(default_factory=list)


class ContextLimitViolation(_Frame):
    violation: Violation
    session_id: int | None = None
    message: str | None = None


class PerformanceMetrics(_Obj):
    session_id: int | None = None
    estimated_tokens: int | None = None
    max_context: int | None = None
    usage_percentage: float | None = None
    system_tokens: int | None = None
    history_tokens: int | None = None
    user_tokens: int | None = None
    mcp_memory_tokens: int | None = None
    timestamp: str | None = None


class PerformanceAlert(_Obj):
    level: str | None = None
    color: str | None = None
    message: str | None = None
    recommendations: list[str] = Field(default_factory=list)
    metrics: PerformanceMetrics | None = None


class ContextPerformanceAlert(_Frame):
    alert: PerformanceAlert
    metrics: PerformanceMetrics | None = None
    session_id: int | None = None
    message: str | None = None


class SessionDeleted(_Frame):
    session_id: int


# -- the catalogue ---------------------------------------------------------------------

_LIVE: dict[str, type[BaseModel]] = {
    "init": Init,
    "log_metric": LogMetric,
    "metric_updated": MetricUpdated,
    "streaming_error": StreamingError,
    "provider_context_limit_error": ProviderContextLimitError,
    "new_session": NewSession,
    "session_activated": SessionActivated,
    "sessions_bulk_deleted": SessionsBulkDeleted,
    "auto_session_created": AutoSessionCreated,
    "auto_session_toggled": AutoSessionToggled,
    "compaction_event": CompactionEvent,
    "reserved_tokens_updated": ReservedTokensUpdated,
    "auto_compaction_toggled": AutoCompactionToggled,
    "compression_event": CompressionEvent,
    "cline_usage_updated": ClineUsageUpdated,
    "memory_compress_preview_response": MemoryCompressPreviewResponse,
    "memory_compress_result_response": MemoryCompressResultResponse,
    "memory_similarity_result_response": MemorySimilarityResultResponse,
    "memory_compression_completed": MemoryCompressionCompleted,
}
_DEAD: dict[str, type[BaseModel]] = {
    "sanitizer_event": SanitizerEvent,
    "auto_memory_stored": AutoMemoryStored,
}
_LEGACY: dict[str, type[BaseModel]] = {
    "metric": LegacyMetric,
    "memory_metrics_update": MemoryMetricsUpdate,
    "context_limit_violation": ContextLimitViolation,
    "context_performance_alert": ContextPerformanceAlert,
    "session_deleted": SessionDeleted,
}

MODELS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType({**_LIVE, **_DEAD, **_LEGACY})
LIVE_TYPES: Final = frozenset(_LIVE)
DEAD_TYPES: Final = frozenset(_DEAD)
LEGACY_TYPES: Final = frozenset(_LEGACY)
KNOWN_TYPES: Final = frozenset(MODELS)

# The models' compiled validators (``model_validate`` minus a little Python overhead).
_VALIDATORS: Final[dict[str, Callable[[Any], BaseModel]]] = {
    name: cls.__pydantic_validator__.validate_python for name, cls in MODELS.items()
}

# Frames whose session id is nested in the session row, not at the top level.
_NESTED_SESSION: Final = frozenset({"init", "new_session", "auto_session_created"})


# --------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------

_SEPARATORS = str.maketrans("", "", "-_. ")
# Compact (lower-case, separators removed) key names that always hold a credential.
_SECRET_EXACT: Final = frozenset(
    {
        "token",
        "bearer",
        "auth",
        "authorization",
        "proxyauthorization",
        "cookie",
        "setcookie",
        "credential",
        "credentials",
    }
)
# ... and compact suffixes (``openai_api_key``, ``client_secret``, ``refreshToken``).
_SECRET_SUFFIXES: Final = (
    "apikey",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "authorization",
    "privatekey",
    "secretkey",
    "credentials",
)
# Names ending in "token" (singular) hold a credential unless their value is a number:
# ``access_token``/``csrf_token`` are secrets, a hypothetical ``max_token: 5`` is a count.
_KIND_SAFE, _KIND_SECRET, _KIND_TOKENISH = 0, 1, 2

# Keys already found harmless: a dict whose keys are all in here needs no look at all.
# Bounded so that a stream of random keys cannot grow it without limit.
_SAFE_KEYS: set[str] = set()
_SAFE_KEYS_MAX: Final = 8192


def _secret_kind(key: str) -> int:
    compact = key.lower().translate(_SEPARATORS)
    if compact in _SECRET_EXACT or compact.endswith(_SECRET_SUFFIXES):
        return _KIND_SECRET
    if compact.endswith("token"):
        return _KIND_TOKENISH
    return _KIND_SAFE


def is_secret_key(key: str) -> bool:
    """Whether the value under ``key`` is redacted (ignoring the numeric-``*token`` rule)."""
    return _secret_kind(key) != _KIND_SAFE


def _must_redact(kind: int, value: Any) -> bool:
    if value is None or value in ("", REDACTED):
        return False
    return not (
        kind == _KIND_TOKENISH and type(value) in (int, float)  # a count, not a credential
    )


_all_safe = _SAFE_KEYS.issuperset
_CONTAINERS: Final = frozenset({dict, list})


def _redact(obj: dict[str, Any]) -> bool:
    """Redact one object's credential values in place; whether anything was redacted."""
    redacted = False
    for key, value in obj.items():
        if key in _SAFE_KEYS:
            continue
        kind = _secret_kind(key)
        if kind == _KIND_SAFE:
            if len(_SAFE_KEYS) < _SAFE_KEYS_MAX:
                _SAFE_KEYS.add(key)
            continue
        if _must_redact(kind, value):
            obj[key] = REDACTED  # same key: no resize while iterating
            redacted = True
    return redacted


def _sweep(body: dict[str, Any], max_depth: int) -> bool | None:
    """Redact credentials in place, at any depth, and measure the nesting on the way.

    Returns whether anything was redacted, or None if containers nest deeper than
    ``max_depth`` (the top-level object is depth 1). Depth is that of the redacted tree: a
    credential's value is replaced before anything under it is looked at.
    """
    redacted = False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(body, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > max_depth:
            return None
        if type(node) is dict:
            if not _all_safe(node) and _redact(node):
                redacted = True
            values: Any = node.values()
        else:
            values = node
        # Most objects and arrays hold only scalars: find that out without a Python loop.
        if _CONTAINERS.isdisjoint(map(type, values)):
            continue
        for value in values:
            if type(value) in _CONTAINERS:
                push((value, depth + 1))
    return redacted


# For excerpts of rejected frames (no parse tree): `"key" : value` pairs in raw text,
# the value possibly cut short by the 200-character limit.
_EXCERPT_PAIR = re.compile(
    r'"((?:[^"\\]|\\.){1,200})"(\s*:\s*)("(?:[^"\\]|\\.)*"?|[^\s,:"{}\[\]]*)', re.DOTALL
)


def _excerpt_pair(m: re.Match[str]) -> str:
    kind = _secret_kind(m.group(1))
    value = m.group(3)
    if kind == _KIND_SAFE or value in ("", "null", '""', f'"{REDACTED}"'):
        return m.group(0)
    if kind == _KIND_TOKENISH and value[:1] in "-0123456789":
        return m.group(0)
    return f'"{m.group(1)}"{m.group(2)}"{REDACTED}"'


def redact_excerpt(text: str) -> str:
    """Redact credential values in raw (possibly truncated, possibly invalid) JSON text."""
    return _EXCERPT_PAIR.sub(_excerpt_pair, text)


# --------------------------------------------------------------------------------------
# Fast validity checks for the hot types
# --------------------------------------------------------------------------------------

# The types that make up ~80 % of traffic. Decoding one of these frames costs a parse plus
# `_FAST_CHECKS` when the check passes, instead of a parse, `_sweep` and a pydantic model.
# Their reducer handlers read ``Event.body``, so that the model is never built in the daemon.
_FAST_TYPES: Final = ("log_metric", "metric_updated")

# What a strict field of each type accepts from JSON, claimed only where pydantic surely
# agrees: a ``float`` field also takes most ints, but not 10**400, so ints are left to it.
_STRICT_SCALARS: Final[dict[Any, type]] = {int: int, float: float, str: str, bool: bool}

FastCheck = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class _Shape:
    """The fields of a model, as far as `_fast_check` needs them."""

    keys: frozenset[str]  # every field name
    required: tuple[str, ...]  # present, not null, of exactly one type
    required_types: tuple[type, ...]  # that type (dict for a nested model)
    required_nested: tuple[tuple[int, _Shape], ...]  # (index in required, shape)
    optional: tuple[tuple[str, frozenset[type]], ...]  # may be absent or null: accepted types
    optional_nested: tuple[tuple[str, _Shape], ...]  # may be absent or null, else an object
    depth: int  # of the deepest object (this one: 1)


def _shape(model: type[BaseModel]) -> _Shape | None:
    """The shape of ``model`` if `_fast_check` can judge it, else None.

    Every field must be either required and not nullable (of one scalar type, or a nested
    model), or optional, nullable and None by default (scalars, or a nested model): not
    ``Any``, not a list, no constraint, alias or validator, and not a credential's name (a
    field name is never redacted, so a passing check must mean "nothing to redact").
    """
    config = model.model_config
    decorators = model.__pydantic_decorators__
    if (
        config.get("strict") is not True
        or config.get("extra") != "allow"
        or config.get("allow_inf_nan", True) is not True
        or decorators.field_validators
        or decorators.model_validators
        or decorators.validators
        or decorators.root_validators
    ):
        return None
    required: list[str] = []
    required_types: list[type] = []
    required_nested: list[tuple[int, _Shape]] = []
    optional: list[tuple[str, frozenset[type]]] = []
    optional_nested: list[tuple[str, _Shape]] = []
    depth = 1
    for name, info in model.model_fields.items():
        if info.alias or info.validation_alias or info.metadata or _secret_kind(name) != _KIND_SAFE:
            return None
        annotation = info.annotation
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
        members = members or (annotation,)
        nullable = NoneType in members
        rest = [m for m in members if m is not NoneType]
        if not (
            (info.is_required() and not nullable)
            or (not info.is_required() and nullable and info.default is None)
        ):
            return None
        sub = None
        if len(rest) == 1 and isinstance(rest[0], type) and issubclass(rest[0], _Obj):
            sub = _shape(rest[0])
            if sub is None:
                return None
            depth = max(depth, sub.depth + 1)
        elif not rest or not all(m in _STRICT_SCALARS for m in rest):
            return None
        if not nullable:
            if sub is not None:
                required_nested.append((len(required), sub))
            elif len(rest) != 1:
                return None
            required.append(name)
            required_types.append(dict if sub is not None else _STRICT_SCALARS[rest[0]])
        elif sub is not None:
            optional_nested.append((name, sub))
        else:
            optional.append((name, frozenset({NoneType, *(_STRICT_SCALARS[m] for m in rest)})))
    return _Shape(
        frozenset(model.model_fields),
        tuple(required),
        tuple(required_types),
        tuple(required_nested),
        tuple(optional),
        tuple(optional_nested),
        depth,
    )


def _fast_check(shape: _Shape) -> tuple[FastCheck, str]:
    """A sound shortcut for validating a JSON object against the model of ``shape``.

    The check returns True only for an object whose keys are all field names (so: nothing to
    redact, and no extra key, which pydantic can refuse) and whose values have exactly the
    types the strict fields take, nested objects included: pydantic accepts such an object.
    False means "not proven": the frame takes the general path (`_sweep`, pydantic).

    It is generated as one straight-line function (like `dataclasses` does ``__init__``):
    a generic loop over the shape cost twice as much per frame (~4.5 vs ~2.5 µs here for
    ``metric_updated``), about as much as pydantic itself. Returns the check and its source
    (kept in `_FAST_CHECK_SOURCE`, for reading).
    """
    lines = ["def check(o0):"]
    namespace: dict[str, Any] = {}
    counter = itertools.count(1)  # o0 is the frame itself

    def emit(sh: _Shape, n: int, indent: str) -> None:
        o, v = f"o{n}", f"v{n}"
        namespace[f"K{n}"] = sh.keys
        namespace[f"T{n}"] = sh.required_types
        lines.append(f"{indent}if not K{n}.issuperset({o}):")
        lines.append(f"{indent}    return False")
        if len(sh.required) == 1:
            get = f"({o}[{sh.required[0]!r}],)"
        else:
            namespace[f"G{n}"] = itemgetter(*sh.required)
            get = f"G{n}({o})"
        lines.append(f"{indent}try:")
        lines.append(f"{indent}    {v} = {get}")
        lines.append(f"{indent}except KeyError:")
        lines.append(f"{indent}    return False")
        lines.append(f"{indent}if tuple(map(type, {v})) != T{n}:")
        lines.append(f"{indent}    return False")
        for i, (name, types) in enumerate(sh.optional):  # absent reads as None: accepted
            namespace[f"O{n}_{i}"] = types
            lines.append(f"{indent}if type({o}.get({name!r})) not in O{n}_{i}:")
            lines.append(f"{indent}    return False")
        for index, sub in sh.required_nested:  # already known to be a dict
            m = next(counter)
            lines.append(f"{indent}o{m} = {v}[{index}]")
            emit(sub, m, indent)
        for name, sub in sh.optional_nested:
            m = next(counter)
            lines.append(f"{indent}o{m} = {o}.get({name!r})")
            lines.append(f"{indent}if o{m} is not None:")
            lines.append(f"{indent}    if type(o{m}) is not dict:")
            lines.append(f"{indent}        return False")
            emit(sub, m, indent + "    ")

    emit(shape, 0, "    ")
    lines.append("    return True")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<protocol._fast_check>", "exec"), namespace)
    check: FastCheck = namespace["check"]
    return check, source


def _fast_checks() -> dict[str, tuple[FastCheck, int, str]]:
    """`_fast_check`, depth and the check's source, for each of `_FAST_TYPES`."""
    checks = {}
    for name in _FAST_TYPES:
        model = MODELS[name]
        shape = _shape(model)
        session_id = model.model_fields.get("session_id")
        # `_decode` reads the session id from the top level: it must be a required int.
        if shape is None or session_id is None or session_id.annotation is not int:
            raise TypeError(f"no fast check for the {name!r} model")  # pragma: no cover
        check, source = _fast_check(shape)
        checks[name] = (check, shape.depth, source)
    return checks


_FAST_BUILT: Final = _fast_checks()
_FAST_CHECKS: Final = {name: (check, depth) for name, (check, depth, _) in _FAST_BUILT.items()}
_FAST_CHECK_SOURCE: Final = {name: source for name, (_, _, source) in _FAST_BUILT.items()}


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _storable(text: str) -> str:
    """``text`` with lone surrogates escaped, so that it encodes to UTF-8 (SQLite, logs)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _str_excerpt(text: str) -> str:
    return redact_excerpt(_storable(text[:EXCERPT_CHARS]))


def _bytes_excerpt(data: bytes | bytearray | memoryview) -> str:
    return redact_excerpt(repr(bytes(data[:EXCERPT_CHARS])))


_JSON_TYPE_NAMES: Final = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors(include_url=False, include_context=False)
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(frame)"
        if err["type"] == "missing":
            parts.append(f"{loc}: missing")
        else:
            parts.append(f"{loc}: {err['msg'].lower()}, got {_json_type(err['input'])}")
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more)")
    return _storable("; ".join(parts))[:500]


# Session ids are SQLite INTEGERs (64-bit): a larger "id" cannot name a real session, and
# could not be stored in the events table's session_id column either.
_ID_MIN, _ID_MAX = -(2**63), 2**63 - 1


def _int_id(value: Any) -> int | None:
    """A session id: a JSON integer (not a boolean) that fits in 64 bits."""
    return value if type(value) is int and _ID_MIN <= value <= _ID_MAX else None


_NUMERIC_ID = re.compile(r"\s*[+-]?[0-9]{1,19}\s*")


def _coerce_ids(raw: Any) -> tuple[int, ...]:
    """``sessions_bulk_deleted.session_ids``: ints and numeric strings, others dropped."""
    if not isinstance(raw, list):
        return ()
    out: dict[int, None] = {}  # ordered, de-duplicated
    for item in raw:
        if type(item) is int:
            value = item
        elif (type(item) is float and item.is_integer()) or (
            isinstance(item, str) and len(item) <= 40 and _NUMERIC_ID.fullmatch(item)
        ):
            value = int(item)
        else:
            continue
        if _ID_MIN <= value <= _ID_MAX:
            out[value] = None
    return tuple(out)


def decode(
    frame: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Event | Rejected:
    """Decode one WebSocket frame (``str``: a text frame, ``bytes``: a binary frame)."""
    try:
        return _decode(frame, max_bytes, max_depth)
    except Exception as exc:  # pragma: no cover - defence in depth: decode never raises
        return Rejected("not_json", f"undecodable frame: {type(exc).__name__}", "")


def decode_utf8(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Event | Rejected:
    """Decode the payload of a *text* frame that arrived as undecoded bytes."""
    if isinstance(data, str):
        return decode(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        if len(data) > max_bytes:
            return Rejected(
                "too_large",
                f"frame is {len(data)} bytes, more than the {max_bytes}-byte limit",
                _bytes_excerpt(data),
            )
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(
                "not_utf8",
                f"invalid UTF-8 at byte {exc.start}: {exc.reason}",
                _bytes_excerpt(data),
            )
    except Exception as exc:  # pragma: no cover - not bytes-like at all
        return Rejected("not_json", f"unsupported frame object {type(exc).__name__}", "")
    return decode(text, max_bytes=max_bytes, max_depth=max_depth)


def _decode(frame: Any, max_bytes: int, max_depth: int) -> Event | Rejected:
    if not isinstance(frame, str):
        if isinstance(frame, (bytes, bytearray, memoryview)):
            return Rejected("binary", f"binary frame of {len(frame)} bytes", _bytes_excerpt(frame))
        return Rejected(
            "not_json", f"unsupported frame object {type(frame).__name__}", _str_excerpt(str(frame))
        )
    text: str = frame

    # The size limit is in UTF-8 bytes, at most 4 per character: a frame of up to a quarter
    # of the limit in characters is within it and needs no encoding to tell (~0.6 µs for a
    # non-ASCII 300-byte frame). Neither does the check for lone surrogates: pydantic-core
    # refuses any text holding one, and then `_size_rejection` runs.
    if len(text) * 4 > max_bytes:
        rejected = _size_rejection(text, max_bytes)
        if rejected is not None:
            return rejected

    # Parse: Rust first; whatever it refuses (invalid JSON, but also lone surrogate escapes
    # and nesting past ~200 levels, which json takes) is judged and worded by json.
    try:
        body = from_json(text)
    except Exception:
        rejected = _size_rejection(text, max_bytes)
        if rejected is not None:
            return rejected
        parsed = _parse_json(text, max_depth)
        if isinstance(parsed, Rejected):
            return parsed
        body = parsed
    if type(body) is not dict:
        return Rejected(
            "not_object",
            f"top-level JSON value is {_json_type(body)}, not an object",
            _str_excerpt(text),
        )

    # The hot types: a passing check proves the frame valid, with nothing to redact and
    # shallow (see `_fast_check`). Anything else goes on to the general path below.
    etype = body.get("type")
    if type(etype) is str:
        fast = _FAST_CHECKS.get(etype)
        if fast is not None and fast[1] <= max_depth and fast[0](body):
            session_id = _int_id(body["session_id"])  # both fast types require one
            return _event(etype, session_id, (), body, text, True, None, _Pending.PENDING)

    redacted = _sweep(body, max_depth)
    if redacted is None:
        return Rejected("too_deep", f"nesting deeper than {max_depth}", _str_excerpt(text))
    if not isinstance(etype, str) or not etype:
        what = "missing" if "type" not in body else f"{_json_type(etype)}, not a non-empty string"
        return Rejected("no_type", f"'type' is {what}", _str_excerpt(text))

    if redacted:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a "\udXXX" escape in the frame: keep it escaped
            text = json.dumps(body, separators=(",", ":"))
    etype = _storable(etype)

    # Session ids.
    session_ids: tuple[int, ...] = ()
    session_id = None
    if etype in _NESTED_SESSION:
        row = body.get("session")
        if isinstance(row, dict):
            session_id = _int_id(row.get("id"))
    if session_id is None:
        session_id = _int_id(body.get("session_id"))
    if etype == "sessions_bulk_deleted":
        session_ids = _coerce_ids(body.get("session_ids"))

    # Validation.
    validate = _VALIDATORS.get(etype)
    if validate is None:
        return _event(etype, session_id, session_ids, body, text, False, None, None)
    try:
        model = validate(body)
    except ValidationError as exc:
        reason = _validation_reason(exc)
        return _event(etype, session_id, session_ids, body, text, True, reason, None)
    except RecursionError:  # pragma: no cover - bounded by max_depth
        reason = "nesting too deep"
        return _event(etype, session_id, session_ids, body, text, True, reason, None)
    return _event(etype, session_id, session_ids, body, text, True, None, model)


def _size_rejection(text: str, max_bytes: int) -> Rejected | None:
    """Too large (in UTF-8 bytes), or not encodable as UTF-8 (a lone surrogate, which no
    valid text frame can hold and SQLite would refuse), or None."""
    size = len(text)
    if size > max_bytes:
        return Rejected(
            "too_large",
            f"frame is at least {size} bytes, more than the {max_bytes}-byte limit",
            _str_excerpt(text),
        )
    if not text.isascii():
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return Rejected(
                "not_utf8",
                f"text holds a lone surrogate at index {exc.start}, not encodable as UTF-8",
                _str_excerpt(text),
            )
        if size > max_bytes:
            return Rejected(
                "too_large",
                f"frame is {size} bytes, more than the {max_bytes}-byte limit",
                _str_excerpt(text),
            )
    return None


# The judge of frames pydantic-core refuses: no object hook (`_sweep` redacts).
_DECODER = json.JSONDecoder()
_scan_once: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _parse_json(text: str, max_depth: int) -> Any:
    """``json``'s parse of ``text``, or the `Rejected` saying why there is none."""
    try:
        try:
            body, end = _scan_once(text, 0)
        except StopIteration:
            body, end = _DECODER.raw_decode(text, len(text) - len(text.lstrip(" \t\n\r")))
        if end != len(text) and text[end:].strip(" \t\n\r"):
            return Rejected(
                "not_json", f"extra data after the JSON value at index {end}", _str_excerpt(text)
            )
    except RecursionError:
        return Rejected(
            "too_deep",
            f"nesting deeper than the parser's recursion limit (max_depth {max_depth})",
            _str_excerpt(text),
        )
    except ValueError as exc:  # JSONDecodeError, and ints of more than 4300 digits
        detail = str(exc)
        if "integer string conversion" in detail or "Exceeds the limit" in detail:
            detail = "an integer has more than 4300 digits (Python's int parsing limit)"
        else:
            detail = f"invalid JSON: {detail}"
        return Rejected("not_json", detail[:300], _str_excerpt(text))
    return body
