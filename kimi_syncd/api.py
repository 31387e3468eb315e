"""The local API: HTTP/1.1 + JSON on a Unix socket (aiohttp), like Docker's or snapd's.

`curl --unix-socket PATH http://kimi/v1/status` just works. Reads are open to whoever can
reach the socket (its file mode decides); writes need the daemon's uid, root, or membership
of `api.write_group`, checked with the caller's peer credentials (SO_PEERCRED). Requests
carrying `Origin` are refused, so no web page can ever reach the daemon. Every error is
`{"error": {"code", "message"}}` with a fitting status; bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import socket
import sqlite3
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from kimi_syncd import __version__, gauge
from kimi_syncd.errors import EX_CANTCREAT, FatalError
from kimi_syncd.store import (
    IdempotencyConflict,
    NewMessage,
    OutboxFull,
    Store,
    StoreUnavailable,
    Subscription,
)
from kimi_syncd.store.reader import event_dict
from kimi_syncd.store.writer import OUTBOX_STATES, Committed
from kimi_syncd.timefmt import iso

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13
MAX_PAGE = 10_000
MAX_IDEMPOTENCY_KEY = 200
MAX_TEXT_PARAM = 200
MAX_ID = 2**63 - 1  # SQLite INTEGER
NDJSON = "application/x-ndjson"
CATCH_UP_PAGE = 1000
STALL_POLL = 0.5  # how often a blocked follow write checks whether its reader was cut off
_ID = re.compile(r"-?[0-9]{1,19}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]+")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StatusProvider = Callable[[], dict[str, Any]]

# The status pinned when the daemon has no link (yet): the shape never changes.
NO_LINK: dict[str, Any] = {
    "state": "stopped",
    "url": None,
    "since": None,
    "last_error": None,
    "rtt_ms": None,
    "breaker": {"state": "closed", "failures": 0, "next_attempt_at": None},
}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if "Origin" in request.headers:
            raise ApiError(
                403, "origin_refused", "requests from web pages (with an Origin header) are refused"
            )
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        message = exc.text or exc.reason
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        if exc.status == 404:
            message = (
                f"no such endpoint: {request.method} {request.path} "
                "(see /v1/status, /v1/sessions, /v1/events, /v1/outbox, /metrics)"
            )
        elif exc.status == 405:
            message = (
                f"{request.method} is not allowed on {request.path}; "
                f"allowed: {exc.headers.get('Allow', '')}"
            )
        elif exc.status == 413:
            message = f"request body too large (api.max_body_bytes): {exc.text}"
        return error_response(exc.status, code, message, headers)
    except StoreUnavailable as exc:
        status = 507 if exc.code == "disk_full" else 503
        return error_response(status, exc.code, str(exc))
    except sqlite3.Error as exc:
        log.warning("database error serving %s %s: %s", request.method, request.path, exc)
        return error_response(503, "store_unavailable", f"the database failed: {exc}")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        api = request.app.get(API_KEY)
        if api is not None and not api.writer.running:
            # The store was closed or stopped under us (shutdown, fatal database error).
            return error_response(503, "store_unavailable", "the store is not running")
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (logged by the daemon)")


# -- peer credentials ------------------------------------------------------------------


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of the Unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:  # the caller hung up already
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(request: web.Request) -> set[int]:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return set()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
    except OSError:
        return set()
    count = len(raw) // 4
    return set(struct.unpack(f"{count}I", raw[: count * 4]))


class Access:
    """Who may write: root, the daemon's uid, members of the configured group."""

    def __init__(self, write_group: str | None) -> None:
        self.write_group = write_group
        self.write_gid: int | None = None
        if write_group:
            try:
                self.write_gid = grp.getgrnam(write_group).gr_gid
            except KeyError:
                if write_group.isdigit():
                    self.write_gid = int(write_group)
                else:
                    log.warning(
                        "api.write_group %r does not exist; only root and uid %d may write",
                        write_group,
                        os.geteuid(),
                    )

    def may_write(self, request: web.Request) -> tuple[bool, int | None]:
        creds = peer_credentials(request)
        if creds is None:
            return False, None
        _pid, uid, gid = creds
        if uid in (0, os.geteuid()):
            return True, uid
        if self.write_gid is not None:
            if gid == self.write_gid or self.write_gid in peer_groups(request):
                return True, uid
            with contextlib.suppress(KeyError):
                name = pwd.getpwuid(uid).pw_name
                if name in grp.getgrgid(self.write_gid).gr_mem:
                    return True, uid
        return False, uid

    def require_write(self, request: web.Request) -> int | None:
        ok, uid = self.may_write(request)
        if not ok:
            how = (
                f"add the user to group {self.write_group!r} (api.write_group)"
                if self.write_group
                else "set api.write_group to a group of trusted users"
            )
            raise ApiError(
                403,
                "forbidden",
                f"uid {uid} may read but not write; run as uid {os.geteuid()} or root, or {how}",
            )
        return uid


