"""The per-session reducer: decoded events in, per-session and global state out.

Pure: no I/O. `apply` folds one `Event` into a `State` **in place** (the daemon applies tens
of thousands per second) and returns which session rows changed, so the store can upsert
exactly those in the same transaction as the event. `replay` rebuilds a `State` from the
whole log; applying incrementally, replaying, and applying in chunks with a
`to_dict`/`State.load` round trip between chunks all give equal states (property-tested).

Routing is the dashboard's, for every session instead of only the one in view: each known
type has one handler in `HANDLERS`; unknown types and known types whose body failed
validation only bump counters. Every value kept is JSON-native (str-keyed dicts, lists, str,
int, finite float, bool, None) so that ``to_dict`` → JSON → ``from_dict`` is exact.

Invariant: at most one session is ``active``, and it is ``State.active_session_id``. Nested
records (a log-metric family, an error record, a metric row …) are replaced, never mutated
in place, so a dict returned by ``to_dict`` never changes behind its holder's back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from kimi_syncd import protocol as p
from kimi_syncd.protocol import Event

__all__ = [
    "HANDLERS",
    "RECENT_METRICS_MAX",
    "SessionState",
    "State",
    "Touched",
    "apply",
    "replay",
]

RECENT_METRICS_MAX: Final = 50  # as many rows as `init.recent_metrics` carries
TEXT_MAX: Final = 500  # longest string kept in a record (error bodies are unbounded)
COUNTER_KEYS_MAX: Final = 256  # distinct type names counted before lumping into OTHER
FAMILIES_MAX: Final = 32  # distinct log_metric families kept before lumping into OTHER
OTHER: Final = "<other>"
_INT64: Final = 1 << 63


# --------------------------------------------------------------------------------------
# Value helpers: everything kept is JSON-native and encodable
# --------------------------------------------------------------------------------------


def _int(v: Any) -> int | None:
    """An int within int64 (not a bool), else None."""
    if type(v) is int and -_INT64 <= v < _INT64:
        return v
    return None


def _float(v: Any) -> float | None:
    """A finite number as float (ints within int64 too), else None."""
    t = type(v)
    if t is float:
        return v if math.isfinite(v) else None
    if t is int and -_INT64 <= v < _INT64:
        return float(v)
    return None


def _vfloat(v: Any) -> float | None:
    """`_float` of a validated strict ``float`` field read from ``Event.body``.

    The model holds such a field as a float even when the JSON had an int (which pydantic
    only accepts if it converts), and `_float` keeps ints only within int64.
    """
    return _float(float(v) if type(v) is int else v)


def _str(v: Any, cap: int = TEXT_MAX) -> str | None:
    """A string, capped, with lone surrogates (from "\\udXXX" escapes) made encodable."""
    if type(v) is not str:
        return None
    text: str = v[:cap] if len(v) > cap else v
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _bool(v: Any) -> bool | None:
    """An echoed flag as the server's SQLite column would hold it."""
    if v is None:
        return None
    t = type(v)
    if t is bool:
        return cast(bool, v)
    if t is int:
        return bool(v != 0)
    if t is float:
        return bool(v != 0) if math.isfinite(v) else None
    if t is str:
        s = v.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
    return None


def _coerce_int(v: Any) -> int | None:
    """An echoed number as SQLite's INTEGER affinity would store it: 5000, 5000.0, "5000"."""
    t = type(v)
    if t is int:
        return _int(v)
    if t is float and math.isfinite(v) and v.is_integer():
        return _int(int(v))
    if t is str:
        s = v.strip()
        if 0 < len(s) <= 20 and s.lstrip("+-").isdecimal() and s.isascii():
            try:
                return _int(int(s))
            except ValueError:
                return None
    return None


def _json(v: Any, depth: int = 0) -> Any:
    """A JSON-safe deep copy of an echoed value (non-finite floats → None, strings capped)."""
    t = type(v)
    if v is None or t is bool:
        return v
    if t is int:
        return _int(v)
    if t is float:
        return _float(v)
    if t is str:
        return _str(v)
    if depth >= 8:
        return None
    if t is list:
        return [_json(x, depth + 1) for x in v[:100]]
    if t is dict:
        return {_str(str(k), 100) or "": _json(x, depth + 1) for k, x in list(v.items())[:100]}
    return None


