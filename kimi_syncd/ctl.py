"""`kimi-syncctl`: the command-line client of the local API.

Stdlib only on every path, and nothing heavy at import: `kimi-syncctl gauge` runs in a
shell prompt every few seconds. The HTTP client is a few lines of HTTP/1.0 over AF_UNIX (no
chunked encoding to decode: the server closes the connection at the end of each answer).

Exit status: 0 ok; 1 the daemon answered with an error (4xx); 2 usage; 69 the daemon is not
running; 75 the daemon is unhealthy (5xx) or the connection broke (including a followed
event stream that the daemon ended: resume with the `--since` it printed).
"""

from __future__ import annotations

import json
import os
import socket
import sys

from kimi_syncd import gauge
from kimi_syncd.gauge import DIM, GREEN, RED, RESET, YELLOW

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs ~3 ms per prompt
if TYPE_CHECKING:  # argparse, pathlib and urllib cost ~20 ms at import: not on the gauge path
    import argparse
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_TEMPFAIL = 75

__all__ = ["DIM", "GREEN", "RED", "RESET", "YELLOW", "Client", "CtlError", "main"]


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def urlencode(query: dict[str, Any]) -> str:
    from urllib.parse import urlencode as encode

    return encode(query)


def quote(text: str) -> str:
    from urllib.parse import quote as quote_

    return quote_(text)


class DaemonDown(CtlError):
    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(
            f"daemon not running at {path} ({why}) — start it with `kimi-syncd` "
            "(or `systemctl start kimi-syncd`, `systemctl --user start kimi-syncd`), or point "
            "--socket / KIMI_SYNCD_SOCKET at its socket",
            EXIT_UNAVAILABLE,
        )


# -- HTTP over the Unix socket -----------------------------------------------------------


