"""Default file locations (FHS as root, XDG otherwise, systemd's directories when set).

Strings and `os.path` only, and `tomllib` only when a config file exists: `kimi-syncctl
gauge` resolves the socket through this module on every shell prompt, so it must stay cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

APP = "kimi-syncd"
DB_NAME = "kimi-syncd.db"
SOCKET_NAME = "kimi-syncd.sock"
CONFIG_ENV = "KIMI_SYNCD_CONFIG"
SOCKET_ENV = "KIMI_SYNCD_SOCKET"


def _is_root() -> bool:
    return os.geteuid() == 0


def _home(environ: Mapping[str, str]) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def _first_dir(value: str | None) -> str | None:
    # systemd passes colon-separated lists when a unit names several directories.
    if not value:
        return None
    return value.split(":", 1)[0] or None


def default_config_file(environ: Mapping[str, str] = os.environ) -> str:
    if _is_root():
        return os.path.join("/etc", APP, "config.toml")
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    return os.path.join(base, APP, "config.toml")


def default_state_dir(environ: Mapping[str, str] = os.environ) -> str:
    systemd_dir = _first_dir(environ.get("STATE_DIRECTORY"))
    if systemd_dir is not None:
        return systemd_dir
    if _is_root():
        return os.path.join("/var/lib", APP)
    base = environ.get("XDG_STATE_HOME") or os.path.join(_home(environ), ".local", "state")
    return os.path.join(base, APP)


def default_socket(environ: Mapping[str, str] = os.environ) -> str:
    runtime_dir = _first_dir(environ.get("RUNTIME_DIRECTORY"))
    if runtime_dir is not None:
        return os.path.join(runtime_dir, SOCKET_NAME)
    if _is_root():
        return os.path.join("/run", SOCKET_NAME)
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, SOCKET_NAME)
    # No runtime dir (e.g. a bare ssh session): a private per-uid directory, as tmux does.
    return os.path.join("/tmp", f"{APP}-{os.geteuid()}", SOCKET_NAME)


def config_file_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The config file to read and whether it was named explicitly (a missing one is an error)."""
    explicit = environ.get(CONFIG_ENV)
    if explicit:
        return explicit, True
    return default_config_file(environ), False


def client_socket(environ: Mapping[str, str] = os.environ) -> str:
    """The socket the CLI talks to: as the daemon resolves it, without importing pydantic."""
    for name in (SOCKET_ENV, "KIMI_SYNCD_API__SOCKET"):
        value = environ.get(name)
        if value:
            return value
    path, _explicit = config_file_from_env(environ)
    if os.path.exists(path):
        import tomllib

        try:
            with open(path, "rb") as fh:
                configured = tomllib.load(fh).get("api", {}).get("socket")
            if isinstance(configured, str) and configured:
                return configured
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            pass  # the daemon reports config problems; the client just falls back
    return default_socket(environ)