def _bump(counter: dict[str, int], key: str) -> None:
    """Count ``key``, lumping names beyond `COUNTER_KEYS_MAX` distinct ones into `OTHER`."""
    n = counter.get(key)
    if n is None:
        if len(counter) >= COUNTER_KEYS_MAX or len(key) > 100:
            key = OTHER
        n = counter.get(key, 0)
    counter[key] = n + 1


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class SessionState:
    """Everything known about one backend session, derived from the frames only."""

    id: int
    # Identity and the rest of the ``sessions`` row, as last carried by a frame.
    name: str | None = None
    provider: str | None = None
    model: str | None = None
    external_session_id: str | None = None
    created_at: str | None = None  # ts-db: UTC "YYYY-MM-DD HH:MM:SS"
    reserved_tokens: int | None = None
    compaction_count: int | None = None
    last_compaction_at: str | None = None
    auto_compaction_enabled: bool | None = None
    auto_compaction_threshold: float | None = None
    consecutive_auto_compactions: int | None = None
    max_context: int | None = None
    row_seq: int | None = None  # seq of the last frame that carried the row
    # Lifecycle.
    active: bool = False
    deleted: bool = False
    deleted_seq: int | None = None
    deleted_at: float | None = None
    # The context gauge: current tokens and percentage of max_context.
    tokens: int | None = None
    percentage: float | None = None
    context_source: str | None = None  # metric_updated | init | metric
    context_seq: int | None = None
    # Last metric_updated.
    metric_id: int | None = None
    real_tokens: dict[str, Any] | None = None  # {total, prompt, completion, percentage}
    cumulative_tokens: int | None = None  # the latest row's tokens (not cumulative!)
    cumulative_percentage: float | None = None
    alert: dict[str, Any] | None = None  # alert of the last metric_updated (may be None)
    last_alert: dict[str, Any] | None = None  # last non-null alert, with its seq
    metric_updates: int = 0
    # init.stats (snapshot), kept up to date from metric_updated between snapshots.
    stats: dict[str, Any] | None = None
    stats_seq: int | None = None
    recent_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    # log_metric, per source family.
    log_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    # compaction_event (both shapes) and compression_event.
    compaction_events: int = 0
    compaction_tokens_saved: int = 0
    compaction_last: dict[str, Any] | None = None
    compression_events: int = 0
    compression_compressed: int = 0
    compression_tokens_saved: int = 0
    compression_last: dict[str, Any] | None = None
    # streaming_error, provider_context_limit_error, legacy violations/alerts:
    # type -> {count, last, seq}.
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Legacy memory_metrics_update, dead auto_memory_stored and sanitizer_event.
    memory: dict[str, Any] | None = None
    auto_memory: dict[str, Any] | None = None
    sanitizer: dict[str, Any] | None = None
    # Bookkeeping.
    counters: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    first_seq: int | None = None
    last_seq: int | None = None
    first_received_at: float | None = None
    last_received_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able row the store keeps and the API serves."""
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "external_session_id": self.external_session_id,
            "created_at": self.created_at,
            "reserved_tokens": self.reserved_tokens,
            "compaction_count": self.compaction_count,
            "last_compaction_at": self.last_compaction_at,
            "auto_compaction_enabled": self.auto_compaction_enabled,
            "auto_compaction_threshold": self.auto_compaction_threshold,
            "consecutive_auto_compactions": self.consecutive_auto_compactions,
            "max_context": self.max_context,
            "row_seq": self.row_seq,
            "active": self.active,
            "deleted": self.deleted,
            "deleted_seq": self.deleted_seq,
            "deleted_at": self.deleted_at,
            "context": {
                "tokens": self.tokens,
                "max_context": self.max_context,
                "percentage": self.percentage,
                "source": self.context_source,
                "seq": self.context_seq,
            },
            "metric": {
                "metric_id": self.metric_id,
                "real_tokens": self.real_tokens,
                "cumulative_tokens": self.cumulative_tokens,
                "cumulative_percentage": self.cumulative_percentage,
                "alert": self.alert,
                "last_alert": self.last_alert,
                "updates": self.metric_updates,
            },
            "stats": self.stats,
            "stats_seq": self.stats_seq,
            "recent_metrics": [
                self.recent_metrics[k] for k in sorted(self.recent_metrics, reverse=True)
            ],
            "log_metrics": dict(self.log_metrics),
            "compaction": {
                "count": self.compaction_events,
                "tokens_saved": self.compaction_tokens_saved,
                "last": self.compaction_last,
                "last_ratio": (
                    self.compaction_last.get("compaction_ratio") if self.compaction_last else None
                ),
                "auto_enabled": self.auto_compaction_enabled,
                "threshold": self.auto_compaction_threshold,
                "reserved_tokens": self.reserved_tokens,
            },
            "compression": {
                "count": self.compression_events,
                "compressed": self.compression_compressed,
                "tokens_saved": self.compression_tokens_saved,
                "last": self.compression_last,
            },
            "errors": dict(self.errors),
            "memory": self.memory,
            "auto_memory": self.auto_memory,
            "sanitizer": self.sanitizer,
            "counters": dict(self.counters),
            "invalid": dict(self.invalid),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_received_at": self.first_received_at,
            "last_received_at": self.last_received_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionState:
        """Inverse of `to_dict` (also after a JSON round trip)."""
        ctx = d.get("context") or {}
        metric = d.get("metric") or {}
        comp = d.get("compaction") or {}
        compr = d.get("compression") or {}
        return cls(
            id=int(d["id"]),
            name=d.get("name"),
            provider=d.get("provider"),
            model=d.get("model"),
            external_session_id=d.get("external_session_id"),
            created_at=d.get("created_at"),
            reserved_tokens=d.get("reserved_tokens"),
            compaction_count=d.get("compaction_count"),
            last_compaction_at=d.get("last_compaction_at"),
            auto_compaction_enabled=d.get("auto_compaction_enabled"),
            auto_compaction_threshold=d.get("auto_compaction_threshold"),
            consecutive_auto_compactions=d.get("consecutive_auto_compactions"),
            max_context=d.get("max_context"),
            row_seq=d.get("row_seq"),
            active=bool(d.get("active", False)),
            deleted=bool(d.get("deleted", False)),
            deleted_seq=d.get("deleted_seq"),
            deleted_at=d.get("deleted_at"),
            tokens=ctx.get("tokens"),
            percentage=ctx.get("percentage"),
            context_source=ctx.get("source"),
            context_seq=ctx.get("seq"),
            metric_id=metric.get("metric_id"),
            real_tokens=metric.get("real_tokens"),
            cumulative_tokens=metric.get("cumulative_tokens"),
            cumulative_percentage=metric.get("cumulative_percentage"),
            alert=metric.get("alert"),
            last_alert=metric.get("last_alert"),
            metric_updates=metric.get("updates", 0),
            stats=d.get("stats"),
            stats_seq=d.get("stats_seq"),
            recent_metrics={int(r["id"]): r for r in d.get("recent_metrics") or ()},
            log_metrics=dict(d.get("log_metrics") or {}),
            compaction_events=comp.get("count", 0),
            compaction_tokens_saved=comp.get("tokens_saved", 0),
            compaction_last=comp.get("last"),
            compression_events=compr.get("count", 0),
            compression_compressed=compr.get("compressed", 0),
            compression_tokens_saved=compr.get("tokens_saved", 0),
            compression_last=compr.get("last"),
            errors=dict(d.get("errors") or {}),
            memory=d.get("memory"),
            auto_memory=d.get("auto_memory"),
            sanitizer=d.get("sanitizer"),
            counters=dict(d.get("counters") or {}),
            invalid=dict(d.get("invalid") or {}),
            first_seq=d.get("first_seq"),
            last_seq=d.get("last_seq"),
            first_received_at=d.get("first_received_at"),
            last_received_at=d.get("last_received_at"),
        )


@dataclass(slots=True)
class State:
    """All sessions plus the state that belongs to no session."""

    sessions: dict[int, SessionState] = field(default_factory=dict)
    active_session_id: int | None = None
    # auto_session_toggled: the backend's in-memory auto-session flag.
    auto_session: dict[str, Any] = field(
        default_factory=lambda: {"enabled": None, "session_id": None, "seq": None}
    )
    # cline_usage_updated: {latest_ts, latest_count, imported_count, timestamp, seq, updates}.
    cline: dict[str, Any] | None = None
    # Last of each memory_* frame: preview, result, similarity, completed.
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Errors that name no session (provider_context_limit_error with session_id null …).
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # every event, by type
    invalid: dict[str, int] = field(default_factory=dict)  # known types that failed validation
    handler_errors: dict[str, int] = field(default_factory=dict)  # reducer bugs, by type
    first_seq: int | None = None
    last_seq: int | None = None
    first_received_at: float | None = None
    last_received_at: float | None = None

    def global_dict(self) -> dict[str, Any]:
        """The JSON-able state that belongs to no session."""
        return {
            "active_session_id": self.active_session_id,
            "auto_session": dict(self.auto_session),
            "cline": self.cline,
            "memory": dict(self.memory),
            "errors": dict(self.errors),
            "counters": dict(self.counters),
            "invalid": dict(self.invalid),
            "handler_errors": dict(self.handler_errors),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_received_at": self.first_received_at,
            "last_received_at": self.last_received_at,
        }

    @classmethod
    def load(cls, sessions: Iterable[dict[str, Any]], global_: dict[str, Any] | None) -> State:
        """Inverse of ``[s.to_dict() for s in sessions.values()]`` and `global_dict`."""
        state = cls(sessions={(s := SessionState.from_dict(d)).id: s for d in sessions})
        g = global_ or {}
        state.active_session_id = g.get("active_session_id")
        auto = g.get("auto_session")
        if auto:
            state.auto_session = dict(auto)
        state.cline = g.get("cline")
        state.memory = dict(g.get("memory") or {})
        state.errors = dict(g.get("errors") or {})
        state.counters = dict(g.get("counters") or {})
        state.invalid = dict(g.get("invalid") or {})
        state.handler_errors = dict(g.get("handler_errors") or {})
        state.first_seq = g.get("first_seq")
        state.last_seq = g.get("last_seq")
        state.first_received_at = g.get("first_received_at")
        state.last_received_at = g.get("last_received_at")
        return state


@dataclass(frozen=True, slots=True)
class Touched:
    """What one `apply` changed: session rows to upsert, and the global row.

    ``global_changed`` is always true: every event moves the global counters and seq.
    """

    session_ids: frozenset[int]
    global_changed: bool = True


# --------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------


def _session(state: State, sid: int) -> SessionState:
    s = state.sessions.get(sid)
    if s is None:  # first sight of this id: identity unknown until a frame carries the row
        s = state.sessions[sid] = SessionState(id=sid)
    return s


def _activate(state: State, sid: int) -> int | None:
    """Make ``sid`` the only active session (none if it is deleted); return the old one."""
    s = _session(state, sid)
    new = None if s.deleted else sid
    prev = state.active_session_id
    state.active_session_id = new
    if new is not None:
        s.active = True
    if prev is not None and prev != new:
        ps = state.sessions.get(prev)
        if ps is not None:
            ps.active = False
        return prev
    return None


def _tombstone(state: State, s: SessionState, seq: int, received_at: float) -> None:
    if not s.deleted:
        s.deleted = True
        s.deleted_seq = seq
        s.deleted_at = received_at
    s.active = False
    if state.active_session_id == s.id:
        state.active_session_id = None


_ROW_FIELDS: Final = (
    "name",
    "provider",
    "model",
    "external_session_id",
    "created_at",
    "last_compaction_at",
)


def _apply_row(s: SessionState, row: p.SessionRow, seq: int) -> None:
    """Copy the session row's fields that the frame carried (absent ones are kept)."""
    present = row.model_fields_set
    for name in _ROW_FIELDS:
        if name in present:
            setattr(s, name, _str(getattr(row, name)))
    if "reserved_tokens" in present:
        s.reserved_tokens = _coerce_int(row.reserved_tokens)
    if "compaction_count" in present:
        s.compaction_count = _int(row.compaction_count)
    if "auto_compaction_enabled" in present:
        s.auto_compaction_enabled = _bool(row.auto_compaction_enabled)
    if "auto_compaction_threshold" in present:
        s.auto_compaction_threshold = _float(row.auto_compaction_threshold)
    if "consecutive_auto_compactions" in present:
        s.consecutive_auto_compactions = _int(row.consecutive_auto_compactions)
    if "max_context" in present and row.max_context is not None:
        s.max_context = _int(row.max_context)
    s.row_seq = seq