class Client:
    def __init__(self, path: str | Path, timeout: float | None = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        import time

        deadline = time.monotonic() + (self.timeout or 10.0)
        while True:
            try:
                return self._connect_once()
            except BlockingIOError:
                # EAGAIN: the listen backlog is full for a moment (a burst of clients), the
                # daemon is there. Try again until the timeout instead of calling it down.
                if time.monotonic() >= deadline:
                    raise DaemonDown(self.path, "listen backlog full") from None
                time.sleep(0.01)

    def _connect_once(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except BlockingIOError:
            sock.close()
            raise
        except FileNotFoundError:
            sock.close()
            raise DaemonDown(self.path, "no such socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonDown(self.path, "connection refused") from None
        except PermissionError:
            sock.close()
            raise CtlError(
                f"permission denied on {self.path}: ask for membership of the socket's group",
                EXIT_UNAVAILABLE,
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonDown(self.path, exc.strerror or str(exc)) from None
        return sock

    def _send(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> socket.socket:
        sock = self._connect()
        lines = [f"{method} {target} HTTP/1.0", "Host: kimi", "User-Agent: kimi-syncctl"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        except OSError as exc:
            sock.close()
            raise CtlError(f"sending the request failed: {exc}", EXIT_TEMPFAIL) from None
        return sock

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sock = self._send(method, target, body, headers or {})
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except OSError as exc:
            raise CtlError(f"the daemon's answer broke off: {exc}", EXIT_TEMPFAIL) from None
        finally:
            sock.close()
        raw = b"".join(chunks)
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = _status_code(head)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def stream(self, target: str) -> Iterator[bytes]:
        """Yield the lines of a streaming (NDJSON) answer."""
        sock = self._send("GET", target, None, {})
        sock.settimeout(None)
        buffer = b""
        head_done = False
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
                if not head_done:
                    head, sep, rest = buffer.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    head_done = True
                    status = _status_code(head)
                    if status >= 400:
                        while True:
                            more = sock.recv(65536)
                            if not more:
                                break
                            rest += more
                        _raise_for(status, _loads(rest))
                    buffer = rest
                *lines, buffer = buffer.split(b"\n")
                yield from (line for line in lines if line)
        finally:
            sock.close()
        if buffer.strip():
            yield buffer


def _status_code(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise CtlError("the daemon sent a malformed answer", EXIT_TEMPFAIL) from None


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _raise_for(status: int, body: Any) -> None:
    message = body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = f"{body['error'].get('message')} ({body['error'].get('code')})"
    raise CtlError(f"HTTP {status}: {message}", EXIT_TEMPFAIL if status >= 500 else EXIT_ERROR)


def call(
    client: Client,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    status, payload = client.request(method, target, body, headers)
    if status >= 400:
        _raise_for(status, payload)
    return payload


# -- formatting helpers --------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _print_fields(data: dict[str, Any], width: int) -> None:
    for key, value in data.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        print(f"{key:<{width}} {shown}")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _pct(value: Any) -> str:
    return f"{value:.1f}%" if isinstance(value, (int, float)) else "-"


_context = gauge.context_of


# -- commands --------------------------------------------------------------------------------


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    st = call(client, "GET", "/v1/status")
    if args.json:
        _print_json(st)
        return EXIT_OK
    link = st.get("link") or {}
    breaker = link.get("breaker") or {}
    print(f"kimi-syncd {st.get('version')}  up {st.get('uptime_s', 0):.0f} s  pid {st.get('pid')}")
    line = f"link       {link.get('state')}  {link.get('url')}"
    if link.get("rtt_ms") is not None:
        line += f"  rtt {link['rtt_ms']:.1f} ms"
    print(line)
    if link.get("last_error"):
        print(f"last error {link['last_error']}")
    if link.get("next_attempt_at"):
        print(f"next try   {link['next_attempt_at']}")
    print(
        f"breaker    {breaker.get('state')}  failures {breaker.get('failures')}"
        + (f"  reason: {breaker['reason']}" if breaker.get("reason") else "")
    )
    print(f"session    active {st.get('active_session_id')}  ({st.get('sessions')} known)")
    ev = st.get("events") or {}
    rej = st.get("rejected") or {}
    print(
        f"events     {ev.get('stored')} stored, last seq {ev.get('last_seq')}, "
        f"{rej.get('total')} rejected"
    )
    ob = st.get("outbox") or {}
    age = ob.get("oldest_pending_age_s")
    print(
        f"outbox     {ob.get('pending')} pending"
        + (f" (oldest {age:.0f} s)" if isinstance(age, (int, float)) else "")
    )
    db = st.get("db") or {}
    print(
        f"database   {db.get('path')}  {(db.get('size_bytes') or 0) / 1e6:.1f} MB"
        + (f"  FAULT: {db['fault']}" if db.get("fault") else "")
    )
    return EXIT_OK


def cmd_sessions(client: Client, args: argparse.Namespace) -> int:
    query = {"include_deleted": "true"} if args.all else {}
    data = call(client, "GET", "/v1/sessions" + (f"?{urlencode(query)}" if query else ""))
    if args.json:
        _print_json(data)
        return EXIT_OK
    rows = []
    for s in data.get("sessions", []):
        ctx = _context(s)
        flag = "*" if s.get("active") else ("x" if s.get("deleted") else "")
        rows.append(
            [
                flag,
                str(s.get("id")),
                str(s.get("name") or "?"),
                str(s.get("provider") or "-"),
                str(s.get("model") or "-"),
                str(ctx.get("tokens") if ctx.get("tokens") is not None else "-"),
                _pct(ctx.get("percentage")),
            ]
        )
    if not rows:
        print("no sessions seen yet")
        return EXIT_OK
    _table(rows, ["", "ID", "NAME", "PROVIDER", "MODEL", "TOKENS", "CONTEXT"])
    return EXIT_OK


def cmd_session(client: Client, args: argparse.Namespace) -> int:
    which = args.id or "active"
    if which != "active" and not which.lstrip("-").isdigit():
        raise CtlError(f"session id must be an integer or 'active', got {which!r}", EXIT_USAGE)
    data = call(client, "GET", f"/v1/sessions/{quote(which)}")
    if args.json:
        _print_json(data)
        return EXIT_OK
    _print_fields(data, 28)
    return EXIT_OK


def _event_line(item: dict[str, Any]) -> str:
    kind = item.get("kind")
    if kind in ("heartbeat", "gap", "error", "end"):
        return f"-- {kind}: " + json.dumps(
            {k: v for k, v in item.items() if k != "kind"}, ensure_ascii=False
        )
    sid = item.get("session_id")
    body = item.get("body")
    summary = ""
    if isinstance(body, dict):
        summary = json.dumps({k: v for k, v in body.items() if k != "type"}, ensure_ascii=False)
        if len(summary) > 100:
            summary = summary[:97] + "..."
    tag = "link:" if kind == "link" else ""
    return (
        f"{item.get('seq'):>8} {item.get('received_at')} {tag}{item.get('type')}"
        f"{' s=' + str(sid) if sid is not None else ''} {summary}"
    )


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"since": args.since}
    if args.session is not None:
        query["session"] = args.session
    if args.type:
        query["type"] = args.type
    if args.kind:
        query["kind"] = args.kind
    if args.follow:
        return _follow(client, args, query)
    query["limit"] = args.limit
    data = call(client, "GET", "/v1/events?" + urlencode(query))
    if args.json:
        _print_json(data)
        return EXIT_OK
    if data.get("gap"):
        print(_event_line(data["gap"]))
    for item in data.get("events", []):
        print(_event_line(item))
    return EXIT_OK


def _follow(client: Client, args: argparse.Namespace, query: dict[str, Any]) -> int:
    """Print the stream until Ctrl-C (0) or until it ends (75, with where to resume)."""
    query["follow"] = "true"
    resume: Any = args.since
    why = "the daemon closed the stream"
    try:
        for line in client.stream("/v1/events?" + urlencode(query)):
            item = _loads(line)
            if not isinstance(item, dict):
                raise CtlError(f"the daemon sent a malformed line: {line[:80]!r}", EXIT_TEMPFAIL)
            if isinstance(item.get("seq"), int):
                resume = item["seq"]
            if item.get("kind") in ("error", "end"):
                resume = item.get("resume_since", resume)
                why = str(item.get("message") or item.get("reason") or item.get("code"))
            print(line.decode() if args.json else _event_line(item), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        why = f"the connection broke: {exc}"
    print(f"kimi-syncctl: stream ended ({why}); resume with --since {resume}", file=sys.stderr)
    return EXIT_TEMPFAIL


def cmd_send(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.message == "-" else args.message
    headers = {"Content-Type": "application/x-ndjson" if args.batch else "application/json"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    target = "/v1/outbox" + (f"?{urlencode({'ttl': args.ttl})}" if args.ttl is not None else "")
    data = call(client, "POST", target, text.encode(), headers)
    if args.json:
        _print_json(data)
    elif args.batch:
        ids = [m["id"] for m in data.get("messages", [])]
        print(f"queued {len(ids)} messages: ids {ids[0]}..{ids[-1]}" if ids else "nothing")
    else:
        print(f"queued as {data['id']} ({data['state']})")
    return EXIT_OK


def cmd_queue(client: Client, args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        query: dict[str, Any] = {"limit": args.limit}
        if args.state:
            query["state"] = args.state
        data = call(client, "GET", "/v1/outbox?" + urlencode(query))
        if args.json:
            _print_json(data)
            return EXIT_OK
        rows = [
            [
                str(m["id"]),
                m["state"],
                str(m["attempts"]),
                m["type"],
                str(m["created_at"]),
                str(m.get("last_error") or ""),
            ]
            for m in data.get("messages", [])
        ]
        if not rows:
            print("outbox is empty" if not args.state else f"no {args.state} messages")
            return EXIT_OK
        _table(rows, ["ID", "STATE", "TRIES", "TYPE", "CREATED", "LAST ERROR"])
        return EXIT_OK
    if args.id is None or not args.id.isdigit():
        raise CtlError(f"queue {action} needs a message id", EXIT_USAGE)
    if action == "show":
        data = call(client, "GET", f"/v1/outbox/{args.id}")
    elif action == "cancel":
        data = call(client, "DELETE", f"/v1/outbox/{args.id}")
    else:
        raise CtlError(f"unknown queue action {action!r}", EXIT_USAGE)
    if args.json:
        _print_json(data)
    else:
        _print_fields(data, 16)
    return EXIT_OK


def cmd_rebuild(client: Client, args: argparse.Namespace) -> int:
    data = call(client, "POST", "/v1/rebuild", b"")
    if args.json:
        _print_json(data)
    else:
        print(f"rebuilt {data['sessions']} sessions from {data['events_replayed']} events")
    return EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    import csv

    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    writer = csv.writer(out) if args.format == "csv" else None
    if writer is not None:
        writer.writerow(
            ["seq", "received_at", "type", "session_id", "tokens", "percentage", "body"]
        )
    since = 0
    count = 0
    try:
        while True:
            query = {"since": since, "session": args.session, "limit": 1000, "kind": "event"}
            data = call(client, "GET", "/v1/events?" + urlencode(query))
            items = data.get("events", [])
            for item in items:
                count += 1
                if writer is None:
                    out.write(json.dumps(item, ensure_ascii=False) + "\n")
                    continue
                body = item.get("body") if isinstance(item.get("body"), dict) else {}
                tokens, pct = _figures(body)
                writer.writerow(
                    [
                        item["seq"],
                        item["received_at"],
                        item["type"],
                        item["session_id"],
                        tokens,
                        pct,
                        json.dumps(body, ensure_ascii=False),
                    ]
                )
            if not items or data["next_since"] <= since:
                break
            since = data["next_since"]
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {count} events", file=sys.stderr)
    return EXIT_OK


def _figures(body: dict[str, Any]) -> tuple[Any, Any]:
    real = body.get("real_tokens")
    if isinstance(real, dict):
        return real.get("total"), real.get("percentage")
    metrics = body.get("metrics")
    if isinstance(metrics, dict):
        return metrics.get("total_tokens"), metrics.get("percentage")
    metric = body.get("metric")
    if isinstance(metric, dict):
        return metric.get("cumulative_tokens") or metric.get("estimated_tokens"), metric.get(
            "percentage"
        )
    return "", ""


def gauge_text(
    session: dict[str, Any] | None,
    fmt: str,
    warn: float,
    crit: float,
    color: bool,
    down_marker: str,
) -> str:
    """The gauge line (see `kimi_syncd.gauge.render`); a bad --format is a usage error."""
    try:
        return gauge.render(session, fmt, warn, crit, color, down_marker)
    except gauge.GaugeFormatError as exc:
        raise CtlError(f"{exc} (--format)", EXIT_USAGE) from None


def cmd_gauge(client: Client, args: argparse.Namespace | _Args) -> int:
    client.timeout = 1.0  # a prompt must never hang
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        status, body = client.request("GET", "/v1/sessions/active")
    except CtlError:
        print(args.down)
        return EXIT_OK
    session = body if status == 200 and isinstance(body, dict) else None
    marker = args.down if status != 404 else args.none
    print(gauge_text(session, args.format, args.warn, args.crit, color, marker))
    return EXIT_OK


def cmd_doctor(client: Client, args: argparse.Namespace) -> int:
    from kimi_syncd import doctor

    return doctor.run(client.path, as_json=args.json)


# -- argument parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the options work before or after the command without one hiding the other.
    common.add_argument(
        "--socket",
        type=Path,
        default=argparse.SUPPRESS,
        help="API socket (default: as the daemon's; env KIMI_SYNCD_SOCKET)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser = argparse.ArgumentParser(
        prog="kimi-syncctl",
        parents=[common],
        description="Talk to the local kimi-syncd daemon.",
        epilog="exit status: 0 ok, 1 error answer, 2 usage, 69 daemon not running, "
        "75 daemon unhealthy, connection broken or followed stream ended by the daemon",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="link, breaker, events, outbox, database")
    p = sub.add_parser("sessions", parents=[common], help="every session seen")
    p.add_argument("--all", action="store_true", help="include deleted sessions")
    p = sub.add_parser("session", parents=[common], help="one session's state")
    p.add_argument("id", nargs="?", help="session id or 'active' (default)")
    p = sub.add_parser("events", parents=[common], help="stored events, optionally followed")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming new events")
    p.add_argument("--since", type=int, default=0, help="after this sequence number")
    p.add_argument("--session", type=int, help="only this session")
    p.add_argument("--type", help="only this event type")
    p.add_argument("--kind", choices=["event", "link"], help="backend events or link events")
    p.add_argument("--limit", type=int, default=100)
    p = sub.add_parser("send", parents=[common], help="queue a message for the backend")
    p.add_argument("message", help="a JSON object with a string 'type', or - for stdin")
    p.add_argument("--ttl", type=float, help="seconds before it expires undelivered")
    p.add_argument("--idempotency-key", help="repeat-safe key")
    p.add_argument("--batch", action="store_true", help="the input is NDJSON, one per line")
    p = sub.add_parser("queue", parents=[common], help="list, show or cancel outbox messages")
    p.add_argument("action", nargs="?", choices=["list", "show", "cancel"])
    p.add_argument("id", nargs="?")
    p.add_argument("--state", help="queued, sent, delivered, expired, dead, cancelled, pending")
    p.add_argument("--limit", type=int, default=100)
    sub.add_parser("rebuild", parents=[common], help="replay the event log into fresh state")
    sub.add_parser(
        "doctor", parents=[common], help="check config, database, socket, upstream, disk and clock"
    )
    p = sub.add_parser("export", parents=[common], help="a session's events as JSONL or CSV")
    p.add_argument("--session", type=int, required=True)
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--output", "-o", help="file (default: stdout)")
    p = sub.add_parser(
        "gauge",
        parents=[common],
        help="one short line for a prompt or tmux: active session context use",
    )
    p.add_argument(
        "--format",
        default="kimi {pct:.0f}%",
        help="fields: {name} {id} {model} {pct} {tokens} {max} (default: 'kimi {pct:.0f}%%')",
    )
    p.add_argument("--warn", type=float, default=80.0, help="yellow from this %% (80)")
    p.add_argument("--crit", type=float, default=90.0, help="red from this %% (90)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--down", default="kimi -", help="printed when the daemon is down")
    p.add_argument("--none", default="kimi ·", help="printed when no session is active")
    return parser


COMMANDS = {
    "status": cmd_status,
    "sessions": cmd_sessions,
    "session": cmd_session,
    "events": cmd_events,
    "send": cmd_send,
    "queue": cmd_queue,
    "rebuild": cmd_rebuild,
    "export": cmd_export,
    "gauge": cmd_gauge,
    "doctor": cmd_doctor,
}


GAUGE_OPTIONS = {
    "--socket": "socket",
    "--format": "format",
    "--warn": "warn",
    "--crit": "crit",
    "--color": "color",
    "--down": "down",
    "--none": "none",
}
GAUGE_DEFAULTS: dict[str, Any] = {
    "format": "kimi {pct:.0f}%",
    "warn": 80.0,
    "crit": 90.0,
    "color": "auto",
    "down": "kimi -",
    "none": "kimi ·",
    "socket": None,
}


def _gauge_fast(argv: list[str]) -> int | None:
    """`gauge` without argparse: a prompt calls it every few seconds. None: use argparse."""
    values = dict(GAUGE_DEFAULTS)
    words = list(argv)
    if "gauge" not in words:
        return None
    words.remove("gauge")
    while words:
        word = words.pop(0)
        name, eq, value = word.partition("=")
        if name == "--json" and not eq:
            continue
        key = GAUGE_OPTIONS.get(name)
        if key is None:
            return None  # help, a typo, an unknown option: argparse explains
        if not eq:
            if not words:
                return None
            value = words.pop(0)
        values[key] = value
    try:
        warn, crit = float(values["warn"]), float(values["crit"])
    except ValueError:
        return None
    if values["color"] not in ("auto", "always", "never"):
        return None
    if values["socket"] is None:
        from kimi_syncd import paths

        values["socket"] = paths.client_socket(os.environ)
    args = _Args(values["format"], warn, crit, values["color"], values["down"], values["none"])
    try:
        return cmd_gauge(Client(values["socket"]), args)
    except CtlError as exc:
        print(f"kimi-syncctl: {exc}", file=sys.stderr)
        return exc.exit_code


class _Args:
    """The attributes cmd_gauge reads, without argparse."""

    def __init__(
        self, fmt: str, warn: float, crit: float, color: str, down: str, none: str
    ) -> None:
        self.format, self.warn, self.crit, self.color = fmt, warn, crit, color
        self.down, self.none = down, none


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fast = _gauge_fast(argv)
    if fast is not None:
        return fast
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    if getattr(args, "socket", None) is None:
        from kimi_syncd import paths

        args.socket = paths.client_socket(os.environ)
    client = Client(args.socket)
    try:
        return COMMANDS[args.command](client, args)
    except CtlError as exc:
        print(f"kimi-syncctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
