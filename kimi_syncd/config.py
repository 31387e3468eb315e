"""Configuration: one `Settings` object from flags > `KIMI_SYNCD_*` env > TOML file > defaults.

Every mistake is reported as one line naming the key and where its value came from, and
raises `ConfigError`; the daemon turns that into exit status 78 (EX_CONFIG), never a traceback.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kimi_syncd import paths

ENV_PREFIX = "KIMI_SYNCD_"
# Variables with our prefix that are not settings: the config path itself and the CLI's socket.
NON_SETTING_ENV = frozenset({paths.CONFIG_ENV, paths.SOCKET_ENV})
CREDENTIAL_NAME = "upstream-token"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
REDACTED = "***"

# The command-line flags that override settings (see kimi_syncd.__main__).
FLAG_NAMES = {
    "upstream.url": "--upstream",
    "store.state_dir": "--state-dir",
    "api.socket": "--socket",
    "log.level": "--log-level",
}

Source = str  # "default", "file <path>", "env KIMI_SYNCD_…", "flag --…"


class ConfigError(Exception):
    """One or more configuration problems, each a self-contained line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class UpstreamSettings(_Section):
    url: str = Field(
        "ws://127.0.0.1:8000/ws", description="Backend WebSocket URL (ws:// or wss://)"
    )
    token: SecretStr | None = Field(None, description="Bearer token sent as Authorization header")
    token_file: Path | None = Field(None, description="File holding the bearer token")
    ca_file: Path | None = Field(None, description="Extra CA bundle (PEM) to trust for wss://")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with the WebSocket handshake"
    )
    ping_interval: float = Field(20.0, gt=0, description="Seconds between heartbeat pings")
    ping_timeout: float = Field(20.0, gt=0, description="Seconds to wait for a pong")
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest accepted frame")
    compression: bool = Field(True, description="Negotiate permessage-deflate")
    open_timeout: float = Field(10.0, gt=0, description="Seconds allowed for the handshake")
    close_timeout: float = Field(5.0, gt=0, description="Seconds allowed for the closing handshake")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise ValueError(f"malformed URL {value!r}: {exc}") from None
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"URL scheme must be ws or wss, got {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise ValueError(f"URL {value!r} has no host")
        return value

    @field_validator("token_file", "ca_file")
    @classmethod
    def _check_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                with value.open("rb") as fh:
                    fh.read(1)
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() == "authorization":
                raise ValueError("set the bearer token with token/token_file, not in headers")
        return value


class ReconnectSettings(_Section):
    initial_delay: float = Field(1.0, gt=0, description="First backoff ceiling, seconds")
    max_delay: float = Field(60.0, gt=0, description="Largest backoff ceiling, seconds")
    multiplier: float = Field(2.0, ge=1.0, description="Backoff growth per failed attempt")


class BreakerSettings(_Section):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it")
    cooldown: float = Field(60.0, gt=0, description="Seconds open before one probe (jittered)")
    min_healthy_seconds: float = Field(
        5.0, ge=0, description="A connection shorter than this counts as a failure"
    )


class StoreSettings(_Section):
    state_dir: Path = Field(
        default_factory=lambda: Path(paths.default_state_dir()), description="Holds kimi-syncd.db"
    )
    retention_days: float = Field(30.0, ge=0, description="Prune events older than this (0: never)")
    max_events: int = Field(5_000_000, ge=0, description="Keep at most this many events (0: all)")
    batch_max: int = Field(1000, ge=1, description="Most items committed in one transaction")
    batch_delay_ms: float = Field(2.0, ge=0, description="Wait this long to fill a batch")
    ingest_queue: int = Field(2_000, ge=1, description="Frames buffered between link and writer")

    @property
    def db_path(self) -> Path:
        return self.state_dir / paths.DB_NAME


class OutboxSettings(_Section):
    max_messages: int = Field(100_000, ge=1, description="Pending messages allowed")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Pending bytes allowed")
    default_ttl: float = Field(7 * 86400.0, ge=0, description="Seconds before expiry (0: never)")
    max_attempts: int = Field(10, ge=1, description="Sends before a message is dead")
    window: int = Field(2048, ge=1, description="Messages sent but not yet confirmed, at most")


class ApiSettings(_Section):
    socket: Path = Field(
        default_factory=lambda: Path(paths.default_socket()), description="Unix socket path"
    )
    socket_mode: str = Field("0660", description="Octal file mode of the socket")
    write_group: str | None = Field(None, description="Group allowed to enqueue and cancel")
    max_body_bytes: int = Field(1024 * 1024, ge=64, description="Largest request body")
    follow_buffer: int = Field(10_000, ge=1, description="Live events buffered per follower")
    heartbeat: float = Field(15.0, gt=0, description="Seconds between idle follow heartbeats")

    @field_validator("socket_mode")
    @classmethod
    def _check_mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(
                f"socket_mode must be an octal string like '0660', got {value!r}"
            ) from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"socket_mode {value!r} is outside 0000-0777")
        return value

    @field_validator("socket")
    @classmethod
    def _check_socket(cls, value: Path) -> Path:
        if len(os.fsencode(value)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path is {len(os.fsencode(value))} bytes; AF_UNIX allows "
                f"{MAX_SOCKET_PATH}: choose a shorter path"
            )
        return value

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
    format: Literal["text", "json"] = Field("text", description="text or json lines")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


_toml_data: ContextVar[dict[str, Any]] = ContextVar("_toml_data", default={})  # noqa: B039


