"""A simulated Kimi Proxy backend: the fixture for kimi-syncd's tests, demo and benchmarks.

It speaks the `/ws` protocol of the real server (see ``/work/shared/protocol/kimi-ws-protocol.md``):
text frames holding one compact JSON object each, an ``init`` frame on connect when a session is
active, the three ``memory_*`` request/reply pairs, and a dropped TCP connection (no close frame)
when a client sends a binary frame. Its events come from :class:`Scenario`, a seeded, pure model
of sessions and metrics that emits the frame sequences the real server produces.

In-process use::

    async with SimBackend(seed=1, rate=5) as sim:
        ...  # connect to sim.url; sim.set_fault("stall"); await sim.blast(10_000); sim.received

Out-of-process use: ``kimi-syncd-sim --port 8000 --rate 2`` (or ``python -m kimi_syncd.sim``), then
drive it over HTTP on the same port.

Control endpoints (loopback peers only; every reply is JSON)
-----------------------------------------------------------
websockets 17 cannot read an HTTP request body: ``Request.parse`` rejects any request with a
non-zero ``Content-Length`` or a ``Transfer-Encoding`` and drops the connection without a reply.
So **all parameters travel in the query string**; GET and body-less POST are both accepted.

=====================================================  =========================================
``/_sim/stats``                                        counters, fault, clients, active session
``/_sim/received?since=N``                             list of ``{"conn","at","text"}`` from N
``/_sim/fault?mode=refuse&status=401&retry_after=5``   set a fault (:meth:`SimBackend.set_fault`)
``/_sim/fault`` (no mode, or ``mode=none``)            clear the fault
``/_sim/emit?frame=<url-encoded JSON>``                broadcast one object or a list of objects
``/_sim/emit?raw=<text>``                              broadcast raw text as is (may be invalid)
``/_sim/drop?abnormal=1&code=1000``                    close every client (abnormal = TCP abort)
``/_sim/blast?n=10000&size=300``                       start a blast in the background (202)
``/_sim/step?n=1``                                     broadcast the next n scenario events now
``/_sim/hostile?n=5&seed=1``                           send n hostile frames now
``/_sim/rate?rate=2``                                  change the automatic event rate
=====================================================  =========================================

Fault modes (:meth:`SimBackend.set_fault`)
------------------------------------------
- ``refuse``: answer the upgrade with ``status`` (default 503), plus ``Retry-After`` when
  ``retry_after`` is given.
- ``accept_then_close``: each *new* connection is accepted, gets ``init``, then after ``delay``
  seconds is closed with ``code`` (1000, 1011, ...) or, with ``code="abnormal"``, aborted (TCP
  closed with no close frame). Use :meth:`SimBackend.drop_all` for existing connections.
- ``stall``: a hung backend / half-open TCP. Reading is paused on every connection's transport
  (existing and new), so client pings get no pong and client sends back up; the sim also stops
  sending anything to those connections, including its own keepalive pings (otherwise the sim
  itself would time the connection out); frames broadcast meanwhile are dropped for them, not
  queued. ``handshake=True`` also hangs new opening handshakes until the fault clears (or
  websockets' 10 s ``open_timeout`` drops the TCP connection). Clearing resumes reading and
  keepalive, and sends the ``init`` a connection missed.
- ``stop_reading``: reading is paused (so client sends back up and client pings go unanswered)
  but events keep flowing to the client. The sim's keepalive is suspended for the same reason.
- ``malformed``: every emission tick (so ``rate`` must be set) also sends ``per_tick`` hostile
  frames (``kinds``, ``oversize``); see :func:`hostile_frames`.

A fault survives stop()/start(), as do ``stats`` and ``received``.

Broadcasts await each client in turn, like the real server: a client that stops reading holds up
the emitter for everyone. ``frames_sent`` counts per-client sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import http
import itertools
import json
import logging
import math
import random
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = [
    "DEFAULT_HOSTILE_KINDS",
    "FAULT_MODES",
    "HOSTILE_KINDS",
    "Fault",
    "HostileFrame",
    "Received",
    "Scenario",
    "SimBackend",
    "SimStats",
    "dumps",
    "hostile_frames",
    "main",
]

log = logging.getLogger("kimi_syncd.sim")

JSON = dict[str, Any]

MIB = 2**20

FAULT_MODES: tuple[str, ...] = ("refuse", "accept_then_close", "stall", "stop_reading", "malformed")


def dumps(obj: Any) -> str:
    """Serialise like Starlette's ``send_json``: compact separators, raw UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Fixed vocabulary of the real server (texts are the server's own, so they must stay French).
# ---------------------------------------------------------------------------------------------


class _Provider(NamedTuple):
    key: str
    label: str  # used in auto-session names, "Session Nvidia 14:12:30"
    model: str  # mapped upstream model name
    config_model: str  # the config key a REST caller would send
    max_context: int


PROVIDERS: tuple[_Provider, ...] = (
    _Provider("managed:kimi-code", "Kimi Code", "kimi-for-coding", "kimi-code/kimi", 262144),
    _Provider("nvidia", "Nvidia", "moonshotai/kimi-k2.5", "nvidia/kimi-k2.5", 262144),
    _Provider(
        "openrouter", "OpenRouter", "moonshotai/kimi-k2-thinking", "openrouter/kimi-k2", 131072
    ),
)

USER_SESSION_NAMES = (
    "Refactoring sprint",
    "Bugfix websocket",
    "Revue de code",
    "Migration SQLite",
    "Exploration API",
    "Tests de charge 🚀",
)

CONTENT_PREVIEWS = (
    "Refactor the websocket reconnect logic to use exponential backoff",
    "Why does the SQLite writer lock under load?",
    "Ajoute un test pour la reprise après coupure réseau",
    "Explain the difference between at-least-once and exactly-once delivery",
    "Écris la migration pour la colonne reserved_tokens",
    "[{'type': 'text', 'text': 'Summarise the failing CI job and propose a fix for the flaky "
    "test'}]",
    "Add a retry budget to the sync loop",
    "Pourquoi le dashboard affiche-t-il 216 % de contexte ?",
    "Generate a systemd unit with sandboxing for the daemon",
    "Review this diff: the queue drains twice after reconnect and duplicates every outgoing "
    "message, which breaks idempotency guarantees",
)

# (source, source_family, source_label, weight); the label strings are the server's fixed ones.
LOG_SOURCES: tuple[tuple[str, str, str, float], ...] = (
    ("kimi_session_usage", "kimi_session", "Session Kimi", 5.0),
    ("kimi_global", "kimi_global", "Log global Kimi", 2.0),
    ("kimi_global_context_limit_error", "kimi_global", "Limite de contexte Kimi", 0.5),
    ("kimi_global_auth_error", "kimi_global", "Erreur auth Kimi", 0.3),
    ("kimi_global_request_error", "kimi_global", "Erreur requête Kimi", 0.3),
    ("kimi_global_transport_error", "kimi_global", "Erreur transport Kimi", 0.3),
    ("kimi_global_runtime_error", "kimi_global", "Erreur runtime Kimi", 0.3),
    ("continue_logs", "continue_logs", "Logs Continue", 2.0),
    ("continue_compile_chat", "continue_compile", "CompileChat Continue", 1.5),
    ("continue_api_error", "error", "Erreur Continue", 0.5),
)

STREAMING_ERRORS: dict[str, str] = {
    "read_error": "Connexion interrompue par le provider",
    "connect_error": "Impossible de se connecter au provider",
    "timeout_error": "Timeout lors de la lecture du stream",
    "unknown": "Erreur streaming inconnue",
}

CONTEXT_LIMIT_MESSAGE = "Le provider a rejeté la requête pour dépassement de limite de contexte"

LEGACY_TYPES: tuple[str, ...] = (
    "metric",
    "memory_metrics_update",
    "context_limit_violation",
    "context_performance_alert",
    "session_deleted",
    "sanitizer_event",
    "auto_memory_stored",
)


def alert_for(percentage: float) -> JSON | None:
    """The server's fixed alert object for a context percentage (``check_threshold_alert``)."""
    if percentage >= 95:
        return {"level": "critical", "color": "#ef4444", "message": "⚠️ CONTEXTE CRITIQUE (95%)"}
    if percentage >= 90:
        return {"level": "warning", "color": "#f97316", "message": "⚠️ CONTEXTE ÉLEVÉ (90%)"}
    if percentage >= 80:
        return {"level": "caution", "color": "#eab308", "message": "⚡ Attention (80%)"}
    return None


# ---------------------------------------------------------------------------------------------
# Scenario: a pure, seeded model of the server's state and the frames it broadcasts.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Session:
    id: int
    name: str
    provider: str
    model: str | None
    external_session_id: str | None
    created_at: str
    max_context: int
    is_active: int = 0
    reserved_tokens: int = 0
    compaction_count: int = 0
    last_compaction_at: str | None = None
    auto_compaction_enabled: int = 1
    auto_compaction_threshold: float = 0.85
    consecutive_auto_compactions: int = 0
    # Model-only state (not columns): context size and conversation length drive the events.
    context_tokens: int = 0
    messages: int = 0
    metrics: list[JSON] = field(default_factory=list)

    def row(self) -> JSON:
        """The ``SELECT *`` row, columns in fresh-DB order (no ``max_context``)."""
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "external_session_id": self.external_session_id,
            "created_at": self.created_at,
            "is_active": self.is_active,
            "reserved_tokens": self.reserved_tokens,
            "compaction_count": self.compaction_count,
            "last_compaction_at": self.last_compaction_at,
            "auto_compaction_enabled": self.auto_compaction_enabled,
            "auto_compaction_threshold": self.auto_compaction_threshold,
            "consecutive_auto_compactions": self.consecutive_auto_compactions,
        }


