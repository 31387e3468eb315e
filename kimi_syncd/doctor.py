"""`kimi-syncctl doctor`: check everything a support request would ask about."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_BYTES = 200 * 1024 * 1024


def _check(
    results: list[dict[str, Any]], name: str, level: str, detail: str, hint: str = ""
) -> None:
    results.append({"check": name, "result": level, "detail": detail, "hint": hint})


def run(socket: str | Path, *, as_json: bool) -> int:
    from kimi_syncd import config
    from kimi_syncd.ctl import Client, CtlError

    socket_path = Path(socket)

    results: list[dict[str, Any]] = []
    settings = None
    try:
        loaded = config.load()
        settings = loaded.settings
        where = loaded.config_file if loaded.config_file_found else "defaults (no file)"
        _check(results, "config", OK, f"valid ({where})")
    except config.ConfigError as exc:
        _check(
            results,
            "config",
            FAIL,
            "; ".join(exc.problems),
            "run `kimi-syncd check-config` for details",
        )

    status: dict[str, Any] | None = None
    try:
        mode = socket_path.stat().st_mode
        if not stat.S_ISSOCK(mode):
            _check(results, "socket", FAIL, f"{socket_path} is not a socket")
        else:
            code, body = Client(socket_path, timeout=3.0).request("GET", "/v1/status")
            status = body if code == 200 and isinstance(body, dict) else None
            perms = oct(stat.S_IMODE(mode))
            writable = os.access(socket_path, os.W_OK)
            _check(
                results,
                "socket",
                OK if writable else WARN,
                f"{socket_path} mode {perms}, daemon answered HTTP {code}",
                "" if writable else "you cannot connect: ask for the socket's group",
            )
    except FileNotFoundError:
        _check(
            results,
            "socket",
            FAIL,
            f"{socket_path} does not exist",
            "start the daemon: `kimi-syncd` or `systemctl start kimi-syncd`",
        )
    except CtlError as exc:
        _check(results, "socket", FAIL, str(exc))
    except OSError as exc:
        _check(
            results,
            "socket",
            FAIL,
            f"cannot reach {socket_path}: {exc.strerror or exc}",
            "run doctor as a user who may reach the socket's directory",
        )

    db_path = None
    if status is not None:
        db_path = Path(status["db"]["path"])
    elif settings is not None:
        db_path = settings.store.db_path
    if db_path is not None:
        _check_database(results, db_path, status)
        _check_disk(results, db_path.parent)

    url = None
    if status is not None and status.get("link"):
        link = status["link"]
        url = link.get("url")
        level = OK if link.get("state") == "connected" else WARN
        _check(
            results,
            "upstream link",
            level,
            f"{link.get('state')} {url}"
            + (f": {link['last_error']}" if link.get("last_error") else ""),
        )
    elif settings is not None:
        url = settings.upstream.url
    if url:
        _check_reachable(results, url)

    _check_clock(results, status)

    worst = FAIL if any(r["result"] == FAIL for r in results) else OK
    if as_json:
        print(json.dumps({"checks": results, "ok": worst == OK}, indent=2))
    else:
        for r in results:
            mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[r["result"]]
            print(f"[{mark}] {r['check']}: {r['detail']}")
            if r["hint"]:
                print(f"       hint: {r['hint']}")
    return 0 if worst == OK else 1


def _check_database(
    results: list[dict[str, Any]], db_path: Path, status: dict[str, Any] | None
) -> None:
    if not db_path.exists():
        _check(
            results,
            "database",
            WARN if status is None else FAIL,
            f"{db_path} does not exist yet",
            "it is created when the daemon first starts",
        )
        return
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        _check(
            results,
            "database",
            FAIL,
            f"{db_path}: {exc}",
            "permissions? run doctor as the daemon's user or root",
        )
        return
    size = sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*"))
    if rows == ["ok"]:
        fault = status["db"].get("fault") if status else None
        _check(
            results,
            "database",
            WARN if fault else OK,
            f"{db_path} quick_check ok, {size / 1e6:.1f} MB"
            + (f"; fault: {fault}" if fault else ""),
        )
    else:
        _check(
            results,
            "database",
            FAIL,
            f"quick_check: {'; '.join(rows[:3])}",
            "stop the daemon and move the file aside (it will not be overwritten)",
        )


def _check_disk(results: list[dict[str, Any]], directory: Path) -> None:
    try:
        usage = shutil.disk_usage(directory)
    except OSError as exc:
        _check(results, "disk", WARN, f"cannot stat {directory}: {exc}")
        return
    level = OK if usage.free >= MIN_FREE_BYTES else WARN
    _check(
        results,
        "disk",
        level,
        f"{usage.free / 1e9:.1f} GB free in {directory}",
        "" if level == OK else "free some space: ingest pauses when the disk is full",
    )


def _check_reachable(results: list[dict[str, Any]], url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError as exc:
        _check(
            results,
            "upstream reachable",
            WARN,
            f"cannot open TCP to {host}:{port}: {exc.strerror or exc}",
            "is the Kimi Proxy running? (python -m kimi_proxy)",
        )
        return
    _check(
        results,
        "upstream reachable",
        OK,
        f"TCP {host}:{port} in {(time.monotonic() - started) * 1000:.1f} ms",
    )


def _check_clock(results: list[dict[str, Any]], status: dict[str, Any] | None) -> None:
    synced = Path("/run/systemd/timesync/synchronized").exists()
    detail = "NTP synchronized" if synced else "NTP sync state unknown"
    _check(results, "clock", OK, f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {detail}")