class _TomlSource(PydanticBaseSettingsSource):
    """The already-parsed TOML file (parsed by `load` for precise syntax errors)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _toml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    reconnect: ReconnectSettings = Field(default_factory=ReconnectSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags arrive as init kwargs; they beat the environment, which beats the file.
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def upstream_token(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The bearer token: `token`, else `token_file`, else the systemd credential."""
        if self.upstream.token is not None:
            return self.upstream.token.get_secret_value().strip() or None
        path = self.upstream.token_file
        if path is None:
            creds = environ.get("CREDENTIALS_DIRECTORY")
            candidate = Path(creds) / CREDENTIAL_NAME if creds else None
            if candidate is None or not candidate.exists():
                return None
            path = candidate
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"upstream.token_file: cannot read {path}: {exc}"]) from None


def _iter_leaves(
    data: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "headers":
            yield from _iter_leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _section_fields(section: str) -> list[str]:
    field = Settings.model_fields.get(section)
    model = field.annotation if field is not None else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _suggest(loc: tuple[str, ...]) -> str:
    if len(loc) == 1:
        choices = list(Settings.model_fields)
    elif len(loc) == 2:
        choices = _section_fields(loc[0])
    else:
        return ""
    close = difflib.get_close_matches(loc[-1], choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join((*loc[:-1], close[0]))!r}?"
    return f"; known keys: {', '.join(choices)}" if choices else ""


def _env_name(loc: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(part.upper() for part in loc)


def _read_toml(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if explicit:
            raise ConfigError([f"config file {path}: not found"]) from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: invalid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {path}: cannot read: {exc.strerror or exc}"]) from None


class LoadedConfig(BaseModel):
    """Settings plus where each value came from (for `check-config`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    settings: Settings
    config_file: Path
    config_file_found: bool
    sources: dict[str, Source]

    def source_of(self, dotted: str) -> Source:
        return self.sources.get(dotted, "default")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        nested.setdefault(section, {})[key] = value
    return nested


def _unknown_env_problems(environ: Mapping[str, str]) -> list[str]:
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        loc = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if len(loc) == 1 and loc[0] in Settings.model_fields:
            continue  # a whole section as JSON: validated with the rest
        if (
            len(loc) >= 2
            and loc[1] in _section_fields(loc[0])
            and (len(loc) == 2 or loc[1] == "headers")
        ):
            continue
        problems.append(f"{'.'.join(loc)} (from env {name}): unknown setting{_suggest(loc[:2])}")
    return problems


def load(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Build the effective settings; raise `ConfigError` listing every problem found.

    `flags` maps dotted keys (``"upstream.url"``) to values given on the command line.
    """
    env = os.environ if environ is None else environ
    if config_file is not None:
        path, explicit = config_file, True
    else:
        name, explicit = paths.config_file_from_env(env)
        path = Path(name)
    toml_data = _read_toml(path, explicit)
    flag_values = {k: v for k, v in (flags or {}).items() if v is not None}

    sources: dict[str, Source] = {}
    for loc in _iter_leaves(toml_data):
        sources[".".join(loc)] = f"file {path}"
    env_source = EnvSettingsSource(
        Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
    )
    problems = _unknown_env_problems(env)
    env_data: dict[str, Any] = {}
    try:
        env_data = env_source()
    except Exception as exc:  # pydantic-settings raises SettingsError on undecodable JSON
        problems.append(f"environment {ENV_PREFIX}*: {exc}")
    for loc in _iter_leaves(env_data):
        sources[".".join(loc)] = f"env {_env_name(loc)}"
    for dotted, _flag in flag_values.items():
        flag_name = FLAG_NAMES.get(dotted, "--" + dotted.replace("_", "-"))
        sources[dotted] = f"flag {flag_name}"

    token = _toml_data.set(toml_data)
    try:
        settings = Settings(**_nest(flag_values))
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(str(part) for part in err["loc"])
            dotted = ".".join(loc[:2]) if loc and loc[0] in Settings.model_fields else ".".join(loc)
            origin = _origin(sources, dotted, ".".join(loc))
            if err["type"] == "extra_forbidden":
                if origin.startswith("env "):
                    continue  # already reported, with the variable's name, above
                problems.append(f"{'.'.join(loc)} (from {origin}): unknown key{_suggest(loc)}")
            else:
                message = err["msg"].removeprefix("Value error, ")
                problems.append(f"{dotted} (from {origin}): {message}")
        raise ConfigError(_dedupe(problems)) from None
    finally:
        _toml_data.reset(token)
    if problems:
        raise ConfigError(_dedupe(problems))
    try:
        settings.upstream_token(env)
    except ConfigError as exc:
        raise ConfigError(exc.problems) from None
    return LoadedConfig(
        settings=settings,
        config_file=path,
        config_file_found=bool(toml_data) or path.exists(),
        sources=sources,
    )


def _origin(sources: Mapping[str, Source], *keys: str) -> Source:
    for key in keys:
        if key in sources:
            return sources[key]
    for key in keys:  # a whole unknown table: any leaf below it names the file
        for dotted, origin in sources.items():
            if dotted.startswith(key + "."):
                return origin
    return "default"


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def effective(loaded: LoadedConfig) -> list[tuple[str, str, Source]]:
    """Every setting as (dotted key, display value, source), secrets shown as ***."""
    rows: list[tuple[str, str, Source]] = []
    dumped = loaded.settings.model_dump(mode="json")
    for section, values in dumped.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key == "token":
                shown = REDACTED if value is not None else "(unset)"
            elif key == "headers":
                shown = ", ".join(f"{name}: {REDACTED}" for name in value) or "(none)"
            elif value is None:
                shown = "(unset)"
            else:
                shown = str(value)
            rows.append((dotted, shown, loaded.source_of(dotted)))
    return rows
