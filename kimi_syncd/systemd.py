"""The systemd protocols in stdlib code: sd_notify(3), the watchdog and sd_listen_fds(3).

Nothing here does I/O at import time or raises because systemd went away: a daemon must
not die because its supervisor's notify socket vanished.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_fds", "watchdog_interval"]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify(3) datagrams to ``$NOTIFY_SOCKET``; a no-op when it is unset.

    Messages go out from the calling process: with ``NotifyAccess=main`` systemd drops
    those of any other process, so call this from the daemon's main process only.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        if raw.startswith("@"):  # abstract namespace: a leading NUL byte
            return cls("\0" + raw[1:])
        if raw.startswith("/"):
            return cls(raw)
        log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor @abstract", raw)
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send_raw(self, message: str) -> bool:
        """Send one datagram; True if it was handed to the kernel. Never raises."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %r failed (reported once): %s", self._address, exc)
            return False
        return True

    def send(self, **fields: str | int | bool) -> bool:
        """``send(READY=1, STATUS="ok")`` sends ``READY=1\\nSTATUS=ok``."""
        lines = []
        for key, value in fields.items():
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key.upper()}={text.replace(chr(10), ' ')}")
        return self.send_raw("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the monotonic time of the reload start.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def errno(self, n: int) -> bool:
        return self.send(ERRNO=n)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID", "")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring watchdog: bad WATCHDOG_PID=%r", wpid)
            return None
    return usec / 2 / 1_000_000


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, unset_env: bool = True
) -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd socket activation, grouped by ``FileDescriptorName=``.

    Unnamed ones are under ``"unknown"``. Not for us or bad values: ``{}`` (bad values are
    logged). With ``unset_env`` the ``LISTEN_*`` variables are removed in every case.
    """
    pid_s, fds_s = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    names_s = environ.get("LISTEN_FDNAMES")
    if unset_env:
        for var in _LISTEN_VARS:
            environ.pop(var, None)
    if pid_s is None or fds_s is None:
        return {}
    try:
        pid, count = int(pid_s), int(fds_s)
    except ValueError:
        log.warning("ignoring socket activation: LISTEN_PID=%r LISTEN_FDS=%r", pid_s, fds_s)
        return {}
    if pid != os.getpid():
        log.debug("LISTEN_PID=%d is not us (%d): not socket-activated", pid, os.getpid())
        return {}
    if count < 0:
        log.warning("ignoring socket activation: LISTEN_FDS=%r", fds_s)
        return {}
    names = names_s.split(":") if names_s is not None else ["unknown"] * count
    if len(names) != count:
        log.warning("ignoring socket activation: %d fds but LISTEN_FDNAMES=%r", count, names_s)
        return {}
    result: dict[str, list[socket.socket]] = {}
    for fd, name in enumerate(names, SD_LISTEN_FDS_START):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family, type and protocol are detected
        except OSError as exc:
            log.warning("skipping passed fd %d (%s): %s", fd, name or "unknown", exc)
            continue
        result.setdefault(name or "unknown", []).append(sock)
    return result
