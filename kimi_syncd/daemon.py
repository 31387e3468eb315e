"""The daemon's lifecycle, in the manner of uvicorn's Server: startup, serve, shutdown.

startup: open the store (migrations, integrity) → bind the API (or take the socket systemd
passed) → READY=1 → start the link. SIGTERM/SIGINT at any point (startup included) →
STOPPING=1, stop the link, flush the writer, close the database, exit 0. SIGHUP reloads
what can change at run time (see `reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from kimi_syncd import __version__, config, systemd
from kimi_syncd.api import Access, Api, bind_unix_socket
from kimi_syncd.config import ConfigError, LoadedConfig, Settings
from kimi_syncd.errors import EX_CONFIG, EX_DATAERR, EX_IOERR, EX_OK, EX_SOFTWARE, FatalError
from kimi_syncd.link import Link
from kimi_syncd.metrics import Metrics
from kimi_syncd.store import Store, StoreUnavailable

log = logging.getLogger("kimi_syncd")

PRUNE_EVERY = 60.0
STATUS_EVERY = 5.0
DB_WATCH_EVERY = 5.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald adds its own timestamps; <N> prefixes map to syslog priorities.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we are debugging.
    for name in ("websockets", "aiohttp.access", "aiosqlite"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def raise_fd_limit() -> None:
    """Many idle API clients must not exhaust the default 1024 descriptors."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Daemon:
    def __init__(self, loaded: LoadedConfig, *, flags: dict[str, Any] | None = None) -> None:
        self.loaded = loaded
        self.settings: Settings = loaded.settings
        self.flags = flags or {}
        self.notifier = systemd.Notifier.from_env()
        self.store: Store | None = None
        self.api: Api | None = None
        self.link: Link | None = None
        self.metrics: Metrics | None = None
        self.runner: web.AppRunner | None = None
        self.bound_socket: Path | None = None
        self.should_exit = asyncio.Event()
        self.exit_code = EX_OK
        self.started = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_status = ""
        self._db_inode: tuple[int, int] | None = None
        self._socket_inode: tuple[int, int] | None = None

    # -- entry point ---------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        startup = asyncio.create_task(self.startup(), name="startup")
        exit_wait = asyncio.create_task(self.should_exit.wait())
        try:
            done, _ = await asyncio.wait({startup, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup in done and startup.exception() is None:
                await self.should_exit.wait()
            elif startup not in done:
                log.info("stop requested during startup")
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await startup
            else:
                exc = startup.exception()
                if isinstance(exc, FatalError):
                    log.error("%s", exc)
                    self.exit_code = exc.exit_code
                elif isinstance(exc, ConfigError):
                    for line in exc.problems:
                        log.error("config: %s", line)
                    self.exit_code = EX_CONFIG
                else:
                    log.error("startup failed", exc_info=exc)
                    self.exit_code = EX_SOFTWARE
        finally:
            exit_wait.cancel()
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return self.exit_code

    def _request_exit(self, sig: signal.Signals) -> None:
        if not self.should_exit.is_set():
            log.info("received %s, stopping", sig.name)
            self.notifier.stopping()
            self.should_exit.set()

    def _request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self.reload(), name="reload")

    # -- startup -------------------------------------------------------------------------

    async def startup(self) -> None:
        s = self.settings
        raise_fd_limit()
        log.info(
            "kimi-syncd %s starting (pid %d, config %s)",
            __version__,
            os.getpid(),
            self.loaded.config_file if self.loaded.config_file_found else "defaults",
        )
        token = s.upstream_token()
        self.store = await Store.open(
            s.store,
            s.outbox,
            on_long_migration=lambda: self.notifier.extend_timeout(300),
        )
        writer = self.store.writer
        log.info(
            "database %s: last seq %d, %d sessions, %d pending messages",
            self.store.db_path,
            writer.last_seq,
            len(writer.committed_sessions),
            writer.outbox.pending,
        )
        self._db_inode = self._inode(self.store.db_path)
        self.metrics = Metrics(self._metrics_snapshot)
        writer.commit_observer = self.metrics.observe_commit
        self.link = Link(s, self.store, token=token, on_change=self._push_status)
        self.api = Api(
            self.store,
            max_body_bytes=s.api.max_body_bytes,
            write_group=s.api.write_group,
            default_ttl=s.outbox.default_ttl,
            follow_buffer=s.api.follow_buffer,
            heartbeat=s.api.heartbeat,
            status=self._status,
            metrics=self.metrics.render,
        )
        await self._start_api()
        self.notifier.ready(self._status_line())
        log.info("ready: API on %s", self.bound_socket or "the socket passed by systemd")
        self.link.start()
        self._tasks = [
            asyncio.create_task(self._retention_loop(), name="retention"),
            asyncio.create_task(self._status_loop(), name="status"),
            asyncio.create_task(self._db_watch_loop(), name="db-watch"),
        ]
        if not self.store.checked_at_open:
            self._tasks.append(asyncio.create_task(self._background_check(), name="quick-check"))
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(interval), name="watchdog"))

    async def _start_api(self) -> None:
        assert self.api is not None
        s = self.settings.api
        passed = systemd.listen_fds()
        sock: socket.socket | None = None
        if passed:
            candidates = passed.get("api") or passed.get("unknown") or []
            if candidates:
                sock = candidates[0]
                sock.setblocking(False)
                log.info("using socket-activated API socket (fd %d)", sock.fileno())
        if sock is None:
            sock = bind_unix_socket(s.socket, s.mode, s.write_group)
            self.bound_socket = s.socket
            self._socket_inode = self._inode(s.socket)
        self.runner = web.AppRunner(
            self.api.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self.runner.setup()
        site = web.SockSite(self.runner, sock, shutdown_timeout=1.0)
        await site.start()

    async def _rebind_if_deleted(self) -> None:
        """A socket file removed under us (tmp cleaners, a careless rm) is bound again."""
        path = self.bound_socket
        if path is None or self.runner is None or self._inode(path) == self._socket_inode:
            return
        log.warning("API socket %s was removed or replaced; binding it again", path)
        s = self.settings.api
        try:
            sock = bind_unix_socket(path, s.mode, s.write_group)
        except FatalError as exc:
            log.error("cannot bind the API socket again: %s", exc)
            self._socket_inode = self._inode(path)  # say it once, not every few seconds
            return
        site = web.SockSite(self.runner, sock, shutdown_timeout=1.0)
        await site.start()
        self._socket_inode = self._inode(path)

    # -- status ----------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        return {"link": self.link.status() if self.link is not None else None}

    def _status_line(self) -> str:
        if self.store is not None and self.store.writer.fault:
            return f"store: {self.store.writer.fault}"
        if self.link is None:
            return "starting"
        return self.link.summary()

    def _push_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _metrics_snapshot(self) -> dict[str, Any]:
        assert self.store is not None
        w = self.store.writer
        link = self.link
        counters = w.committed_global.get("counters", {})
        return {
            "frames_by_type": counters if isinstance(counters, dict) else {},
            "rejected_by_reason": dict(w.rejected_by_reason),
            "attempts": link.attempts if link else 0,
            "connections": link.connections if link else 0,
            "delivered": link.delivered if link else 0,
            "breaker_state": str(link.breaker.state) if link else "closed",
            "link_state": str(link.state) if link else "stopped",
            "rtt_seconds": link.rtt.last if link else None,
            "outbox_by_state": dict(w.outbox.by_state),
            "last_seq": w.last_seq,
            "ingest_queue": w.ingest_depth,
            "db_size_bytes": self.store.reader.size_bytes(),
        }

    # -- background loops ----------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            self._push_status()
            await asyncio.sleep(STATUS_EVERY)

    async def _watchdog_loop(self, interval: float) -> None:
        # From the event loop itself: if the loop is stuck, the pings stop and systemd
        # restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _retention_loop(self) -> None:
        assert self.store is not None
        await asyncio.sleep(10.0)
        while True:
            st = self.settings.store
            try:
                while await self.store.writer.prune(
                    retention_days=st.retention_days, max_events=st.max_events
                ):
                    await asyncio.sleep(0.05)  # small steps: ingest never stalls
            except Exception as exc:  # reported, retried next round
                log.warning("retention step failed: %s", exc)
            await asyncio.sleep(PRUNE_EVERY)

    async def _background_check(self) -> None:
        """After a clean shutdown the integrity check runs here, not before READY."""
        assert self.store is not None
        try:
            rows = await self.store.reader.quick_check()
        except Exception as exc:
            rows = [str(exc)]
        if rows == ["ok"]:
            log.info("database quick_check ok")
            return
        log.error(
            "database %s is corrupt (quick_check: %s); stopping. Move it aside to start "
            "afresh, or try `sqlite3 kimi-syncd.db .recover`",
            self.store.db_path,
            "; ".join(rows[:3]),
        )
        self.exit_code = EX_DATAERR
        self.should_exit.set()

    @staticmethod
    def _inode(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    async def _db_watch_loop(self) -> None:
        """Notice the database file or the API socket being deleted or replaced under us."""
        assert self.store is not None
        while True:
            await asyncio.sleep(DB_WATCH_EVERY)
            await self._rebind_if_deleted()
            if self.store.writer.fatal is not None:
                log.error(
                    "the database failed (%s); stopping so that systemd can restart "
                    "us on a checked database",
                    self.store.writer.fatal,
                )
                self.exit_code = EX_IOERR
                self.should_exit.set()
                return
            current = self._inode(self.store.db_path)
            if current == self._db_inode:
                continue
            log.error("database file %s was deleted or replaced while running", self.store.db_path)
            await self._rescue_database()
            self.exit_code = EX_IOERR
            self.should_exit.set()
            return

    async def _rescue_database(self) -> None:
        """Write what our open connection still sees back to the path, then stop.

        Order matters: nothing may be committed (or acknowledged) after the copy, since it
        would land in the deleted file. So: stop the link (no more frames), refuse new
        writes (503), let the writer commit what it already holds and stop, and only then
        copy with `VACUUM INTO` — the last use of the connection.
        """
        assert self.store is not None
        path = self.store.db_path
        if path.exists():
            log.error("another file now sits at %s; leaving it alone", path)
            return
        writer = self.store.writer
        if self.link is not None:
            await self.link.stop()
        writer.fatal = StoreUnavailable("the database file was deleted; restarting")
        await writer.stop()
        try:
            await writer.db.execute("VACUUM INTO ?", (str(path),))
            log.error(
                "restored %s from the open connection (nothing committed was lost); restarting",
                path,
            )
        except Exception as exc:
            log.error("could not restore %s: %s", path, exc)

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change at run time.

        Applied: log.*, outbox limits and TTL, retention, api.write_group, api.heartbeat,
        and upstream/reconnect/breaker (the link reconnects with the new settings).
        Needs a restart: store.state_dir, api.socket, api.socket_mode.
        """
        self.notifier.reloading()
        try:
            loaded = config.load(
                self.loaded.config_file if self.loaded.config_file_found else None, flags=self.flags
            )
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused, keeping the running configuration: %s", line)
            self.notifier.ready(self._status_line())
            return
        new, old = loaded.settings, self.settings
        self.loaded, self.settings = loaded, new
        configure_logging(new.log.level, new.log.format)
        for key in ("state_dir",):
            if getattr(new.store, key) != getattr(old.store, key):
                log.warning("store.%s changed: takes effect after a restart", key)
        if (new.api.socket, new.api.socket_mode) != (old.api.socket, old.api.socket_mode):
            log.warning("api.socket / api.socket_mode changed: take effect after a restart")
        if self.store is not None:
            w = self.store.writer
            w.max_messages, w.max_bytes = new.outbox.max_messages, new.outbox.max_bytes
        if self.api is not None:
            self.api.access = Access(new.api.write_group)
            self.api.default_ttl = new.outbox.default_ttl
            self.api.heartbeat = new.api.heartbeat
        relink = (new.upstream, new.reconnect, new.breaker, new.outbox) != (
            old.upstream,
            old.reconnect,
            old.breaker,
            old.outbox,
        )
        if relink and self.link is not None and self.store is not None:
            log.info("upstream settings changed: reconnecting")
            await self.link.stop()
            self.link = Link(
                new, self.store, token=new.upstream_token(), on_change=self._push_status
            )
            self.link.start()
        log.info("configuration reloaded")
        self.notifier.ready(self._status_line())

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        self.notifier.stopping()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link is not None:
            await self.link.stop()
        if self.api is not None:
            await self.api.close_followers()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.runner.cleanup(), 3.0)
        if self.store is not None:
            try:
                await asyncio.wait_for(self.store.close(), 10.0)
            except TimeoutError:
                log.error("database did not close within 10 s")
            else:
                log.info("database closed at seq %d", self.store.writer.last_seq)
        if self.bound_socket is not None:
            with contextlib.suppress(OSError):
                self.bound_socket.unlink()
        self.notifier.close()
