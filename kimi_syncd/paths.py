"""Default file locations (FHS as root, XDG otherwise, systemd's directories when set).

Stdlib only: `kimi-syncctl gauge` imports this on every shell prompt, so it must stay cheap.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

APP = "kimi-syncd"
DB_NAME = "kimi-syncd.db"
SOCKET_NAME = "kimi-syncd.sock"
CONFIG_ENV = "KIMI_SYNCD_CONFIG"
SOCKET_ENV = "KIMI_SYNCD_SOCKET"


def _is_root() -> bool:
    return os.geteuid() == 0


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or Path.home())


def _first_dir(value: str | None) -> Path | None:
    # systemd passes colon-separated lists when a unit names several directories.
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if first else None


def default_config_file(environ: Mapping[str, str] = os.environ) -> Path:
    if _is_root():
        return Path("/etc") / APP / "config.toml"
    xdg = environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else _home(environ) / ".config"
    return base / APP / "config.toml"


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    systemd_dir = _first_dir(environ.get("STATE_DIRECTORY"))
    if systemd_dir is not None:
        return systemd_dir
    if _is_root():
        return Path("/var/lib") / APP
    xdg = environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else _home(environ) / ".local" / "state"
    return base / APP


def default_socket(environ: Mapping[str, str] = os.environ) -> Path:
    runtime_dir = _first_dir(environ.get("RUNTIME_DIRECTORY"))
    if runtime_dir is not None:
        return runtime_dir / SOCKET_NAME
    if _is_root():
        return Path("/run") / SOCKET_NAME
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / SOCKET_NAME
    # No runtime dir (e.g. a bare ssh session): a private per-uid directory, as tmux does.
    return Path("/tmp") / f"{APP}-{os.geteuid()}" / SOCKET_NAME


def config_file_from_env(environ: Mapping[str, str] = os.environ) -> tuple[Path, bool]:
    """The config file to read and whether it was named explicitly (a missing one is an error)."""
    explicit = environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit), True
    return default_config_file(environ), False


def client_socket(environ: Mapping[str, str] = os.environ) -> Path:
    """The socket the CLI talks to: as the daemon resolves it, without importing pydantic."""
    for name in (SOCKET_ENV, "KIMI_SYNCD_API__SOCKET"):
        value = environ.get(name)
        if value:
            return Path(value)
    path, _explicit = config_file_from_env(environ)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        configured = data.get("api", {}).get("socket")
        if isinstance(configured, str) and configured:
            return Path(configured)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass  # the daemon reports config problems; the client just falls back to the default
    return default_socket(environ)