class Scenario:
    """Seeded generator of realistic server frames over a consistent session model.

    Session ids are increasing ints and exactly one session is active. With ``realtime=False``
    (the default) the clock is virtual, so the output depends only on ``seed``; the simulator
    uses ``realtime=True`` so that timestamps look current. Two timestamp styles are used, as
    on the wire: "ts-local" (naive local ISO with microseconds) for event times and "ts-db"
    (UTC ``YYYY-MM-DD HH:MM:SS``) for database columns.
    """

    # Relative weights of the event kinds picked by next_event().
    WEIGHTS: ClassVar[dict[str, float]] = {
        "request": 28.0,
        "log_burst": 25.0,
        "cline": 4.0,
        "compression": 4.0,
        "new_session": 2.0,
        "activate": 2.0,
        "bulk_delete": 2.0,
        "reserved": 3.0,
        "toggle_compaction": 2.0,
        "toggle_auto_session": 2.0,
        "context_limit": 3.0,
        "legacy": 2.0,
    }

    def __init__(
        self,
        seed: int | None = None,
        *,
        realtime: bool = False,
        start: datetime | None = None,
        utc_offset: timedelta = timedelta(hours=2),
        weights: dict[str, float] | None = None,
    ) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._realtime = realtime
        # Virtual clock (UTC, aware). Non-zero microseconds so isoformat() always carries them.
        self._vnow = start or datetime(2026, 5, 29, 12, 0, 0, 117_331, tzinfo=UTC)
        self._offset = utc_offset
        self._weights = dict(self.WEIGHTS)
        if weights:
            unknown = set(weights) - set(self._weights)
            if unknown:
                raise ValueError(f"unknown event kinds: {sorted(unknown)}")
            self._weights.update(weights)
        self._pending: deque[JSON] = deque()
        self._sessions: dict[int, _Session] = {}
        self._active_id: int | None = None
        self._next_session_id = self._rng.randint(20, 60)
        self._next_metric_id = self._rng.randint(200, 400)
        self._next_history_id = self._rng.randint(1, 20)
        self._auto_session_enabled = True
        self._sticky_context: int | None = None  # the log watcher's "sticky" max_context
        self._cline_count = self._rng.randint(40, 200)
        self._cline_ts = int((self._utc() - timedelta(hours=3)).timestamp() * 1000)
        self._bootstrap()

    # -- public API ---------------------------------------------------------------------------

    @property
    def active_session_id(self) -> int | None:
        return self._active_id

    @property
    def session_ids(self) -> list[int]:
        return sorted(self._sessions)

    def session_row(self, session_id: int) -> JSON:
        return self._sessions[session_id].row()

    def next_frame(self) -> JSON:
        """The next frame, in server order (events made of several frames are split up)."""
        if not self._pending:
            self._pending.extend(self._generate())
        return self._pending.popleft()

    def next_event(self) -> list[JSON]:
        """The frames of one logical event (a request's frames, a log burst, ...)."""
        if self._pending:
            frames = list(self._pending)
            self._pending.clear()
            return frames
        return self._generate()

    def init_frame(self) -> JSON:
        """The ``init`` frame the server sends on connect for the current active session."""
        session = self._active()
        rows = session.metrics
        # ORDER BY timestamp DESC LIMIT 50; ids grow with time, so id order is the same order.
        recent = [dict(r) for r in sorted(rows, key=lambda r: r["id"], reverse=True)[:50]]
        return {
            "type": "init",
            "session": session.row(),
            **self._stats(session),
            "recent_metrics": recent,
        }

    def reserve_metric_ids(self, n: int) -> int:
        """Reserve ``n`` metric ids (for frames built outside the model); returns the first."""
        first = self._next_metric_id
        self._next_metric_id += n
        return first

    # -- clock --------------------------------------------------------------------------------

    def _utc(self) -> datetime:
        return datetime.now(UTC) if self._realtime else self._vnow

    def _advance(self, lo: float, hi: float) -> None:
        if not self._realtime:
            self._vnow += timedelta(seconds=self._rng.uniform(lo, hi))

    def _ts_local(self) -> str:
        """'ts-local': ``datetime.now().isoformat()`` on the server (naive local time)."""
        if self._realtime:
            return datetime.now().isoformat(timespec="microseconds")
        local = (self._vnow + self._offset).replace(tzinfo=None)
        return local.isoformat(timespec="microseconds")

    def _local_hms(self) -> str:
        return self._ts_local()[11:19]

    def _ts_db(self, at: datetime | None = None) -> str:
        """'ts-db': SQLite ``CURRENT_TIMESTAMP``, UTC, no zone."""
        return (at or self._utc()).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    # -- model helpers ------------------------------------------------------------------------

    def _active(self) -> _Session:
        assert self._active_id is not None, "the scenario always keeps one active session"
        return self._sessions[self._active_id]

    def _activate(self, session: _Session) -> None:
        for other in self._sessions.values():
            other.is_active = 0
        session.is_active = 1
        self._active_id = session.id

    def _create_session(
        self,
        name: str,
        provider: _Provider,
        model: str | None,
        external_id: str | None,
        created: datetime | None = None,
    ) -> _Session:
        session = _Session(
            id=self._next_session_id,
            name=name,
            provider=provider.key,
            model=model,
            external_session_id=external_id,
            created_at=self._ts_db(created),
            max_context=provider.max_context,
            reserved_tokens=self._rng.choice((0, 0, 0, 5000)),
        )
        self._next_session_id += 1
        self._sessions[session.id] = session
        self._activate(session)
        return session

    def _add_metric(self, session: _Session, tokens: int, at: datetime | None = None) -> JSON:
        preview = self._rng.choice(CONTENT_PREVIEWS)[:100]
        row: JSON = {
            "id": self._next_metric_id,
            "session_id": session.id,
            "timestamp": self._ts_db(at),
            "estimated_tokens": tokens,
            "percentage": tokens / session.max_context * 100,
            "content_preview": preview,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "is_estimated": 1,
            "source": "proxy",
            "memory_tokens": 0,
            "chat_tokens": 0,
            "memory_ratio": 0.0,
        }
        self._next_metric_id += 1
        session.metrics.append(row)
        session.messages += 2
        return row

    def _fill_usage(self, session: _Session, row: JSON) -> tuple[int, int, int]:
        """Usage came back: overwrite the estimate with the real total (as the server does)."""
        completion = self._rng.randint(80, 4000)
        prompt = max(1, row["estimated_tokens"] - self._rng.randint(0, 1500))
        total = prompt + completion
        row.update(
            estimated_tokens=total,
            percentage=total / session.max_context * 100,
            prompt_tokens=prompt,
            completion_tokens=completion,
            is_estimated=0,
        )
        session.context_tokens = total
        return prompt, completion, total

    @staticmethod
    def _stats(session: _Session) -> JSON:
        rows = session.metrics
        tokens = [r["estimated_tokens"] for r in rows]
        cum_in = sum(
            r["prompt_tokens"] if r["prompt_tokens"] > 0 else r["estimated_tokens"] for r in rows
        )
        cum_out = sum(r["completion_tokens"] for r in rows)
        return {
            "stats": {
                "total_requests": len(rows),
                "max_tokens": max(tokens) if tokens else None,
                "avg_tokens": sum(tokens) / len(tokens) if tokens else None,
                "current_input_tokens": cum_in,
                "current_output_tokens": cum_out,
                "current_total_tokens": cum_in + cum_out,
                "cumulative_input_tokens": cum_in,
                "cumulative_output_tokens": cum_out,
                "cumulative_total_tokens": cum_in + cum_out,
            }
        }

    def _bootstrap(self) -> None:
        """Some history: a few older sessions and an active one with 0-70 metric rows."""
        rng = self._rng
        now = self._utc()
        n_old = rng.randint(2, 4)
        for i in range(n_old):
            provider = rng.choice(PROVIDERS)
            created = now - timedelta(hours=(n_old - i) * 5, minutes=rng.randint(0, 59))
            name = rng.choice(
                (f"Session {provider.label} {created.strftime('%H:%M:%S')}", "Session par défaut")
            )
            model = None if name == "Session par défaut" else provider.model
            session = self._create_session(name, provider, model, None, created)
            for j in range(rng.randint(0, 4)):
                row = self._add_metric(
                    session, rng.randint(2000, 60000), created + timedelta(minutes=j)
                )
                self._fill_usage(session, row)
        provider = rng.choice(PROVIDERS)
        n_rows = rng.randint(0, 70)
        created = now - timedelta(minutes=n_rows + 5)
        active = self._create_session(
            f"Session {provider.label} {(created + self._offset).strftime('%H:%M:%S')}",
            provider,
            provider.model,
            rng.choice((None, f"cline-task-{rng.getrandbits(16):04x}")),
            created,
        )
        context = rng.randint(3000, 20000)
        for j in range(n_rows):
            context = min(context + rng.randint(500, 6000), int(active.max_context * 0.78))
            row = self._add_metric(
                active, context, created + timedelta(minutes=j, seconds=rng.randint(0, 59))
            )
            if rng.random() < 0.85:
                self._fill_usage(active, row)
        active.context_tokens = context

    # -- event generation ---------------------------------------------------------------------

    def _generate(self) -> list[JSON]:
        kinds = list(self._weights)
        weights = [self._weights[k] for k in kinds]
        while True:
            kind = self._rng.choices(kinds, weights)[0]
            frames: list[JSON] = getattr(self, f"_ev_{kind}")()
            if frames:
                return frames

    def _ev_request(self) -> list[JSON]:
        """One proxied streaming request: the frames the server emits, in its order."""
        rng = self._rng
        self._advance(0.5, 4.0)
        frames: list[JSON] = []
        session = self._active()
        if self._auto_session_enabled and rng.random() < 0.05:
            provider = rng.choice(PROVIDERS)
            external = rng.choice((None, f"cline-task-{rng.getrandbits(16):04x}"))
            session = self._create_session(
                f"Session {provider.label} {self._local_hms()}", provider, provider.model, external
            )
            session.context_tokens = rng.randint(2000, 15000)
            frames.append(
                {
                    "type": "auto_session_created",
                    "session": session.row(),
                    "provider": provider.key,
                    "model": provider.model,
                    "external_session_id": external,
                }
            )
        estimate = session.context_tokens + rng.randint(1500, 26000)
        percentage = estimate / session.max_context * 100
        if percentage > 100:
            # The upstream rejects it (HTTP 413); the user then trims the conversation.
            frames.append(self._context_limit_frame(session, estimate))
            session.context_tokens = int(session.max_context * rng.uniform(0.15, 0.45))
            return frames
        if (
            session.auto_compaction_enabled
            and percentage >= session.auto_compaction_threshold * 100
            and session.consecutive_auto_compactions < 3
            and rng.random() < 0.5
        ):
            # Auto-compaction broadcasts, then the request fails with 500: nothing follows.
            frames.append(self._compaction_frame(session, estimate))
            return frames
        row = self._add_metric(session, estimate)
        if rng.random() < 0.1:
            return frames  # non-streaming request: the row is saved but no frame says so
        prompt, completion, total = self._fill_usage(session, row)
        session.consecutive_auto_compactions = 0
        pct = total / session.max_context * 100
        frames.append(
            {
                "type": "metric_updated",
                "metric_id": row["id"],
                "session_id": session.id,
                "real_tokens": {
                    "total": total,
                    "prompt": prompt,
                    "completion": completion,
                    "percentage": pct,
                },
                "cumulative_tokens": total,
                "cumulative_percentage": pct,
                "alert": alert_for(pct),
                "source": "proxy",
            }
        )
        if rng.random() < 0.12:
            error_type = rng.choice(list(STREAMING_ERRORS))
            frames.append(
                {
                    "type": "streaming_error",
                    "session_id": session.id,
                    "metric_id": row["id"],
                    "error_type": error_type,
                    "error_message": STREAMING_ERRORS[error_type],
                    "timestamp": self._ts_local(),
                }
            )
        return frames

    def _compaction_frame(self, session: _Session, estimate: int) -> JSON:
        rng = self._rng
        original = estimate
        compacted = int(original * rng.uniform(0.3, 0.6))
        before = max(session.messages, 6)
        summarized = rng.randint(2, before - 2)
        after = before - summarized + 1
        history_id = self._next_history_id
        self._next_history_id += 1
        session.compaction_count += 1
        session.last_compaction_at = self._ts_db()
        session.consecutive_auto_compactions += 1
        session.context_tokens = compacted
        session.messages = after
        return {
            "type": "compaction_event",
            "session_id": session.id,
            "timestamp": self._ts_local(),
            "history_id": history_id,
            "compaction": {
                "compacted": True,
                "original_tokens": original,
                "compacted_tokens": compacted,
                "tokens_saved": original - compacted,
                "compaction_ratio": (original - compacted) / original * 100,
                "messages_before": before,
                "messages_after": after,
                "summarized_count": summarized,
            },
        }

    def _context_limit_frame(self, session: _Session | None, estimate: int) -> JSON:
        rng = self._rng
        provider = next(
            (p for p in PROVIDERS if session and p.key == session.provider), rng.choice(PROVIDERS)
        )
        max_context = session.max_context if session else provider.max_context
        actual = estimate + rng.randint(1000, 30000)
        if rng.random() < 0.6:
            error = dumps(
                {
                    "error": {
                        "message": f"Message exceeds context limit: {actual} > {max_context}",
                        "type": "invalid_request_error",
                    }
                }
            )
        else:
            error = (
                f"This model's maximum context length is {max_context} tokens. However, you "
                f"requested {actual} tokens. Please reduce the length of the messages."
            )
        return {
            "type": "provider_context_limit_error",
            "session_id": session.id if session else None,
            "error": error,
            "provider": provider.key,
            "model": (session.model if session and session.model else provider.model),
            "estimated_tokens": estimate,
            "max_context": max_context,
            "message": CONTEXT_LIMIT_MESSAGE,
        }

    def _ev_log_burst(self) -> list[JSON]:
        """One watcher poll: 1-12 ``log_metric`` frames from assorted sources."""
        rng = self._rng
        self._advance(0.5, 3.0)
        session = self._active()
        sources = [s[:3] for s in LOG_SOURCES]
        weights = [s[3] for s in LOG_SOURCES]
        frames: list[JSON] = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 6, 8, 12))):
            source, family, label = rng.choices(sources, weights)[0]
            prompt = completion = tools = system = 0
            context_length: int | None = None
            if family == "kimi_session":
                total = max(1, session.context_tokens + rng.randint(-3000, 3000))
                context_length = 262144
            elif source == "continue_compile_chat":
                tools = rng.randint(2000, 9000)
                system = rng.randint(1500, 6000)
                prompt = rng.randint(5000, 120000)
                total = prompt + tools + system
                context_length = rng.choice((131072, 262144))
            elif source.endswith("_error"):
                # Errors often report a total far above the limit (216 % was observed).
                total = rng.randint(100_000, 560_000)
                context_length = rng.choice((None, 262144))
            else:
                prompt = rng.randint(500, 90000)
                completion = rng.randint(0, 4000)
                total = prompt + completion
            if context_length is not None:
                self._sticky_context = context_length
            max_context = self._sticky_context or session.max_context
            frames.append(
                {
                    "type": "log_metric",
                    "source": source,
                    "source_family": family,
                    "source_label": label,
                    "metrics": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "tools_tokens": tools,
                        "system_message_tokens": system,
                        "total_tokens": total,
                        "context_length": context_length or max_context,
                        "max_context": max_context,
                        "percentage": total / max_context * 100,
                    },
                    "session_id": session.id,
                    "timestamp": self._ts_local(),
                }
            )
            self._advance(0.0005, 0.02)
        return frames

    def _ev_new_session(self) -> list[JSON]:
        rng = self._rng
        self._advance(5.0, 60.0)
        provider = rng.choice(PROVIDERS)
        name = rng.choice((*USER_SESSION_NAMES, f"Session {provider.label} {self._local_hms()}"))
        session = self._create_session(name, provider, provider.config_model, None)
        session.context_tokens = rng.randint(1000, 8000)
        return [
            {
                "type": "new_session",
                "session": {**session.row(), "max_context": session.max_context},
            }
        ]

    def _ev_activate(self) -> list[JSON]:
        inactive = [s for s in self._sessions.values() if not s.is_active]
        if not inactive:
            return []
        self._advance(2.0, 30.0)
        session = self._rng.choice(inactive)
        self._activate(session)
        return [{"type": "session_activated", "session_id": session.id, "session": session.row()}]

    def _ev_bulk_delete(self) -> list[JSON]:
        inactive = sorted(s.id for s in self._sessions.values() if not s.is_active)
        if not inactive:
            return []
        self._advance(2.0, 30.0)
        ids = sorted(self._rng.sample(inactive, self._rng.randint(1, min(3, len(inactive)))))
        for session_id in ids:
            del self._sessions[session_id]
        return [{"type": "sessions_bulk_deleted", "session_ids": ids, "deleted_count": len(ids)}]

    def _ev_reserved(self) -> list[JSON]:
        self._advance(1.0, 20.0)
        pool = list(self._sessions.values())
        session = self._active() if self._rng.random() < 0.85 else self._rng.choice(pool)
        session.reserved_tokens = self._rng.choice((0, 2000, 4096, 5000, 8192, 10000, 20000))
        return [
            {
                "type": "reserved_tokens_updated",
                "session_id": session.id,
                "reserved_tokens": session.reserved_tokens,
            }
        ]

    def _ev_toggle_compaction(self) -> list[JSON]:
        self._advance(1.0, 20.0)
        session = self._active()
        session.auto_compaction_enabled ^= 1
        return [
            {
                "type": "auto_compaction_toggled",
                "session_id": session.id,
                "enabled": bool(session.auto_compaction_enabled),
                "timestamp": self._ts_local(),
            }
        ]

    def _ev_toggle_auto_session(self) -> list[JSON]:
        self._advance(1.0, 20.0)
        self._auto_session_enabled = not self._auto_session_enabled
        return [
            {
                "type": "auto_session_toggled",
                "session_id": self._active().id,
                "enabled": self._auto_session_enabled,
            }
        ]

    def _ev_compression(self) -> list[JSON]:
        rng = self._rng
        self._advance(1.0, 20.0)
        session = self._active()
        before = session.messages
        original = max(session.context_tokens, 1)
        if before < 6 or rng.random() < 0.25:
            # e.g. "insufficient_messages": still broadcast, with compressed:false.
            compression: JSON = {
                "compressed": False,
                "original_tokens": original,
                "compressed_tokens": original,
                "tokens_saved": 0,
                "compression_ratio": 0.0,
                "messages_before": before,
                "messages_after": before,
            }
        else:
            compressed = int(original * rng.uniform(0.3, 0.7))
            after = rng.randint(3, max(3, before // 2))
            compression = {
                "compressed": True,
                "original_tokens": original,
                "compressed_tokens": compressed,
                "tokens_saved": original - compressed,
                "compression_ratio": round((original - compressed) / original * 100, 2),
                "messages_before": before,
                "messages_after": after,
            }
            session.context_tokens = compressed
            session.messages = after
        return [
            {
                "type": "compression_event",
                "session_id": session.id,
                "timestamp": self._ts_local(),
                "compression": compression,
            }
        ]

    def _ev_cline(self) -> list[JSON]:
        self._advance(5.0, 60.0)
        imported = self._rng.randint(1, 6)
        self._cline_count += imported
        self._cline_ts = max(
            self._cline_ts + self._rng.randint(1000, 60000),
            int(self._utc().timestamp() * 1000) - self._rng.randint(1000, 120000),
        )
        return [
            {
                "type": "cline_usage_updated",
                "latest_ts": self._cline_ts,
                "latest_count": self._cline_count,
                "imported_count": imported,
                "timestamp": self._ts_local(),
            }
        ]

    def _ev_context_limit(self) -> list[JSON]:
        self._advance(0.5, 10.0)
        session = self._active()
        estimate = int(session.max_context * self._rng.uniform(1.01, 1.3))
        # session_id is null when the server has no session; keep that case in the mix.
        target = None if self._rng.random() < 0.2 else session
        return [self._context_limit_frame(target, estimate)]

    def _ev_legacy(self) -> list[JSON]:
        """Types only old servers (or dead code) emit: clients must tolerate them."""
        rng = self._rng
        self._advance(0.5, 10.0)
        session = self._active()
        kind = rng.choice(LEGACY_TYPES)
        if kind == "metric":
            tokens = session.context_tokens + rng.randint(500, 8000)
            row = self._add_metric(session, tokens)
            pct = tokens / session.max_context * 100
            return [
                {
                    "type": "metric",
                    "metric": {
                        "id": row["id"],
                        "timestamp": self._ts_local(),
                        "estimated_tokens": tokens,
                        "cumulative_tokens": tokens + rng.randint(0, 50000),
                        "percentage": pct,
                        "content_preview": row["content_preview"],
                        "is_estimated": True,
                        "source": "proxy",
                    },
                    "session_id": session.id,
                    "session_updated": True,
                    "alert": alert_for(pct),
                    "sanitizer": None,
                    "mcp_memory": None,
                }
            ]
        if kind == "memory_metrics_update":
            memory = rng.randint(0, 5000)
            chat = rng.randint(1000, 60000)
            return [
                {
                    "type": "memory_metrics_update",
                    "session_id": session.id,
                    "timestamp": self._ts_local(),
                    "memory": {
                        "memory_tokens": memory,
                        "chat_tokens": chat,
                        "total_tokens": memory + chat,
                        "memory_ratio": round(memory / (memory + chat) * 100, 2),
                        "segment_count": rng.randint(0, 6),
                    },
                }
            ]
        if kind == "context_limit_violation":
            estimate = int(session.max_context * rng.uniform(1.0, 1.2))
            effective = int(session.max_context * 0.95)
            return [
                {
                    "type": "context_limit_violation",
                    "session_id": rng.choice((session.id, None)),
                    "violation": {
                        "violation": True,
                        "estimated_tokens": estimate,
                        "max_context": session.max_context,
                        "effective_limit": effective,
                        "violation_ratio": estimate / effective,
                        "excess_tokens": estimate - effective,
                        "recommendations": [
                            "Optimiser le prompt système",
                            "Réduire la longueur des messages utilisateur",
                        ],
                    },
                    "message": (
                        f"Requête trop volumineuse ({estimate:,} tokens) - "
                        "Optimiser le prompt système"
                    ),
                }
            ]
        if kind == "context_performance_alert":
            estimate = int(session.max_context * rng.uniform(0.75, 0.95))
            usage = estimate / session.max_context * 100
            system = rng.randint(2000, 9000)
            metrics = {
                "session_id": session.id,
                "estimated_tokens": estimate,
                "max_context": session.max_context,
                "usage_percentage": usage,
                "system_tokens": system,
                "history_tokens": estimate - system,
                "user_tokens": rng.randint(1000, estimate - system),
                "mcp_memory_tokens": 0,
                "timestamp": self._ts_local(),
            }
            message = (
                f"⚠️ CONTEXTE ÉLEVÉ: {estimate:,}/{session.max_context:,} tokens ({usage:.1f}%)"
            )
            return [
                {
                    "type": "context_performance_alert",
                    "session_id": session.id,
                    "alert": {
                        "level": "warning",
                        "color": "#f97316",
                        "message": message,
                        "recommendations": ["Considérer la compression du contexte"],
                        "metrics": metrics,
                    },
                    "metrics": metrics,
                    "message": f"Alerte contexte: warning - {message}",
                }
            ]
        if kind == "session_deleted":
            inactive = sorted(s.id for s in self._sessions.values() if not s.is_active)
            if not inactive:
                return []
            victim = rng.choice(inactive)
            del self._sessions[victim]
            return [{"type": "session_deleted", "session_id": victim}]
        if kind == "sanitizer_event":
            frame: JSON = {
                "type": "sanitizer_event",
                "session_id": session.id,
                "event": {
                    "type": "model_fallback",
                    "level": "warning",
                    "message": "Basculement automatique vers Kimi K2 Thinking",
                    "old_model": session.model,
                    "new_model": "nvidia/kimi-k2-thinking",
                    "old_context": 131072,
                    "new_context": 262144,
                    "prompt_tokens": rng.randint(100000, 130000),
                    "reason": f"Contexte dépassé ({rng.uniform(85, 99):.1f}%)",
                },
            }
            if rng.random() < 0.5:
                frame["timestamp"] = self._ts_local()  # the root monolith adds one
            return [frame]
        memories = [
            {
                "id": rng.randint(100, 9999),
                "type": rng.choice(("semantic", "episodic", "procedural")),
                "confidence": round(rng.uniform(0.5, 0.99), 2),
                "reason": "explicit preference statement",
            }
            for _ in range(rng.randint(1, 3))
        ]
        return [
            {
                "type": "auto_memory_stored",
                "session_id": session.id,
                "count": len(memories),
                "memories": memories,
            }
        ]


# ---------------------------------------------------------------------------------------------
# memory_* handlers: the server answers from five built-in mock memories (its DB read fails).
# ---------------------------------------------------------------------------------------------

_MOCK_MEMORIES: tuple[JSON, ...] = (
    {
        "id": "mem_001",
        "title": "Configuration FastAPI",
        "content": "Configuration du serveur FastAPI avec Uvicorn, middleware CORS, et routes API "
        "pour le proxy Kimi",
        "content_preview": "Configuration du serveur FastAPI avec Uvicorn...",
        "type": "configuration",
        "tokens": 156,
    },
    {
        "id": "mem_002",
        "title": "Architecture 5 Couches",
        "content": "Architecture en 5 couches: API → Services → Features → Proxy → Core avec "
        "dépendances unidirectionnelles",
        "content_preview": "Architecture en 5 couches: API → Services → Features...",
        "type": "architecture",
        "tokens": 234,
    },
    {
        "id": "mem_003",
        "title": "Token Counting Tiktoken",
        "content": "Utilisation de tiktoken pour le comptage précis des tokens avec encodage "
        "cl100k_base",
        "content_preview": "Utilisation de tiktoken pour le comptage précis...",
        "type": "technique",
        "tokens": 189,
    },
    {
        "id": "mem_004",
        "title": "WebSocket Manager",
        "content": "Gestionnaire WebSocket pour communication temps réel avec reconnexion "
        "automatique et diffusion d'événements",
        "content_preview": "Gestionnaire WebSocket pour communication temps réel...",
        "type": "communication",
        "tokens": 267,
    },
    {
        "id": "mem_005",
        "title": "MCP Phase 4 Integration",
        "content": "Intégration des 4 serveurs MCP Phase 4: Task Master, Sequential Thinking, Fast "
        "Filesystem, JSON Query",
        "content_preview": "Intégration des 4 serveurs MCP Phase 4...",
        "type": "integration",
        "tokens": 312,
    },
)


class SimilarityRequest(BaseModel):
    """Same constraints (and so the same validation messages) as the server's model."""

    reference_id: str | None = None
    reference_text: str | None = None
    method: str = Field(default="cosine", pattern="^(cosine|jaccard|levenshtein)$")
    threshold: float = Field(default=0.75, ge=0.5, le=1.0)
    limit: int = Field(default=20, ge=5, le=100)


def _compression_result(strategy: Any, threshold: Any) -> JSON:
    """The mock compression preview; execute returns the same shape."""
    memories = _MOCK_MEMORIES
    total = sum(m["tokens"] for m in memories)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        # The server's arithmetic fails and the service reports it inside `result`.
        return {
            "success": False,
            "current_count": 0,
            "projected_count": 0,
            "space_saved": "0 tokens",
            "preview": [],
            "compression_ratio": None,
            "error": f"unsupported threshold type: {type(threshold).__name__}",
        }
    if strategy == "token":
        small = [m for m in memories if m["tokens"] < threshold * 1000]
        projected = len(memories) - len(small) // 2
        saved = sum(m["tokens"] for m in small) // 2
        preview = [
            {
                "action": "fusionner",
                "items": f"{len(small)} petites mémoires",
                "tokens": saved,
                "preview": f"Fusion de {len(small)} mémoires < {threshold * 1000:.0f} tokens",
            }
        ]
    else:
        types = Counter(m["type"] for m in memories)
        dominant = types.most_common(1)[0][0]
        projected = max(2, len(memories) - len(types) + 1)
        saved = int(total * 0.25)
        preview = [
            {
                "action": "regrouper",
                "items": f"{len(types)} types de mémoires",
                "tokens": saved,
                "preview": f"Regroupement par similarité sémantique (type dominant: {dominant})",
            }
        ]
    return {
        "success": True,
        "current_count": len(memories),
        "projected_count": projected,
        "space_saved": f"{saved} tokens",
        "preview": preview,
        "compression_ratio": saved / total if total else 0,
        "error": None,
    }


def _words(text: str) -> list[str]:
    out = []
    for word in text.lower().split():
        clean = "".join(c for c in word if c.isalnum())
        if len(clean) > 2:
            out.append(clean)
    return out


def _similarity(method: str, a: str, b: str) -> float:
    if method == "jaccard":
        sa, sb = set(_words(a)), set(_words(b))
        if not sa or not sb:
            return 0.0
        return len(sa & sb) / len(sa | sb)
    if method == "cosine":
        ca, cb = Counter(_words(a)), Counter(_words(b))
        dot = sum(ca[w] * cb[w] for w in ca)
        norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(
            sum(v * v for v in cb.values())
        )
        return dot / norm if norm else 0.0
    # levenshtein, on the first 200 characters, normalised by the full length
    s1, s2 = a[:200], b[:200]
    prev = list(range(len(s2) + 1))
    for i, c1 in enumerate(s1, 1):
        cur = [i]
        for j, c2 in enumerate(s2, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (c1 != c2)))
        prev = cur
    longest = max(len(a), len(b))
    return 1.0 - prev[-1] / longest if longest else 1.0


def _similarity_result(req: SimilarityRequest) -> JSON:
    reference = req.reference_text
    if req.reference_id and not reference:
        reference = next(
            (m["content"] for m in _MOCK_MEMORIES if m["id"] == req.reference_id), None
        )
    base: JSON = {"method_used": req.method, "threshold_used": req.threshold}
    if not reference:
        return {
            "success": False,
            "results": [],
            "total_found": 0,
            **base,
            "error": "Texte de référence non trouvé",
        }
    results = []
    for memory in _MOCK_MEMORIES:
        score = _similarity(req.method, reference, memory["content"])
        if score >= req.threshold:
            created = datetime.now().isoformat(timespec="microseconds")
            results.append({**memory, "created_at": created, "similarity_score": round(score, 3)})
    results.sort(key=lambda r: r["similarity_score"], reverse=True)
    results = results[: req.limit]
    return {"success": True, "results": results, "total_found": len(results), **base, "error": None}


# ---------------------------------------------------------------------------------------------
# Hostile frames
# ---------------------------------------------------------------------------------------------


class HostileFrame(NamedTuple):
    kind: str
    payload: str | bytes
    # websockets' send(): None = str -> text frame, bytes -> binary frame; True = bytes as text.
    text: bool | None = None


HOSTILE_KINDS: tuple[str, ...] = (
    "invalid_json",
    "binary",
    "non_object",
    "missing_type",
    "bad_type",
    "unknown_type",
    "deep",
    "huge_number",
    "wrong_types",
    "surrogate",
    "oversized",
    "invalid_utf8",
)
# invalid_utf8 makes a conforming client fail the connection (1007), which no real server can
# cause, so it is opt-in.
DEFAULT_HOSTILE_KINDS: tuple[str, ...] = tuple(k for k in HOSTILE_KINDS if k != "invalid_utf8")


def _hostile(kind: str, rng: random.Random, oversize: int) -> HostileFrame:
    pick = rng.choice
    if kind == "invalid_json":
        return HostileFrame(
            kind,
            pick(
                (
                    '{"type":"log_metric","session_id":4',
                    "{'type': 'init'}",
                    '{"type":"metric_updated",}',
                    "not json at all",
                    "",
                    '{"type":"init"}{"type":"init"}',
                )
            ),
        )
    if kind == "binary":
        return HostileFrame(
            kind, pick((b'{"type":"log_metric","session_id":42}', rng.randbytes(64)))
        )
    if kind == "non_object":
        return HostileFrame(
            kind,
            pick(
                (
                    "[1,2,3]",
                    '"just a string"',
                    "42",
                    "null",
                    "true",
                    "NaN",
                    '[{"type":"log_metric"}]',
                )
            ),
        )
    if kind == "missing_type":
        return HostileFrame(
            kind, pick(('{"session_id":42,"metrics":{}}', '{"Type":"log_metric"}', "{}"))
        )
    if kind == "bad_type":
        return HostileFrame(
            kind,
            pick(
                (
                    '{"type":42}',
                    '{"type":null}',
                    '{"type":""}',
                    '{"type":["init"]}',
                    '{"type":{"x":1}}',
                )
            ),
        )
    if kind == "unknown_type":
        return HostileFrame(kind, '{"type":"brand_new_event_v9","session_id":42,"payload":{"x":1}}')
    if kind == "deep":
        depth = 20000  # beyond any recursive decoder's default limit
        return HostileFrame(
            kind, '{"type":"log_metric","metrics":' + "[" * depth + "]" * depth + "}"
        )
    if kind == "huge_number":
        return HostileFrame(
            kind,
            pick(
                (
                    '{"type":"metric_updated","metric_id":' + "9" * 5000 + ',"session_id":42}',
                    '{"type":"metric_updated","metric_id":1e999,"session_id":-1e999}',
                    '{"type":"log_metric","session_id":18446744073709551617,"metrics":{"total_tokens":1.7976931348623157e308}}',
                )
            ),
        )
    if kind == "wrong_types":
        return HostileFrame(
            kind,
            pick(
                (
                    '{"type":"metric_updated","metric_id":null,"session_id":"42","real_tokens":"lots","alert":5}',
                    '{"type":"init","session":[1,2],"stats":"none","recent_metrics":{}}',
                    '{"type":"log_metric","session_id":true,"metrics":null,"timestamp":12}',
                    '{"type":"sessions_bulk_deleted","session_ids":"37,38","deleted_count":"2"}',
                    '{"type":"new_session","session":"x"}',
                )
            ),
        )
    if kind == "surrogate":
        # Valid JSON and valid UTF-8, but decodes to a lone surrogate / NUL that breaks re-encoding.
        return HostileFrame(
            kind,
            pick(
                (
                    '{"type":"log_metric","source":"\\ud800"}',
                    '{"type":"log_metric","source":"a\\u0000b"}',
                )
            ),
        )
    if kind == "oversized":
        head = '{"type":"provider_context_limit_error","session_id":42,"error":"'
        return HostileFrame(kind, head + "x" * max(0, oversize - len(head) - 2) + '"}')
    if kind == "invalid_utf8":
        return HostileFrame(kind, b'{"type":"log_metric","source":"\xff\xfe"}', text=True)
    raise ValueError(f"unknown hostile kind {kind!r}; expected one of {HOSTILE_KINDS}")


def hostile_frames(
    n: int,
    seed: int | None = None,
    *,
    kinds: Sequence[str] | None = None,
    oversize: int = MIB + 1,
    rng: random.Random | None = None,
) -> list[HostileFrame]:
    """``n`` hostile frames; kinds are cycled in a shuffled order so that n >= len(kinds) covers
    every kind. ``oversize`` is the size of the "oversized" frame (default: 1 byte over 1 MiB,
    the websockets client's default ``max_size``)."""
    chosen = list(kinds if kinds is not None else DEFAULT_HOSTILE_KINDS)
    for kind in chosen:
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile kind {kind!r}; expected one of {HOSTILE_KINDS}")
    if not chosen:
        return []
    rng = rng or random.Random(seed)
    rng.shuffle(chosen)
    return [_hostile(kind, rng, oversize) for kind in itertools.islice(itertools.cycle(chosen), n)]


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    """One text message received from a client."""

    conn: int
    at: float  # epoch seconds
    text: str

    def as_dict(self) -> JSON:
        return {"conn": self.conn, "at": self.at, "text": self.text}


@dataclass
class SimStats:
    handshake_attempts: int = 0  # every HTTP request except /_sim control calls
    refused: int = 0
    accepted: int = 0
    open: int = 0
    frames_sent: int = 0  # per client: one broadcast to 3 clients counts 3
    hostile_sent: int = 0
    messages_received: int = 0  # text messages (all recorded in `received`)
    binary_received: int = 0  # each one dropped its connection
    handshake_times: list[float] = field(default_factory=list)  # epoch seconds, per attempt

    def as_dict(self) -> JSON:
        return asdict(self)


@dataclass
class Fault:
    mode: str
    params: JSON


@dataclass(eq=False)
class _Client:
    id: int
    conn: ServerConnection
    reading: asyncio.Event = field(default_factory=asyncio.Event)  # set = the read loop may run
    stalled: bool = False  # nothing is sent to it
    read_paused: bool = False  # we paused its transport
    keepalive_suspended: bool = False
    init_pending: bool = False  # it connected during a stall and never got its init

    def __post_init__(self) -> None:
        self.reading.set()


_TRUE = frozenset(("1", "true", "yes", "on"))


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value)