# -- query parsing -----------------------------------------------------------------------


def _int_param(
    request: web.Request, name: str, default: int | None, *, lo: int = 0, hi: int = 2**62
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, "bad_parameter", f"{name} must be between {lo} and {hi}")
    return value


def _bool_param(request: web.Request, name: str, default: bool | None) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, "bad_parameter", f"{name} must be true or false, got {raw!r}")


def _float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value <= 10 * 365 * 86400:
        raise ApiError(400, "bad_parameter", f"{name} must be between 0 and 10 years")
    return value


def _text_param(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_TEXT_PARAM or not _encodable(raw):
        raise ApiError(
            400, "bad_parameter", f"{name} must be valid UTF-8, at most {MAX_TEXT_PARAM} characters"
        )
    return raw


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from a JSON "\ud800" escape)
        return False
    return True


def _path_id(request: web.Request, what: str) -> int:
    """A numeric path segment: ASCII digits within SQLite's INTEGER range, else 400."""
    raw = request.match_info["id"]
    if not _ID.fullmatch(raw) or not -MAX_ID <= int(raw) <= MAX_ID:
        raise ApiError(400, "bad_parameter", f"{what} id must be an integer, got {raw[:40]!r}")
    return int(raw)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _message_from_json(text: str, where: str) -> tuple[str, str]:
    """Validate one outbox message; return (type, compact body)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_message", f"{where}: a message must be a JSON object")
    type_ = value.get("type")
    if not isinstance(type_, str) or not type_:
        raise ApiError(400, "bad_message", f"{where}: a message needs a non-empty string 'type'")
    try:
        body = _dumps(value)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_message", f"{where}: {exc}") from None
    if not _encodable(body):
        raise ApiError(
            400, "bad_json", f"{where}: contains a lone UTF-16 surrogate (\\ud800-\\udfff)"
        )
    return type_, body


def _json_text(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


def outbox_dict(row: Any) -> dict[str, Any]:
    try:
        body: Any = json.loads(row["body"])
    except ValueError:
        body = row["body"]
    return {
        "id": row["id"],
        "type": row["type"],
        "state": row["state"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "sent_at": iso(row["sent_at"]),
        "delivered_at": iso(row["delivered_at"]),
        "expires_at": iso(row["expires_at"]),
        "connection_id": row["conn_id"],
        "caller_uid": row["caller_uid"],
        "idempotency_key": row["idem_key"],
        "size": row["size"],
        "body": body,
    }


# -- the application -----------------------------------------------------------------------


class Api:
    def __init__(
        self,
        store: Store,
        *,
        max_body_bytes: int,
        write_group: str | None,
        default_ttl: float,
        follow_buffer: int,
        heartbeat: float,
        status: StatusProvider,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.store = store
        self.writer = store.writer
        self.reader = store.reader
        self.access = Access(write_group)
        self.default_ttl = default_ttl
        self.follow_buffer = follow_buffer
        self.heartbeat = heartbeat
        self.status_provider = status
        self.metrics = metrics
        self.started = time.time()
        # A follower whose writes stay blocked this long after it overflowed is dropped.
        self.stall_cut_off = 10.0
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors])
        self.app[API_KEY] = self
        self.app.router.add_get("/v1/health", self.health)
        self.app.router.add_get("/v1/status", self.status)
        self.app.router.add_get("/v1/sessions", self.sessions)
        self.app.router.add_get("/v1/sessions/active", self.session_active)
        self.app.router.add_get("/v1/sessions/{id}", self.session)
        self.app.router.add_get("/v1/gauge", self.gauge)
        self.app.router.add_get("/v1/events", self.events)
        self.app.router.add_post("/v1/outbox", self.enqueue)
        self.app.router.add_get("/v1/outbox", self.outbox_list)
        self.app.router.add_get("/v1/outbox/{id}", self.outbox_get)
        self.app.router.add_delete("/v1/outbox/{id}", self.outbox_cancel)
        self.app.router.add_get("/v1/connections", self.connections)
        self.app.router.add_post("/v1/rebuild", self.rebuild)
        self.app.router.add_get("/metrics", self.prometheus)
        # No catch-all route: aiohttp's own 404 / 405 (with Allow) reach `json_errors`.
        self.followers: set[web.StreamResponse] = set()

    def _writable(self) -> None:
        """Refuse writes at once when the store is closed (they would wait forever)."""
        w = self.writer
        if w.fault is not None:
            raise StoreUnavailable(w.fault, w.fault_code or "store_unavailable")
        if not w.running:
            raise StoreUnavailable(
                f"the store is not running{f': {w.fatal}' if w.fatal else ''}",
                "store_failed" if w.fatal is not None else "store_unavailable",
            )

    # -- read endpoints --------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        fault = self.writer.fault
        if fault is None and not self.writer.running:
            fault = "store not running"
        body = {"ok": fault is None, "version": __version__, "store": fault or "ok"}
        return web.json_response(body, status=200 if fault is None else 503)

    def status_dict(self) -> dict[str, Any]:
        w = self.writer
        status = self.status_provider()
        counters = w.committed_global.get("counters", {})
        total_events = w.last_seq - w.first_seq + 1 if w.first_seq else 0
        out: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "link": status.get("link") or NO_LINK,
            "active_session_id": w.state.active_session_id,
            "events": {
                "total": sum(counters.values()) if isinstance(counters, dict) else None,
                "stored": max(total_events, 0),
                "first_seq": w.first_seq,
                "last_seq": w.last_seq,
                "by_type": counters,
            },
            "rejected": {
                "total": sum(w.rejected_by_reason.values()),
                "by_reason": dict(w.rejected_by_reason),
            },
            "outbox": {
                "pending": w.outbox.pending,
                "pending_bytes": w.outbox.pending_bytes,
                "oldest_pending_age_s": None,
                "by_state": dict(w.outbox.by_state),
            },
            "db": {
                "path": str(self.store.db_path),
                "size_bytes": self.reader.size_bytes(),
                "fault": w.fault,
                "ingest_queue": w.ingest_depth,
            },
            "sessions": len(w.committed_sessions),
        }
        out.update({k: v for k, v in status.items() if k != "link"})
        return out

    async def status(self, request: web.Request) -> web.StreamResponse:
        out = self.status_dict()
        if self.writer.outbox.pending:
            created = await self.reader.oldest_pending_created_at()
            if created is not None:
                out["outbox"]["oldest_pending_age_s"] = round(max(time.time() - created, 0), 3)
        return web.json_response(out)

    def _session_texts(self, *, active: bool | None, include_deleted: bool) -> list[str]:
        committed = self.writer.committed_sessions
        items = []
        for sid in sorted(committed.texts):
            is_active, is_deleted = committed.flags[sid]
            if is_deleted and not include_deleted:
                continue
            if active is not None and is_active != active:
                continue
            items.append(committed.texts[sid])
        return items

    async def sessions(self, request: web.Request) -> web.StreamResponse:
        active = _bool_param(request, "active", None)
        include_deleted = bool(_bool_param(request, "include_deleted", False))
        # The committed rows are JSON text already: splice them, don't parse and re-dump.
        texts = self._session_texts(active=active, include_deleted=include_deleted)
        return _json_text('{"sessions":[' + ",".join(texts) + "]}")

    async def session_active(self, request: web.Request) -> web.StreamResponse:
        sid = self.writer.state.active_session_id
        text = self.writer.committed_sessions.text(sid) if sid is not None else None
        if text is None:
            raise ApiError(
                404, "no_active_session", "the backend has reported no active session (yet)"
            )
        return _json_text(text)

    async def gauge(self, request: web.Request) -> web.StreamResponse:
        """The prompt gauge as one text line, for `curl --unix-socket` in a prompt."""
        fmt = _text_param(request, "format") or gauge.DEFAULT_FORMAT
        warn = _float_param(request, "warn")
        crit = _float_param(request, "crit")
        color = bool(_bool_param(request, "color", False))
        marker = _text_param(request, "none") or "kimi ·"
        sid = self.writer.state.active_session_id
        session = self.writer.committed_sessions.get(sid) if sid is not None else None
        try:
            line = gauge.render(
                session,
                fmt,
                gauge.DEFAULT_WARN if warn is None else warn,
                gauge.DEFAULT_CRIT if crit is None else crit,
                color,
                marker,
            )
        except gauge.GaugeFormatError as exc:
            raise ApiError(400, "bad_parameter", str(exc)) from None
        return web.Response(text=line + "\n", content_type="text/plain")

    async def session(self, request: web.Request) -> web.StreamResponse:
        sid = _path_id(request, "session")
        text = self.writer.committed_sessions.text(sid)
        if text is None:
            raise ApiError(404, "no_such_session", f"no session {sid} has been seen")
        return _json_text(text)

    async def connections(self, request: web.Request) -> web.StreamResponse:
        limit = _int_param(request, "limit", 20, lo=1, hi=1000) or 20
        rows = await self.reader.connections(limit)
        items = [
            {
                "id": r["id"],
                "url": r["url"],
                "opened_at": iso(r["opened_at"]),
                "closed_at": iso(r["closed_at"]),
                "close_code": r["close_code"],
                "close_reason": r["close_reason"],
                "error": r["error"],
                "frames_in": r["frames_in"],
                "frames_out": r["frames_out"],
            }
            for r in rows
        ]
        return web.json_response({"connections": items})

    # -- events ------------------------------------------------------------------------------

    def _event_filters(
        self, request: web.Request
    ) -> tuple[int, int | None, str | None, str | None, int]:
        since = _int_param(request, "since", 0) or 0
        session = _int_param(request, "session", None, lo=-(2**62))
        type_ = _text_param(request, "type")
        kind = _text_param(request, "kind")
        if kind not in (None, "event", "link"):
            raise ApiError(400, "bad_parameter", "kind must be event or link")
        limit = _int_param(request, "limit", 100, lo=1, hi=MAX_PAGE) or 100
        return since, session, type_, kind, limit

    def _gap(self, since: int) -> dict[str, Any] | None:
        # No rows but a counter: retention removed every event (first_seq is 0 after a
        # restart in that case), so the oldest that could still exist is last_seq + 1.
        first = self.writer.first_seq or self.writer.last_seq + 1
        if since + 1 < first:
            return {
                "kind": "gap",
                "from_seq": since + 1,
                "to_seq": first - 1,
                "reason": "removed by retention (store.retention_days / store.max_events)",
            }
        return None

    async def events(self, request: web.Request) -> web.StreamResponse:
        since, session, type_, kind, limit = self._event_filters(request)
        if _bool_param(request, "follow", False):
            return await self._follow(request, since, session, type_, kind)
        # Everything up to `upto` is committed, so the query below sees all of it: when the
        # page is not full, the filters matched nothing else up to there. (Reading last_seq
        # after the query could skip a matching event committed in between.)
        upto = self.writer.last_seq
        rows = await self.reader.events(
            since=since, session_id=session, type_=type_, kind=kind, limit=limit
        )
        items = [event_dict(r) for r in rows]
        next_since = int(items[-1]["seq"]) if items else since
        if len(rows) < limit:
            next_since = max(next_since, upto)
        body: dict[str, Any] = {
            "events": items,
            "next_since": next_since,
            "last_seq": self.writer.last_seq,
        }
        gap = self._gap(since)
        if gap is not None:
            body["gap"] = gap
        return web.json_response(body)

    async def _follow(
        self,
        request: web.Request,
        since: int,
        session: int | None,
        type_: str | None,
        kind: str | None,
    ) -> web.StreamResponse:
        """NDJSON: catch up from SQLite, then live records, heartbeats while idle."""
        headers = {"Content-Type": NDJSON, "Cache-Control": "no-store"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        # Subscribe before the catch-up: whatever commits meanwhile is buffered, not lost.
        # A commit batch is pushed at once, so a buffer smaller than a batch would cut off
        # even a fast reader.
        sub = self.writer.subscribe(max(self.follow_buffer, self.writer.batch_max))
        response: web.StreamResponse | None = None
        cursor = since
        try:
            # The first page before the headers: a store failure is still a JSON error.
            rows = await self.reader.events(
                since=cursor, session_id=session, type_=type_, kind=kind, limit=CATCH_UP_PAGE
            )
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            self.followers.add(response)
            gap = self._gap(since)
            if gap is not None:
                await self._send(request, response, sub, [gap])
            while True:  # catch up, page by page, until the database has nothing newer
                if rows:
                    await self._send(request, response, sub, [event_dict(r) for r in rows])
                    cursor = int(rows[-1]["seq"])
                if len(rows) < CATCH_UP_PAGE:
                    break
                rows = await self.reader.events(
                    since=cursor, session_id=session, type_=type_, kind=kind, limit=CATCH_UP_PAGE
                )
            cursor = await self._live(request, response, sub, cursor, session, type_, kind)
        except ConnectionResetError:
            pass  # the reader went away
        except (StoreUnavailable, sqlite3.Error, ValueError) as exc:
            if response is None:
                if isinstance(exc, ValueError) and self.writer.running:
                    raise
                raise StoreUnavailable(f"cannot read events: {exc}") from None
            with contextlib.suppress(ConnectionResetError):
                await response.write(
                    _line(
                        {
                            "kind": "error",
                            "code": "store_unavailable",
                            "message": f"cannot read events: {exc}; resume with since={cursor}",
                            "resume_since": cursor,
                        }
                    )
                )
        finally:
            self.writer.unsubscribe(sub)
            if response is not None:
                self.followers.discard(response)
        assert response is not None
        return response

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        sub: Subscription,
        items: list[dict[str, Any]],
    ) -> None:
        """Write lines; drop the connection if its reader stays stuck after it overflowed.

        A reader that stops reading blocks our write (TCP-style back-pressure on the socket),
        while its subscription overflows. Once it reads again it gets the `too_slow` line;
        one that never does is cut off `stall_cut_off` seconds later, so it holds nothing.
        """
        data = b"".join(_line(item) for item in items)
        write = asyncio.ensure_future(response.write(data))
        stuck_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({write}, timeout=STALL_POLL)
                if done:
                    write.result()
                    return
                if not (sub.overflowed or sub.closed):
                    continue
                now = time.monotonic()
                stuck_since = stuck_since or now
                if now - stuck_since >= self.stall_cut_off:
                    log.info("follower stopped reading and overflowed; dropping it")
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("follower stopped reading")
        finally:
            if not write.done():
                write.cancel()
                with contextlib.suppress(BaseException):
                    await write

    async def _backfill(
        self, since: int, upto: int, session: int | None, type_: str | None, kind: str | None
    ) -> list[dict[str, Any]]:
        """Matching records in (since, upto] from the database.

        The live buffer skips a sequence number when the records were committed in a batch
        that was being written while we subscribed: our catch-up snapshot predates that
        commit, and the batch was not published to us. (After a filtered catch-up the live
        stream also "skips" whatever the filters excluded; then this finds nothing.)
        Everything up to `upto` is committed, so the database has it.
        """
        items: list[dict[str, Any]] = []
        while since < upto:
            rows = await self.reader.events(
                since=since, session_id=session, type_=type_, kind=kind, limit=CATCH_UP_PAGE
            )
            kept = [r for r in rows if int(r["seq"]) <= upto]
            items += [event_dict(r) for r in kept]
            if len(kept) < CATCH_UP_PAGE:
                break
            since = int(kept[-1]["seq"])
        return items

    def _caught_up_to(self, sub: Subscription, cursor: int) -> None:
        # Records committed during the catch-up are both in the DB and in the buffer.
        while sub.buffer and sub.buffer[0].seq <= cursor:
            sub.buffer.popleft()

    async def _live(
        self,
        request: web.Request,
        response: web.StreamResponse,
        sub: Subscription,
        cursor: int,
        session: int | None,
        type_: str | None,
        kind: str | None,
    ) -> int:
        """Stream committed records as they come; returns the last sequence number passed."""
        self._caught_up_to(sub, cursor)
        while not sub.closed:
            got = await sub.wait(self.heartbeat)
            if sub.overflowed:
                last = {
                    "kind": "error",
                    "code": "too_slow",
                    "message": (
                        f"reader too slow: more than {sub.maxlen} events waited for it; "
                        f"stream cut off, resume with since={cursor}"
                    ),
                    "resume_since": cursor,
                }
                await self._send(request, response, sub, [last])
                return cursor
            if not got:
                last_seq = self.writer.last_seq
                if last_seq > cursor:  # committed but never published to us: see _backfill
                    items = await self._backfill(cursor, last_seq, session, type_, kind)
                    cursor = last_seq
                    if items:
                        await self._send(request, response, sub, items)
                        continue
                beat = {"kind": "heartbeat", "last_seq": last_seq, "at": iso(time.time())}
                await self._send(request, response, sub, [beat])
                continue
            items = []
            while sub.buffer:
                record = sub.buffer.popleft()
                if record.seq <= cursor:
                    continue
                if record.seq > cursor + 1:
                    items += await self._backfill(cursor, record.seq - 1, session, type_, kind)
                cursor = record.seq
                if _matches(record, session, type_, kind):
                    items.append(_record_dict(record))
            if items:
                await self._send(request, response, sub, items)
        end = {"kind": "end", "reason": "daemon stopping", "resume_since": cursor}
        await self._send(request, response, sub, [end])
        return cursor

    # -- outbox ------------------------------------------------------------------------------

    async def enqueue(self, request: web.Request) -> web.StreamResponse:
        uid = self.access.require_write(request)
        ttl = _float_param(request, "ttl")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (
            len(key) <= MAX_IDEMPOTENCY_KEY and _IDEMPOTENCY_KEY.fullmatch(key)
        ):
            raise ApiError(
                400,
                "bad_header",
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            )
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_json", "body is not UTF-8") from None
        batch = request.content_type == NDJSON or _bool_param(request, "batch", False)
        if batch:
            lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
            if not lines:
                raise ApiError(400, "bad_message", "empty batch")
            parsed = [_message_from_json(line, f"line {i}") for i, line in lines]
        else:
            if not text.strip():
                raise ApiError(400, "bad_message", "empty body: send one JSON object")
            parsed = [_message_from_json(text, "body")]
        ttl_s = self.default_ttl if ttl is None else ttl
        expires = time.time() + ttl_s if ttl_s > 0 else None
        messages = []
        for index, (type_, body) in enumerate(parsed):
            idem = None
            if key is not None:
                idem = key if not batch else f"{key}#{index}"
            digest = hashlib.sha256(body.encode()).hexdigest() if idem else None
            messages.append(NewMessage(type_, body, expires, uid, idem, digest))
        self._writable()
        try:
            results = await self.writer.enqueue(messages)
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc)) from None
        except OutboxFull as exc:
            status = 429 if exc.code == "outbox_full_messages" else 507
            raise ApiError(status, exc.code, str(exc), {"Retry-After": "5"}) from None
        items = [{"id": r.id, "state": r.state, "created": r.created} for r in results]
        status = 202 if any(r.created for r in results) else 200
        if batch:
            return web.json_response({"messages": items}, status=status)
        return web.json_response(items[0], status=status)

    async def outbox_list(self, request: web.Request) -> web.StreamResponse:
        state = _text_param(request, "state")
        if state is not None and state not in (*OUTBOX_STATES, "pending"):
            raise ApiError(
                400,
                "bad_parameter",
                f"state must be one of {', '.join((*OUTBOX_STATES, 'pending'))}",
            )
        after = _int_param(request, "after", 0, hi=MAX_ID) or 0
        limit = _int_param(request, "limit", 100, lo=1, hi=MAX_PAGE) or 100
        rows = await self.reader.outbox_list(state=state, after_id=after, limit=limit)
        items = [outbox_dict(r) for r in rows]
        return web.json_response(
            {"messages": items, "next_after": items[-1]["id"] if items else after}
        )

    def _message_id(self, request: web.Request) -> int:
        return _path_id(request, "message")

    async def outbox_get(self, request: web.Request) -> web.StreamResponse:
        msg_id = self._message_id(request)
        row = await self.reader.outbox_get(msg_id)
        if row is None:
            raise ApiError(404, "no_such_message", f"no outbox message {msg_id}")
        return web.json_response(outbox_dict(row))

    async def outbox_cancel(self, request: web.Request) -> web.StreamResponse:
        self.access.require_write(request)
        msg_id = self._message_id(request)
        self._writable()
        cancelled = await self.writer.cancel(msg_id)
        row = await self.reader.outbox_get(msg_id)
        if row is None:
            raise ApiError(404, "no_such_message", f"no outbox message {msg_id}")
        if not cancelled:
            raise ApiError(
                409,
                "not_pending",
                f"message {msg_id} is {row['state']}; only pending ones can be cancelled",
            )
        return web.json_response(outbox_dict(row))

    async def rebuild(self, request: web.Request) -> web.StreamResponse:
        self.access.require_write(request)
        self._writable()
        result = await self.writer.call("rebuild")
        return web.json_response(result)

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            raise ApiError(404, "not_found", "metrics are disabled")
        return web.Response(
            body=self.metrics(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def close_followers(self) -> None:
        for sub in list(self.writer.subscribers):
            sub.close()


API_KEY: web.AppKey[Api] = web.AppKey("kimi_syncd.api", Api)


def _line(item: dict[str, Any]) -> bytes:
    return (_dumps(item) + "\n").encode()


def _matches(record: Committed, session: int | None, type_: str | None, kind: str | None) -> bool:
    if session is not None and record.session_id != session:
        return False
    if type_ is not None and record.type != type_:
        return False
    return kind is None or record.kind == kind


def _record_dict(record: Committed) -> dict[str, Any]:
    try:
        body: Any = json.loads(record.body)
    except ValueError:
        body = record.body
    return {
        "seq": record.seq,
        "kind": record.kind,
        "type": record.type,
        "session_id": record.session_id,
        "received_at": iso(record.received_at),
        "body": body,
    }


# -- the socket --------------------------------------------------------------------------


def bind_unix_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the API socket with the right mode from the first instant.

    A socket file left by a crashed daemon is replaced only when nothing listens on it.
    """
    parent = path.parent
    try:
        if not parent.exists():
            # Private like tmux's, but searchable by whom the socket mode lets in.
            search = (0o010 if mode & 0o070 else 0) | (0o001 if mode & 0o007 else 0)
            parent.mkdir(parents=True, mode=0o700 | search)
            os.chmod(parent, 0o700 | search)
    except OSError as exc:
        raise FatalError(
            f"cannot create {parent} for the API socket: {exc.strerror}", EX_CANTCREAT
        ) from None
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FatalError(
                f"{path} exists and is not a socket; refusing to replace it", EX_CANTCREAT
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise FatalError(
                    f"cannot probe existing socket {path}: {exc}", EX_CANTCREAT
                ) from None
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise FatalError(f"another kimi-syncd is already listening on {path}", EX_CANTCREAT)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise FatalError(f"cannot bind API socket {path}: {exc.strerror}", EX_CANTCREAT) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
            os.chown(path, -1, gid)
        except (KeyError, OSError) as exc:
            log.warning("cannot give socket %s to group %s: %s", path, group, exc)
    sock.listen(512)
    sock.setblocking(False)
    return sock