def _set_max_context(s: SessionState, value: int | None) -> None:
    v = _int(value)
    if v is not None and v > 0:
        s.max_context = v


def _record_error(
    state: State, s: SessionState | None, etype: str, record: dict[str, Any], seq: int
) -> None:
    errors = s.errors if s is not None else state.errors
    old = errors.get(etype)
    errors[etype] = {"count": (old["count"] if old else 0) + 1, "last": record, "seq": seq}


def _metric_row(
    mid: int,
    *,
    timestamp: str | None,
    estimated_tokens: int | None,
    percentage: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    is_estimated: bool | None,
    content_preview: str | None,
    source: str | None,
) -> dict[str, Any]:
    return {
        "id": mid,
        "timestamp": timestamp,
        "estimated_tokens": estimated_tokens,
        "percentage": percentage,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "is_estimated": is_estimated,
        "content_preview": content_preview,
        "source": source,
    }


def _trim_recent(s: SessionState) -> None:
    """Keep the `RECENT_METRICS_MAX` highest metric ids."""
    rm = s.recent_metrics
    excess = len(rm) - RECENT_METRICS_MAX
    if excess == 1:  # one new row, on every metric frame: no need to sort 51 ids
        del rm[min(rm)]
    elif excess > 1:
        for k in sorted(rm)[:excess]:
            del rm[k]