def _coerce(value: str) -> Any:
    """Query-string values: ints, floats and booleans become JSON-like values."""
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return value


def _is_loopback(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) and address else ""
    return host in ("127.0.0.1", "::1") or host.startswith(("127.", "::ffff:127."))


class SimBackend:
    """A controllable stand-in for the Kimi Proxy ``/ws`` endpoint (see the module docstring)."""

    BLAST_CHUNK = 4096  # frames pre-encoded at a time by blast()

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float | None = None,
        seed: int | None = None,
        record_path: Path | str | None = None,
        active_session: bool = True,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        max_size: int | None = 16 * MIB,
        close_timeout: float = 2.0,
        compression: str | None = "deflate",
        reply_delay: float = 0.0,
        scenario: Scenario | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.rate = rate or None
        self.seed = seed
        self.record_path = Path(record_path) if record_path is not None else None
        # When False, nothing is sent on connect (the shipped config: no active session).
        self.active_session = active_session
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_size = max_size
        self.close_timeout = close_timeout
        self.compression = compression
        self.reply_delay = reply_delay
        self.scenario = scenario or Scenario(seed, realtime=True)
        self.received: list[Received] = []
        self.stats = SimStats()
        self._fault: Fault | None = None
        self._clients: dict[int, _Client] = {}
        self._conn_ids = itertools.count(1)
        self._server: Server | None = None
        self._record_file: IO[str] | None = None
        self._emitter: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._hostile_rng = random.Random(None if seed is None else seed + 1)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> Self:
        """Listen. After a stop(), start() rebinds the same port so clients' URL stays valid."""
        if self._server is not None:
            raise RuntimeError("SimBackend already started")
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self._record_file = self.record_path.open("a", encoding="utf-8")
        port = self._port if self._port is not None else self._requested_port
        try:
            self._server = await serve(
                self._handler,
                self.host,
                port,
                process_request=self._process_request,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                max_size=self.max_size,
                close_timeout=self.close_timeout,
                compression=self.compression,
                logger=logging.getLogger("kimi_syncd.sim.ws"),
            )
        except BaseException:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None
            raise
        self._port = self._server.sockets[0].getsockname()[1]
        self._start_emitter()
        log.info("sim listening on %s", self.url)
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection (1001), aborting the ones that hang.
        The fault mode, counters and ``received`` are kept for a later start()."""
        server = self._server
        if server is None:
            return
        self._stopping = True
        tasks = [t for t in (self._emitter, *self._tasks) if t is not None]
        self._emitter = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()  # stop accepting; opening handshakes are answered 503
        for client in list(self._clients.values()):
            if client.read_paused:
                # A peer we are not reading from can't complete a closing handshake.
                client.conn.transport.abort()
        # Wake hung handshakes: with _stopping set they are answered 503.
        self._unstalled.set()
        await self._close_all(list(self._clients.values()), 1001)
        try:
            await asyncio.wait_for(server.wait_closed(), self.close_timeout + 1.0)
        except TimeoutError:
            log.warning("connections did not close in time: aborting them")
            for conn in [*server.connections, *(c.conn for c in self._clients.values())]:
                conn.transport.abort()
            await server.wait_closed()
        self._server = None
        self._stopping = False
        if self._fault is not None and self._fault.mode == "stall":
            self._unstalled.clear()
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None
        log.info("sim stopped")

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SimBackend not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/ws"

    @property
    def control_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/_sim"

    @property
    def fault(self) -> Fault | None:
        return self._fault

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    def set_rate(self, rate: float | None) -> None:
        """Change the automatic event rate (events per second; None/0 = none)."""
        self.rate = rate or None
        if self._emitter is not None:
            self._emitter.cancel()
            self._emitter = None
        if self._server is not None:
            self._start_emitter()

    def _start_emitter(self) -> None:
        if self.rate:
            self._emitter = asyncio.get_running_loop().create_task(self._emit_loop(self.rate))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- faults -------------------------------------------------------------------------------

    def set_fault(self, mode: str, **params: Any) -> Fault:
        """Switch to a fault mode (replacing any current one); see the module docstring."""
        fault = Fault(mode, self._validate_fault(mode, params))
        self.clear_fault()
        self._fault = fault
        if mode == "stall":
            self._unstalled.clear()
            for client in self._clients.values():
                self._stall(client)
        elif mode == "stop_reading":
            for client in self._clients.values():
                self._pause_reading(client)
        log.info("fault set: %s %s", mode, fault.params)
        return fault

    def clear_fault(self) -> None:
        """Back to normal: resume reading, keepalive and sends; send inits missed in a stall."""
        if self._fault is not None:
            log.info("fault cleared: %s", self._fault.mode)
        self._fault = None
        self._unstalled.set()
        for client in list(self._clients.values()):
            self._release(client)

    @staticmethod
    def _validate_fault(mode: str, params: JSON) -> JSON:
        def take(allowed: JSON) -> JSON:
            unknown = set(params) - set(allowed)
            if unknown:
                raise ValueError(f"unknown parameters for fault {mode!r}: {sorted(unknown)}")
            return {**allowed, **params}

        if mode == "refuse":
            out = take({"status": 503, "retry_after": None})
            out["status"] = int(out["status"])
            if not 400 <= out["status"] <= 599:
                raise ValueError("refuse: status must be an HTTP error status (400-599)")
            http.HTTPStatus(out["status"])  # ValueError for codes http.HTTPStatus lacks
            return out
        if mode == "accept_then_close":
            out = take({"delay": 0.0, "code": 1000})
            out["delay"] = float(out["delay"])
            if out["code"] != "abnormal":
                out["code"] = int(out["code"])
            return out
        if mode == "stall":
            out = take({"handshake": False})
            out["handshake"] = _as_bool(out["handshake"])
            return out
        if mode == "stop_reading":
            return take({})
        if mode == "malformed":
            out = take({"per_tick": 1, "kinds": list(DEFAULT_HOSTILE_KINDS), "oversize": MIB + 1})
            if isinstance(out["kinds"], str):
                out["kinds"] = [k for k in out["kinds"].split(",") if k]
            out["kinds"] = list(out["kinds"])
            for kind in out["kinds"]:
                if kind not in HOSTILE_KINDS:
                    raise ValueError(f"unknown hostile kind {kind!r}")
            out["per_tick"] = int(out["per_tick"])
            out["oversize"] = int(out["oversize"])
            return out
        raise ValueError(f"unknown fault mode {mode!r}; expected one of {FAULT_MODES}")

    @staticmethod
    def _suspend_keepalive(client: _Client) -> None:
        task = client.conn.keepalive_task
        if task is not None:
            task.cancel()
            client.conn.keepalive_task = None
            client.keepalive_suspended = True

    def _pause_reading(self, client: _Client) -> None:
        # Pausing the transport stops frames being parsed, so pings get no pong and the
        # client's sends fill the socket buffers. Our own pings would then time out and
        # close the connection, which is not what a hung peer does, so they stop too.
        if not client.read_paused:
            client.conn.transport.pause_reading()
            client.read_paused = True
        client.reading.clear()
        self._suspend_keepalive(client)

    def _stall(self, client: _Client) -> None:
        client.stalled = True
        self._pause_reading(client)

    def _release(self, client: _Client) -> None:
        client.stalled = False
        if client.read_paused:
            client.read_paused = False
            # websockets also pauses the transport when its receive queue is full; leave
            # that to its own flow control.
            if not client.conn.recv_messages.paused:
                client.conn.transport.resume_reading()
        client.reading.set()
        if client.keepalive_suspended:
            client.keepalive_suspended = False
            if client.conn.keepalive_task is None:
                client.conn.start_keepalive()
        if client.init_pending:
            client.init_pending = False
            if self.active_session:
                self._spawn(self._send(client, dumps(self.scenario.init_frame())))

    # -- handshake ----------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path == "/_sim" or parts.path.startswith("/_sim/"):
            return await self._control(conn, request, parts.path, parts.query)
        self.stats.handshake_attempts += 1
        self.stats.handshake_times.append(time.time())
        fault = self._fault
        if fault is not None and fault.mode == "refuse":
            self.stats.refused += 1
            return self._refusal(fault)
        if parts.path != "/ws":
            # Starlette refuses a WebSocket on an unknown route; uvicorn answers 403.
            return _http_response(403, b"", "text/plain")
        if fault is not None and fault.mode == "stall" and fault.params["handshake"]:
            # A backend hung before accept(): the TCP connection is up, the upgrade never comes.
            conn.transport.pause_reading()
            await self._unstalled.wait()
            conn.transport.resume_reading()
            if self._stopping:
                return _http_response(503, b"Server is shutting down.\n", "text/plain")
        return None

    @staticmethod
    def _refusal(fault: Fault) -> Response:
        status = http.HTTPStatus(fault.params["status"])
        extra: list[tuple[str, str]] = []
        retry_after = fault.params["retry_after"]
        if retry_after is not None:
            seconds = float(retry_after)
            extra.append(
                ("Retry-After", str(int(seconds)) if seconds.is_integer() else str(seconds))
            )
        body = dumps({"detail": status.phrase}).encode()
        return _http_response(status.value, body, "application/json", extra)

    # -- connection handling ------------------------------------------------------------------

    async def _handler(self, conn: ServerConnection) -> None:
        client = _Client(next(self._conn_ids), conn)
        self.stats.accepted += 1
        self.stats.open += 1
        log.info("conn %d open from %s", client.id, conn.remote_address)
        # However the connection ends, a read loop parked on `reading` must wake up to see it.
        watcher = asyncio.get_running_loop().create_task(self._wake_on_close(client))
        try:
            fault = self._fault
            if fault is not None and fault.mode == "stall":
                self._stall(client)
                client.init_pending = True
            elif self.active_session:
                # The init goes out before the client joins the broadcast set, so it is first.
                await self._send(client, dumps(self.scenario.init_frame()))
            self._clients[client.id] = client
            fault = self._fault
            if fault is not None and fault.mode == "stop_reading":
                self._pause_reading(client)
            if fault is not None and fault.mode == "accept_then_close":
                self._spawn(self._close_later(client, fault.params["delay"], fault.params["code"]))
            if not self._stopping:
                await self._read_loop(client)
        except ConnectionClosed:
            pass
        finally:
            watcher.cancel()
            self._clients.pop(client.id, None)
            self.stats.open -= 1
            log.info("conn %d closed (%s)", client.id, conn.close_code)

    @staticmethod
    async def _wake_on_close(client: _Client) -> None:
        await client.conn.wait_closed()
        client.reading.set()

    async def _close_later(self, client: _Client, delay: float, code: int | str) -> None:
        await asyncio.sleep(delay)
        if code == "abnormal":
            client.conn.transport.abort()
        else:
            await client.conn.close(int(code))

    async def _read_loop(self, client: _Client) -> None:
        conn = client.conn
        while True:
            await client.reading.wait()
            message = await conn.recv()
            # A message already buffered when reading was paused waits for the resume.
            await client.reading.wait()
            if isinstance(message, bytes):
                # Starlette's receive_text() fails on a binary frame and the socket is dropped
                # without a close frame; the client sees 1006.
                self.stats.binary_received += 1
                log.info("conn %d sent a binary frame: dropping the TCP connection", client.id)
                conn.transport.abort()
                return
            self._record(client.id, message)
            try:
                await self._dispatch(client, message)
            except ConnectionClosed:
                raise
            except Exception:  # the server logs and swallows handler errors
                log.exception("conn %d: error handling a message", client.id)

    def _record(self, conn_id: int, text: str) -> None:
        record = Received(conn_id, time.time(), text)
        self.received.append(record)
        self.stats.messages_received += 1
        if self._record_file is not None:
            self._record_file.write(dumps(record.as_dict()) + "\n")
            self._record_file.flush()

    async def _dispatch(self, client: _Client, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            log.info("conn %d: invalid JSON ignored", client.id)
            return
        if not isinstance(data, dict):
            log.info("conn %d: non-object JSON ignored", client.id)
            return
        kind = data.get("type")
        if kind not in (
            "memory_compress_preview",
            "memory_compress_execute",
            "memory_similarity_search",
        ):
            log.info("conn %d: unknown message type %r ignored", client.id, kind)
            return
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        request_id = data.get("requestId")
        if kind == "memory_compress_preview":
            result = _compression_result(data.get("strategy", "token"), data.get("threshold", 0.3))
            reply: JSON = {
                "type": "memory_compress_preview_response",
                "requestId": request_id,
                "result": result,
            }
        elif kind == "memory_compress_execute":
            strategy, threshold = data.get("strategy", "token"), data.get("threshold", 0.3)
            if not data.get("dryRun", False):
                # Broadcast to everyone before the requester's own reply, as observed.
                await self.broadcast(
                    {
                        "type": "memory_compression_completed",
                        "strategy": strategy,
                        "threshold": threshold,
                        "memories_processed": len(_MOCK_MEMORIES),
                        "timestamp": datetime.now().isoformat(timespec="microseconds"),
                    }
                )
            reply = {
                "type": "memory_compress_result_response",
                "requestId": request_id,
                "result": _compression_result(strategy, threshold),
            }
        else:
            payload = data.get("payload", {})
            try:
                if not isinstance(payload, dict):
                    raise TypeError(
                        f"argument after ** must be a mapping, not {type(payload).__name__}"
                    )
                req = SimilarityRequest(**payload)
            except (ValidationError, TypeError) as exc:
                reply = {
                    "type": "memory_similarity_result_response",
                    "requestId": request_id,
                    "error": str(exc),
                }
            else:
                reply = {
                    "type": "memory_similarity_result_response",
                    "requestId": request_id,
                    "result": _similarity_result(req),
                }
        await self._send(client, dumps(reply))

    # -- sending ------------------------------------------------------------------------------

    async def _send(self, client: _Client, payload: str | bytes, text: bool | None = None) -> bool:
        if client.stalled:
            return False
        try:
            await client.conn.send(payload, text=text)
        except ConnectionClosed:
            return False
        except Exception:  # the server drops a socket whose send fails, silently
            log.debug("conn %d: send failed", client.id, exc_info=True)
            return False
        self.stats.frames_sent += 1
        return True

    async def _send_all(self, payload: str | bytes, text: bool | None = None) -> int:
        sent = 0
        # Iterate over a copy: the real server's "set changed size" race is not worth copying.
        for client in list(self._clients.values()):
            sent += await self._send(client, payload, text)
        return sent

    async def broadcast(self, frame: JSON | str) -> int:
        """Send a frame (dict: compact JSON; str: as is) to every client; returns the count."""
        return await self._send_all(frame if isinstance(frame, str) else dumps(frame))

    async def inject(self, frame: str | bytes, *, text: bool | None = None) -> int:
        """Send one raw frame to every client (bytes = binary frame unless ``text=True``)."""
        return await self._send_all(frame, text)

    async def step(self, events: int = 1) -> list[JSON]:
        """Broadcast the next ``events`` scenario events now; returns their frames."""
        frames: list[JSON] = []
        for _ in range(events):
            for frame in self.scenario.next_event():
                frames.append(frame)
                await self.broadcast(frame)
        return frames

    async def send_hostile(
        self,
        n: int,
        seed: int | None = None,
        *,
        kinds: Sequence[str] | None = None,
        oversize: int = MIB + 1,
    ) -> list[str]:
        """Send ``n`` hostile frames to every client; returns their kinds in order."""
        rng = random.Random(seed) if seed is not None else self._hostile_rng
        frames = hostile_frames(n, kinds=kinds, oversize=oversize, rng=rng)
        for frame in frames:
            await self._send_all(frame.payload, frame.text)
            self.stats.hostile_sent += 1
        return [f.kind for f in frames]

    async def drop_all(self, abnormal: bool = False, code: int = 1000) -> int:
        """Close every connection: a close frame with ``code``, or (abnormal) a TCP abort."""
        clients = list(self._clients.values())
        if abnormal:
            for client in clients:
                client.conn.transport.abort()
            return len(clients)
        for client in clients:
            # A client we are not reading from could not answer the closing handshake.
            if client.read_paused:
                client.read_paused = False
                client.conn.transport.resume_reading()
        await self._close_all(clients, code)
        return len(clients)

    async def _close_all(self, clients: list[_Client], code: int) -> None:
        """Close with a close frame; abort whatever has not closed after ``close_timeout``.
        websockets' close() waits for the write buffer to drain without a timeout, so a peer
        that stopped reading would otherwise hang it forever."""
        tasks = [asyncio.ensure_future(c.conn.close(code)) for c in clients]
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=self.close_timeout)
        for client in clients:
            if client.conn.state is not State.CLOSED:
                client.conn.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def blast(self, n: int, size: int = 300) -> int:
        """Send ``n`` distinct, realistic frames of about ``size`` bytes to every client as fast
        as possible; returns the number of frames sent (summed over clients).

        Frames are pre-encoded to UTF-8 in chunks of ``BLAST_CHUNK`` (shared by all clients,
        so memory stays bounded for huge ``n``), then sent chunk by chunk to all clients
        concurrently. The type follows the size: cline_usage_updated (< 200), metric_updated
        with an alert (< 330), log_metric (< 450), else provider_context_limit_error with a
        padded upstream error. Blast frames are not added to the scenario's model."""
        make = self._blast_factory(n, size)
        clients = [c for c in self._clients.values() if not c.stalled]
        total = 0

        async def pump(client: _Client, chunk: list[bytes]) -> int:
            send = client.conn.send
            done = 0
            try:
                for payload in chunk:
                    await send(payload, text=True)
                    done += 1
            except ConnectionClosed:
                pass
            finally:
                self.stats.frames_sent += done
            return done

        for start in range(0, n, self.BLAST_CHUNK):
            if not clients:
                break
            chunk = [make(i) for i in range(start, min(n, start + self.BLAST_CHUNK))]
            counts = await asyncio.gather(*(pump(c, chunk) for c in clients))
            total += sum(counts)
            clients = [c for c, k in zip(clients, counts, strict=True) if k == len(chunk)]
        return total

    def _blast_factory(self, n: int, size: int) -> Callable[[int], bytes]:
        """A function building blast frame ``i`` (0 <= i < n) from a template near ``size``."""
        session_id = self.scenario.active_session_id or 0
        first = self.scenario.reserve_metric_ids(n)
        stamp = datetime.now().replace(microsecond=0).isoformat()
        if size < 200:
            base = int(time.time() * 1000)

            def cline(i: int) -> bytes:
                return (
                    f'{{"type":"cline_usage_updated","latest_ts":{base + i},'
                    f'"latest_count":{1000 + i},'
                    f'"imported_count":1,"timestamp":"{stamp}.{i % 1_000_000:06d}"}}'
                ).encode()

            return cline
        if size < 330:
            alerts = [dumps(alert_for(p)) for p in (80, 90, 95)]

            def metric_updated(i: int) -> bytes:
                pct = 80.0 + (i % 200) / 10 + (i % 97) / 10000
                total = int(262144 * pct / 100)
                alert = alerts[0] if pct < 90 else alerts[1] if pct < 95 else alerts[2]
                return (
                    f'{{"type":"metric_updated","metric_id":{first + i},'
                    f'"session_id":{session_id},"real_tokens":{{"total":{total},'
                    f'"prompt":{total - 1500},"completion":1500,'
                    f'"percentage":{pct!r}}},"cumulative_tokens":{total},'
                    f'"cumulative_percentage":{pct!r},"alert":{alert},"source":"proxy"}}'
                ).encode()

            return metric_updated
        if size < 450:

            def log_metric(i: int) -> bytes:
                total = 20000 + (i * 37) % 200000
                pct = total / 262144 * 100
                return (
                    '{"type":"log_metric","source":"kimi_session_usage",'
                    '"source_family":"kimi_session","source_label":"Session Kimi",'
                    '"metrics":{"prompt_tokens":0,"completion_tokens":0,'
                    f'"tools_tokens":0,"system_message_tokens":0,"total_tokens":{total},'
                    f'"context_length":262144,"max_context":262144,"percentage":{pct!r}}},'
                    f'"session_id":{session_id},"timestamp":"{stamp}.{i % 1_000_000:06d}"}}'
                ).encode()

            return log_metric
        # Larger: provider_context_limit_error, whose upstream error text is unbounded.
        head: JSON = {
            "type": "provider_context_limit_error",
            "session_id": session_id,
            "error": "",
            "provider": "nvidia",
            "model": "moonshotai/kimi-k2.5",
            "estimated_tokens": 270000,
            "max_context": 262144,
            "message": CONTEXT_LIMIT_MESSAGE,
        }
        padding = "x" * max(0, size - len(dumps(head).encode()) - 60)

        def context_error(i: int) -> bytes:
            frame = {
                **head,
                "estimated_tokens": 270000 + i,
                "error": f"Message exceeds context limit: {270000 + i} > 262144. {padding}",
            }
            return dumps(frame).encode()

        return context_error

    # -- automatic emission -------------------------------------------------------------------

    async def _emit_loop(self, rate: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        deadline = loop.time()
        while True:
            deadline += interval
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                deadline = loop.time()  # fell behind: keep the rate, don't burst to catch up
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("emission tick failed")

    async def _tick(self) -> None:
        for frame in self.scenario.next_event():
            await self.broadcast(frame)
        fault = self._fault
        if fault is not None and fault.mode == "malformed":
            await self.send_hostile(
                fault.params["per_tick"],
                kinds=fault.params["kinds"],
                oversize=fault.params["oversize"],
            )

    # -- HTTP control -------------------------------------------------------------------------

    def snapshot(self) -> JSON:
        """Everything /_sim/stats reports."""
        fault = self._fault
        return {
            **self.stats.as_dict(),
            "url": self.url if self._port is not None else None,
            "rate": self.rate,
            "active_session": self.active_session,
            "active_session_id": self.scenario.active_session_id,
            "fault": None if fault is None else {"mode": fault.mode, "params": fault.params},
            "received": len(self.received),
            "clients": [
                {
                    "id": c.id,
                    "remote": list(c.conn.remote_address)[:2],
                    "stalled": c.stalled,
                    "read_paused": c.read_paused,
                }
                for c in self._clients.values()
            ],
        }

    async def _control(
        self, conn: ServerConnection, request: Request, path: str, query: str
    ) -> Response:
        if not _is_loopback(conn.remote_address):
            return _json_response(403, {"error": "control endpoints are loopback-only"})
        if request.method not in ("GET", "POST"):
            return _json_response(
                405, {"error": "use GET or POST (parameters in the query string)"}
            )
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        name = path.removeprefix("/_sim").strip("/")
        try:
            return await self._control_action(name, q)
        except (ValueError, TypeError, KeyError) as exc:
            return _json_response(400, {"error": str(exc)})

    async def _control_action(self, name: str, q: dict[str, str]) -> Response:
        if name == "stats":
            return _json_response(200, self.snapshot())
        if name == "received":
            since = int(q.get("since", "0"))
            return _json_response(200, [r.as_dict() for r in self.received[since:]])
        if name == "fault":
            mode = q.pop("mode", "")
            if mode.lower() in ("", "none", "null", "clear"):
                self.clear_fault()
                return _json_response(200, {"fault": None})
            params = {k: _coerce(v) for k, v in q.items()}
            if "kinds" in q:
                params["kinds"] = q["kinds"]  # comma-separated, keep it a string
            fault = self.set_fault(mode, **params)
            return _json_response(200, {"fault": {"mode": fault.mode, "params": fault.params}})
        if name == "emit":
            if "raw" in q:
                return _json_response(200, {"sent": await self.broadcast(q["raw"])})
            decoded = json.loads(q["frame"])
            frames = decoded if isinstance(decoded, list) else [decoded]
            sent = 0
            for frame in frames:
                sent += await self.broadcast(frame if isinstance(frame, dict) else dumps(frame))
            return _json_response(200, {"frames": len(frames), "sent": sent})
        if name == "drop":
            abnormal = _as_bool(q.get("abnormal", "0"))
            count = len(self._clients)
            # In the background: a clean close waits for the peers' replies.
            self._spawn(self.drop_all(abnormal=abnormal, code=int(q.get("code", "1000"))))
            return _json_response(200, {"dropping": count, "abnormal": abnormal})
        if name == "blast":
            n, size = int(q.get("n", "1000")), int(q.get("size", "300"))
            # In the background: the control request itself is bound by the handshake timeout.
            self._spawn(self.blast(n, size))
            return _json_response(
                202, {"scheduled": n, "size": size, "clients": len(self._clients)}
            )
        if name == "step":
            return _json_response(200, {"frames": await self.step(int(q.get("n", "1")))})
        if name == "hostile":
            seed = q.get("seed")
            kinds = q["kinds"].split(",") if q.get("kinds") else None
            kinds_sent = await self.send_hostile(
                int(q.get("n", "1")),
                None if seed is None else int(seed),
                kinds=kinds,
                oversize=int(q.get("oversize", str(MIB + 1))),
            )
            return _json_response(200, {"kinds": kinds_sent})
        if name == "rate":
            rate = float(q.get("rate", "0"))
            self.set_rate(rate)
            return _json_response(200, {"rate": self.rate})
        return _json_response(404, {"error": f"unknown control endpoint /_sim/{name}"})


def _http_response(
    status: int, body: bytes, content_type: str, extra: Iterable[tuple[str, str]] = ()
) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            *extra,
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _json_response(status: int, obj: Any) -> Response:
    return _http_response(status, dumps(obj).encode(), "application/json")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kimi-syncd-sim",
        description="Simulated Kimi Proxy /ws backend (control it over HTTP at /_sim/*).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = ephemeral)")
    p.add_argument("--rate", type=float, default=2.0, help="scenario events per second (0 = none)")
    p.add_argument("--seed", type=int, default=None, help="scenario seed")
    p.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="FILE",
        help="append received messages as JSONL",
    )
    p.add_argument("--no-active-session", action="store_true", help="send no init on connect")
    p.add_argument(
        "--ping-interval", type=float, default=20.0, help="keepalive ping interval (0 = off)"
    )
    p.add_argument("--fault", choices=FAULT_MODES, default=None, help="start with this fault mode")
    p.add_argument("--status", type=int, default=None, help="refuse: HTTP status")
    p.add_argument("--retry-after", type=float, default=None, help="refuse: Retry-After seconds")
    p.add_argument("--delay", type=float, default=None, help="accept_then_close: seconds")
    p.add_argument("--code", default=None, help="accept_then_close: close code or 'abnormal'")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def _fault_params(args: argparse.Namespace) -> JSON:
    params: JSON = {}
    if args.fault == "refuse":
        if args.status is not None:
            params["status"] = args.status
        if args.retry_after is not None:
            params["retry_after"] = args.retry_after
    elif args.fault == "accept_then_close":
        if args.delay is not None:
            params["delay"] = args.delay
        if args.code is not None:
            params["code"] = args.code if args.code == "abnormal" else int(args.code)
    return params


async def _run(args: argparse.Namespace) -> int:
    # Handlers first, so a signal that arrives during start-up still stops us cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = SimBackend(
        host=args.host,
        port=args.port,
        rate=args.rate,
        seed=args.seed,
        record_path=args.record,
        active_session=not args.no_active_session,
        ping_interval=args.ping_interval or None,
    )
    try:
        try:
            await sim.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
            return 1
        if args.fault:
            sim.set_fault(args.fault, **_fault_params(args))
        print(f"kimi-syncd-sim listening on {sim.url}", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLogger().level > logging.DEBUG:
        # websockets logs every HTTP exchange at INFO, control calls included: too chatty.
        logging.getLogger("kimi_syncd.sim.ws").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
