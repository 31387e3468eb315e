"""Exit statuses (sysexits.h) and the errors that map to them.

systemd units list the statuses that a restart cannot fix in RestartPreventExitStatus=, so
a config mistake or a corrupt database never turns into a crash loop.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65  # the database is corrupt or not a kimi-syncd database
EX_UNAVAILABLE = 69  # (ctl) the daemon is not running
EX_SOFTWARE = 70  # a bug: an unexpected exception
EX_CANTCREAT = 73  # the state directory or database cannot be created / written
EX_IOERR = 74  # the database file vanished or an unrecoverable I/O error
EX_TEMPFAIL = 75  # the database is locked by another kimi-syncd; (ctl) the daemon answered 5xx
EX_CONFIG = 78  # configuration error


class FatalError(Exception):
    """An error the daemon cannot continue past; carries its exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