def _row_input(row: dict[str, Any]) -> int:
    """A row's share of ``cumulative_input_tokens``: prompt_tokens if >0, else the estimate."""
    prompt = row.get("prompt_tokens") or 0
    return prompt if prompt > 0 else (row.get("estimated_tokens") or 0)


def _fresh_stats(s: SessionState) -> dict[str, Any]:
    """Stats of a session created under our eyes: from the rows seen so far (usually none)."""
    rows = list(s.recent_metrics.values())
    est = [r.get("estimated_tokens") or 0 for r in rows]
    cin = sum(_row_input(r) for r in rows)
    cout = sum(r.get("completion_tokens") or 0 for r in rows)
    return _stats_dict(len(rows), max(est) if est else None, sum(est), cin, cout)


def _stats_dict(
    n: int, max_tokens: int | None, est_sum: int, cin: int, cout: int
) -> dict[str, Any]:
    return {
        "total_requests": n,
        "max_tokens": max_tokens,
        "avg_tokens": est_sum / n if n else None,
        "current_input_tokens": cin,
        "current_output_tokens": cout,
        "current_total_tokens": cin + cout,
        "cumulative_input_tokens": cin,
        "cumulative_output_tokens": cout,
        "cumulative_total_tokens": cin + cout,
    }


def _stats_on_metric(s: SessionState, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Fold one metric row's change (``old`` → ``new``) into the snapshot stats."""
    st = s.stats
    if st is None:
        return
    n = st.get("total_requests") or 0
    avg = st.get("avg_tokens")
    prod = avg * n if isinstance(avg, (float, int)) and n else 0.0  # a tuple: faster than |
    est_sum = round(prod) if math.isfinite(prod) else 0
    cin = st.get("cumulative_input_tokens") or 0
    cout = st.get("cumulative_output_tokens") or 0
    est = new.get("estimated_tokens") or 0
    if old is None:
        n += 1
    else:
        est_sum -= old.get("estimated_tokens") or 0
        cin -= _row_input(old)
        cout -= old.get("completion_tokens") or 0
    est_sum += est
    cin += _row_input(new)
    cout += new.get("completion_tokens") or 0
    mx = st.get("max_tokens")
    if not isinstance(mx, int) or mx < est:  # max(mx, est), without the call
        mx = est
    s.stats = _stats_dict(n, mx, est_sum, cin, cout)


def _set_context(
    s: SessionState, tokens: int | None, pct: float | None, src: str, seq: int
) -> None:
    s.tokens = tokens
    s.percentage = pct
    s.context_source = src
    s.context_seq = seq


def _alert(a: dict[str, Any] | None, seq: int) -> dict[str, Any] | None:
    """A validated `protocol.Alert` object (from ``Event.body``) as kept."""
    if a is None:
        return None
    return {
        "level": _str(a["level"]),
        "color": _str(a.get("color")),
        "message": _str(a.get("message")),
        "seq": seq,
    }


# --------------------------------------------------------------------------------------
# Handlers: one per known type. Each gets the state, the event (valid: it reads the model,
# or for log_metric and metric_updated the validated body, see below), the session named by
# event.session_id (already created) or None, seq and received_at.
# It returns one more session id whose row changed (the previously active one), or None.
# --------------------------------------------------------------------------------------

Handler = Callable[[State, Event, SessionState | None, int, float], int | None]


def _h_init(state: State, ev: Event, s: SessionState | None, seq: int, ts: float) -> int | None:
    m = cast(p.Init, ev.model)
    if s is None:  # pragma: no cover - a valid init always names its session
        return None
    _apply_row(s, m.session, seq)
    # Snapshot: it wins for the totals; rows merge by metric id.
    st = m.stats
    s.stats = {
        "total_requests": _int(st.total_requests),
        "max_tokens": _int(st.max_tokens),
        "avg_tokens": _float(st.avg_tokens),
        "current_input_tokens": _int(st.current_input_tokens),
        "current_output_tokens": _int(st.current_output_tokens),
        "current_total_tokens": _int(st.current_total_tokens),
        "cumulative_input_tokens": _int(st.cumulative_input_tokens),
        "cumulative_output_tokens": _int(st.cumulative_output_tokens),
        "cumulative_total_tokens": _int(st.cumulative_total_tokens),
    }
    s.stats_seq = seq
    for r in m.recent_metrics:
        mid = _int(r.id)
        if mid is None or r.session_id != s.id:
            continue
        s.recent_metrics[mid] = _metric_row(
            mid,
            timestamp=_str(r.timestamp),
            estimated_tokens=_int(r.estimated_tokens),
            percentage=_float(r.percentage),
            prompt_tokens=_int(r.prompt_tokens),
            completion_tokens=_int(r.completion_tokens),
            is_estimated=_bool(r.is_estimated),
            content_preview=_str(r.content_preview, 200),
            source=_str(r.source),
        )
    _trim_recent(s)
    if s.recent_metrics:  # the newest row (highest id) is the session's current size
        newest = s.recent_metrics[max(s.recent_metrics)]
        _set_context(s, newest["estimated_tokens"], newest["percentage"], "init", seq)
    return _activate(state, s.id)


def _h_new_session(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.NewSession, ev.model)
    if s is None:  # pragma: no cover
        return None
    _apply_row(s, m.session, seq)
    if s.stats is None:
        s.stats = _fresh_stats(s)
        s.stats_seq = seq
    return _activate(state, s.id)


def _h_auto_session_created(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.AutoSessionCreated, ev.model)
    if s is None:  # pragma: no cover
        return None
    _apply_row(s, m.session, seq)
    present = m.session.model_fields_set
    for name in ("provider", "model", "external_session_id"):
        if name not in present and name in m.model_fields_set:
            setattr(s, name, _str(getattr(m, name)))
    if s.stats is None:
        s.stats = _fresh_stats(s)
        s.stats_seq = seq
    return _activate(state, s.id)


def _h_session_activated(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.SessionActivated, ev.model)
    if s is None:  # pragma: no cover
        return None
    if m.session.id == s.id:
        _apply_row(s, m.session, seq)
    return _activate(state, s.id)


def _h_sessions_bulk_deleted(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    for sid in ev.session_ids:
        _tombstone(state, _session(state, sid), seq, ts)
    return None


def _h_session_deleted(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    if s is not None:
        _tombstone(state, s, seq, ts)
    return None


def _h_auto_session_toggled(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.AutoSessionToggled, ev.model)
    state.auto_session = {"enabled": _bool(m.enabled), "session_id": _int(m.session_id), "seq": seq}
    return None


_FAMILY_ALIASES: Final = {
    "compile_chat": "continue_compile",
    "continue_compile_chat": "continue_compile",
    "api_error": "error",
    "continue_api_error": "error",
}


# The two hot types read ``ev.body``, already validated against their models
# (`protocol.LogMetric`, `protocol.MetricUpdated`: strict types, so the values are the
# model's, bar ints in float fields, see `_vfloat`), not ``ev.model``: decoding proves most
# of these frames valid without building a model, and reading ``ev.model`` would build it.


def _h_log_metric(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    if s is None:  # pragma: no cover
        return None
    b = ev.body
    raw = b["source_family"] or b["source"]
    family = _FAMILY_ALIASES.get(raw, raw)
    fams = s.log_metrics
    if family not in fams and (len(fams) >= FAMILIES_MAX or len(family) > 100):
        family = OTHER
    old = fams.get(family)
    x = b["metrics"]
    fams[family] = {
        "count": (old["count"] if old else 0) + 1,
        "source": _str(b["source"]),
        "label": _str(b["source_label"]),
        "timestamp": _str(b["timestamp"]),
        "metrics": {
            "prompt_tokens": _int(x["prompt_tokens"]),
            "completion_tokens": _int(x["completion_tokens"]),
            "tools_tokens": _int(x.get("tools_tokens")),
            "system_message_tokens": _int(x.get("system_message_tokens")),
            "total_tokens": _int(x["total_tokens"]),
            "context_length": _int(x["context_length"]),
            "max_context": _int(x["max_context"]),
            "percentage": _vfloat(x["percentage"]),
        },
        "seq": seq,
    }
    return None


def _h_metric_updated(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    if s is None:  # pragma: no cover
        return None
    b = ev.body
    rt = b["real_tokens"]
    total, prompt, completion = _int(rt["total"]), _int(rt["prompt"]), _int(rt["completion"])
    pct = _vfloat(rt["percentage"])
    s.metric_id = mid = _int(b["metric_id"])
    s.real_tokens = {"total": total, "prompt": prompt, "completion": completion, "percentage": pct}
    s.cumulative_tokens = _int(b["cumulative_tokens"])
    s.cumulative_percentage = _vfloat(b["cumulative_percentage"])
    s.alert = _alert(b.get("alert"), seq)
    if s.alert is not None:
        s.last_alert = s.alert
    s.metric_updates += 1
    _set_context(s, s.cumulative_tokens, s.cumulative_percentage, "metric_updated", seq)
    if mid is not None:
        old = s.recent_metrics.get(mid)
        source = b.get("source")
        new = {  # `_metric_row`, spelled out: keyword calls cost here
            "id": mid,
            "timestamp": old["timestamp"] if old else None,
            "estimated_tokens": total,
            "percentage": pct,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "is_estimated": False,
            "content_preview": old["content_preview"] if old else None,
            "source": _str(source) if source is not None else (old["source"] if old else None),
        }
        _stats_on_metric(s, old, new)
        s.recent_metrics[mid] = new
        _trim_recent(s)
    return None


def _h_legacy_metric(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.LegacyMetric, ev.model)
    if s is None:  # pragma: no cover
        return None
    x = m.metric
    tokens = _int(x.cumulative_tokens) or _int(x.estimated_tokens)  # the browser's `||`
    _set_context(s, tokens, _float(x.percentage), "metric", seq)
    a = m.alert
    if isinstance(a, dict) and a:
        s.last_alert = {
            "level": _str(a.get("level")),
            "color": _str(a.get("color")),
            "message": _str(a.get("message")),
            "seq": seq,
        }
    return None


def _h_streaming_error(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.StreamingError, ev.model)
    record = {
        "metric_id": _int(m.metric_id),
        "error_type": _str(m.error_type),
        "error_message": _str(m.error_message),
        "timestamp": _str(m.timestamp),
    }
    _record_error(state, s, ev.type, record, seq)
    return None


def _h_provider_context_limit_error(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.ProviderContextLimitError, ev.model)
    record = {
        "provider": _str(m.provider),
        "model": _str(m.model),
        "estimated_tokens": _int(m.estimated_tokens),
        "max_context": _int(m.max_context),
        "message": _str(m.message),
        "error": _str(m.error),
        "received_at": ts,
    }
    _record_error(state, s, ev.type, record, seq)
    if s is not None:
        _set_max_context(s, m.max_context)
    return None


def _h_context_limit_violation(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.ContextLimitViolation, ev.model)
    v = m.violation
    record = {
        "estimated_tokens": _int(v.estimated_tokens),
        "max_context": _int(v.max_context),
        "effective_limit": _int(v.effective_limit),
        "violation_ratio": _float(v.violation_ratio),
        "excess_tokens": _int(v.excess_tokens),
        "message": _str(m.message),
        "received_at": ts,
    }
    _record_error(state, s, ev.type, record, seq)
    if s is not None:
        _set_max_context(s, v.max_context)
    return None


def _h_context_performance_alert(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.ContextPerformanceAlert, ev.model)
    metrics = m.metrics or m.alert.metrics
    record = {
        "level": _str(m.alert.level),
        "message": _str(m.alert.message or m.message),
        "estimated_tokens": _int(metrics.estimated_tokens) if metrics else None,
        "max_context": _int(metrics.max_context) if metrics else None,
        "usage_percentage": _float(metrics.usage_percentage) if metrics else None,
        "received_at": ts,
    }
    _record_error(state, s, ev.type, record, seq)
    if s is not None and metrics is not None:
        _set_max_context(s, metrics.max_context)
    return None


def _h_compaction_event(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.CompactionEvent, ev.model)
    if s is None:  # pragma: no cover
        return None
    c = m.compaction
    saved = _int(c.tokens_saved)
    s.compaction_events += 1
    if saved is not None:
        s.compaction_tokens_saved += saved
    s.compaction_last = {
        "shape": "persist" if m.history_id is not None or c.compacted is not None else "manual",
        "history_id": _int(m.history_id),
        "timestamp": _str(m.timestamp),
        "compacted": c.compacted,
        "original_tokens": _int(c.original_tokens),
        "compacted_tokens": _int(c.compacted_tokens),
        "tokens_saved": saved,
        "compaction_ratio": _float(c.compaction_ratio),  # percent
        "messages_before": _int(c.messages_before),
        "messages_after": _int(c.messages_after),
        "summarized_count": _int(c.summarized_count),
        "trigger_reason": _str(c.trigger_reason),
        "seq": seq,
    }
    return None


def _h_reserved_tokens_updated(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.ReservedTokensUpdated, ev.model)
    if s is not None:
        s.reserved_tokens = _coerce_int(m.reserved_tokens)
    return None


def _h_auto_compaction_toggled(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.AutoCompactionToggled, ev.model)
    if s is not None:
        s.auto_compaction_enabled = _bool(m.enabled)
    return None


def _h_compression_event(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.CompressionEvent, ev.model)
    if s is None:  # pragma: no cover
        return None
    c = m.compression
    saved = _int(c.tokens_saved)
    s.compression_events += 1
    if c.compressed:
        s.compression_compressed += 1
        if saved is not None:
            s.compression_tokens_saved += saved
    s.compression_last = {
        "timestamp": _str(m.timestamp),
        "compressed": c.compressed,
        "original_tokens": _int(c.original_tokens),
        "compressed_tokens": _int(c.compressed_tokens),
        "tokens_saved": saved,
        "compression_ratio": _float(c.compression_ratio),  # percent
        "messages_before": _int(c.messages_before),
        "messages_after": _int(c.messages_after),
        "seq": seq,
    }
    return None


def _h_cline_usage_updated(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.ClineUsageUpdated, ev.model)
    old = state.cline
    latest = m.latest_ts
    state.cline = {
        "latest_ts": _int(latest) if type(latest) is int else _float(latest),
        "latest_count": _int(m.latest_count),
        "imported_count": _int(m.imported_count),
        "timestamp": _str(m.timestamp),
        "seq": seq,
        "updates": (old["updates"] if old else 0) + 1,
    }
    return None


_MEMORY_KEYS: Final = {
    "memory_compress_preview_response": "preview",
    "memory_compress_result_response": "result",
    "memory_similarity_result_response": "similarity",
    "memory_compression_completed": "completed",
}


def _memory_count(state: State, key: str) -> int:
    old = state.memory.get(key)
    return (old["count"] if old else 0) + 1


def _h_memory_compress_response(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.MemoryCompressPreviewResponse, ev.model)
    key = _MEMORY_KEYS[ev.type]
    r = m.result
    state.memory[key] = {
        "request_id": _json(m.requestId),
        "success": r.success if r is not None else None,
        "current_count": _int(r.current_count) if r else None,
        "projected_count": _int(r.projected_count) if r else None,
        "space_saved": _str(r.space_saved) if r else None,
        "compression_ratio": _float(r.compression_ratio) if r else None,  # a fraction
        "error": _str(m.error) if m.error is not None else (_str(r.error) if r else None),
        "count": _memory_count(state, key),
        "seq": seq,
    }
    return None


def _h_memory_similarity_result_response(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.MemorySimilarityResultResponse, ev.model)
    key = _MEMORY_KEYS[ev.type]
    r = m.result
    state.memory[key] = {
        "request_id": _json(m.requestId),
        "success": r.success if r is not None else None,
        "total_found": _int(r.total_found) if r else None,
        "method_used": _str(r.method_used) if r else None,
        "threshold_used": _float(r.threshold_used) if r else None,
        "result_ids": [_json(i.id) for i in r.results[:100]] if r else [],
        "error": _str(m.error) if m.error is not None else (_str(r.error) if r else None),
        "count": _memory_count(state, key),
        "seq": seq,
    }
    return None


def _h_memory_compression_completed(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.MemoryCompressionCompleted, ev.model)
    key = _MEMORY_KEYS[ev.type]
    state.memory[key] = {
        "strategy": _json(m.strategy),
        "threshold": _json(m.threshold),
        "memories_processed": _int(m.memories_processed),
        "timestamp": _str(m.timestamp),
        "count": _memory_count(state, key),
        "seq": seq,
    }
    return None


def _h_sanitizer_event(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.SanitizerEvent, ev.model)
    if s is None:  # pragma: no cover
        return None
    e = m.event
    s.sanitizer = {
        "count": (s.sanitizer["count"] if s.sanitizer else 0) + 1,
        "last": {
            "type": _str(e.type),
            "level": _str(e.level),
            "message": _str(e.message),
            "old_model": _str(e.old_model),
            "new_model": _str(e.new_model),
            "old_context": _int(e.old_context),
            "new_context": _int(e.new_context),
            "reason": _str(e.reason),
            "timestamp": _str(m.timestamp),
        },
        "seq": seq,
    }
    if e.type == "model_fallback":  # the session's model was switched
        if e.new_model is not None:
            s.model = _str(e.new_model)
        _set_max_context(s, e.new_context)
    return None


def _h_auto_memory_stored(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.AutoMemoryStored, ev.model)
    if s is None:  # pragma: no cover
        return None
    old = s.auto_memory
    n = _int(m.count) or 0
    s.auto_memory = {
        "events": (old["events"] if old else 0) + 1,
        "memories": (old["memories"] if old else 0) + max(n, 0),
        "last_count": _int(m.count),
        "seq": seq,
    }
    return None


def _h_memory_metrics_update(
    state: State, ev: Event, s: SessionState | None, seq: int, ts: float
) -> int | None:
    m = cast(p.MemoryMetricsUpdate, ev.model)
    if s is None:  # pragma: no cover
        return None
    x = m.memory
    s.memory = {
        "memory_tokens": _int(x.memory_tokens),
        "chat_tokens": _int(x.chat_tokens),
        "total_tokens": _int(x.total_tokens),
        "memory_ratio": _float(x.memory_ratio),  # percent
        "segment_count": _int(x.segment_count),
        "timestamp": _str(m.timestamp),
        "updates": (s.memory["updates"] if s.memory else 0) + 1,
        "seq": seq,
    }
    return None


HANDLERS: Final[dict[str, Handler]] = {
    "init": _h_init,
    "log_metric": _h_log_metric,
    "metric_updated": _h_metric_updated,
    "streaming_error": _h_streaming_error,
    "provider_context_limit_error": _h_provider_context_limit_error,
    "new_session": _h_new_session,
    "session_activated": _h_session_activated,
    "sessions_bulk_deleted": _h_sessions_bulk_deleted,
    "auto_session_created": _h_auto_session_created,
    "auto_session_toggled": _h_auto_session_toggled,
    "compaction_event": _h_compaction_event,
    "reserved_tokens_updated": _h_reserved_tokens_updated,
    "auto_compaction_toggled": _h_auto_compaction_toggled,
    "compression_event": _h_compression_event,
    "cline_usage_updated": _h_cline_usage_updated,
    "memory_compress_preview_response": _h_memory_compress_response,
    "memory_compress_result_response": _h_memory_compress_response,
    "memory_similarity_result_response": _h_memory_similarity_result_response,
    "memory_compression_completed": _h_memory_compression_completed,
    "sanitizer_event": _h_sanitizer_event,
    "auto_memory_stored": _h_auto_memory_stored,
    "metric": _h_legacy_metric,
    "memory_metrics_update": _h_memory_metrics_update,
    "context_limit_violation": _h_context_limit_violation,
    "context_performance_alert": _h_context_performance_alert,
    "session_deleted": _h_session_deleted,
}


# --------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------


def _bookkeep(s: SessionState, etype: str, invalid: bool, seq: int, ts: float) -> None:
    _bump(s.counters, etype)
    if invalid:
        _bump(s.invalid, etype)
    if s.first_seq is None:
        s.first_seq = seq
        s.first_received_at = ts
    s.last_seq = seq
    s.last_received_at = ts


_NO_IDS: Final[frozenset[int]] = frozenset()
_TOUCHED_NONE: Final = Touched(_NO_IDS)
# `Touched` of one session, by id: almost every event touches exactly one session, and
# building a frozen dataclass and a frozenset per event costs ~1 µs. They are immutable, so
# callers can share them; bounded (cleared when full) against a stream of ever-new ids.
_TOUCHED_ONE: dict[int, Touched] = {}
_TOUCHED_ONE_MAX: Final = 4096


def _touched_one(sid: int) -> Touched:
    touched = _TOUCHED_ONE.get(sid)
    if touched is None:
        if len(_TOUCHED_ONE) >= _TOUCHED_ONE_MAX:
            _TOUCHED_ONE.clear()
        touched = _TOUCHED_ONE[sid] = Touched(frozenset((sid,)))
    return touched


def apply(state: State, event: Event, seq: int, received_at: float) -> Touched:
    """Fold one event (stored under ``seq``) into ``state`` in place; say which rows changed."""
    etype = event.type
    invalid = event.invalid is not None
    _bump(state.counters, etype)
    if invalid:
        _bump(state.invalid, etype)
    if state.first_seq is None:
        state.first_seq = seq
        state.first_received_at = received_at
    state.last_seq = seq
    state.last_received_at = received_at

    sid = event.session_id
    s: SessionState | None = None
    if sid is not None:
        s = _session(state, sid)
        _bookkeep(s, etype, invalid, seq, received_at)
    for other in event.session_ids:
        if other != sid:
            _bookkeep(_session(state, other), etype, invalid, seq, received_at)

    extra: int | None = None
    # Valid and known, i.e. ``event.model is not None`` without building a pending model
    # (the hot types' handlers read the body instead; see protocol.Event).
    if event.known and not invalid:
        handler = HANDLERS.get(etype)
        if handler is not None:
            try:
                extra = handler(state, event, s, seq, received_at)
            except Exception:  # a reducer bug must not stop the daemon storing frames
                _bump(state.handler_errors, etype)

    if extra is None and not event.session_ids:
        return _touched_one(sid) if sid is not None else _TOUCHED_NONE
    ids = set(event.session_ids)
    if sid is not None:
        ids.add(sid)
    if extra is not None:
        ids.add(extra)
    return Touched(frozenset(ids))


def replay(events: Iterable[tuple[int, float, Event]]) -> State:
    """A fresh `State` from a whole log of ``(seq, received_at, event)``."""
    state = State()
    for seq, received_at, event in events:
        apply(state, event, seq, received_at)
    return state
