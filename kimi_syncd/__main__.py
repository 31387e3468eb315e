"""`kimi-syncd` (and `python -m kimi_syncd`): run the daemon, check its config, rebuild state."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from kimi_syncd import __version__
from kimi_syncd.errors import EX_CONFIG, EX_OK, EX_SOFTWARE, FatalError

EX_NOINPUT = 66  # sysexits.h: `rebuild` found no database to replay

DESCRIPTION = """\
kimi-syncd keeps one durable connection to the Kimi Proxy backend's /ws, stores every frame
and every outgoing message in SQLite, and serves per-session state on a local Unix socket.
With no command it runs in the foreground (stop it with Ctrl-C or SIGTERM)."""

EPILOG = """\
exit status: 0 ok, 65 corrupt database, 66 no database (rebuild), 73 cannot create
state/socket, 74 database failed or vanished, 75 database in use by another process,
78 configuration error.  Configuration: flags > KIMI_SYNCD_* env > TOML file > defaults."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML config file (default: $KIMI_SYNCD_CONFIG, "
        "/etc/kimi-syncd/config.toml as root, else "
        "$XDG_CONFIG_HOME/kimi-syncd/config.toml)",
    )
    parser.add_argument("--upstream", metavar="URL", help="backend WebSocket URL")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="database directory")
    parser.add_argument("--socket", type=Path, metavar="PATH", help="API socket path")
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-syncd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kimi-syncd {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    _common(run)
    check = sub.add_parser(
        "check-config",
        help="validate the configuration and print every effective value "
        "with its source (secrets shown as ***)",
    )
    _common(check)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    rebuild = sub.add_parser(
        "rebuild",
        help="offline: replay the event log into fresh session state (the daemon must be stopped)",
    )
    _common(rebuild)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "upstream.url": args.upstream,
        "store.state_dir": args.state_dir,
        "api.socket": args.socket,
        "log.level": args.log_level,
    }


def _merge(top: argparse.Namespace, sub: argparse.Namespace) -> argparse.Namespace:
    # Flags may come before or after the command: `kimi-syncd --config X check-config`.
    for key, value in vars(top).items():
        if getattr(sub, key, None) is None and value is not None:
            setattr(sub, key, value)
    return sub


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Until the daemon installs its own handlers nothing is open yet: stopping is exiting.
    raise SystemExit(EX_OK)


def main(argv: list[str] | None = None) -> int:
    # First thing: a SIGTERM during start-up must stop us cleanly (exit 0), not kill us.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    from kimi_syncd import config

    flags = _flags(args)
    try:
        loaded = config.load(args.config, flags=flags)
    except config.ConfigError as exc:
        for line in exc.problems:
            print(f"kimi-syncd: config: {line}", file=sys.stderr)
        return EX_CONFIG
    if command == "check-config":
        return _check_config(loaded, as_json=bool(getattr(args, "json", False)))
    if command == "rebuild":
        return _rebuild_offline(loaded)
    return _run(loaded, flags)


def _check_config(loaded: Any, *, as_json: bool) -> int:
    from kimi_syncd import config

    rows = config.effective(loaded)
    if as_json:
        import json

        print(
            json.dumps(
                {
                    "config_file": str(loaded.config_file),
                    "config_file_found": loaded.config_file_found,
                    "settings": [{"key": k, "value": v, "source": s} for k, v, s in rows],
                },
                indent=2,
            )
        )
        return EX_OK
    found = "" if loaded.config_file_found else " (not present: defaults apply)"
    print(f"# config file: {loaded.config_file}{found}")
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value}  [{source}]")
    print("# configuration OK")
    return EX_OK


def _run(loaded: Any, flags: dict[str, Any]) -> int:
    from kimi_syncd.daemon import Daemon, configure_logging

    s = loaded.settings
    configure_logging(s.log.level, s.log.format)
    daemon = Daemon(loaded, flags=flags)
    try:
        return asyncio.run(daemon.serve())
    except KeyboardInterrupt:
        return EX_OK


def _rebuild_offline(loaded: Any) -> int:
    """Replay the event log into fresh session state, with the daemon stopped.

    A running daemon is detected by the store's exclusive lock (taken by `Store.open`, held
    by the daemon for as long as it runs): we are refused with exit 75 and a message naming
    its pid, before anything is read or written. The lock, unlike probing the API socket,
    also catches a daemon whose socket lives elsewhere or is not answering yet.
    """
    from kimi_syncd.store import Store

    db_path = loaded.settings.store.db_path
    if not db_path.exists():
        # Do not create an empty database just to replay nothing into it.
        print(f"kimi-syncd: no database at {db_path}: nothing to rebuild", file=sys.stderr)
        return EX_NOINPUT

    async def go() -> dict[str, Any]:
        store = await Store.open(loaded.settings.store, loaded.settings.outbox)
        try:
            result: dict[str, Any] = await store.writer.call("rebuild")
            return result
        finally:
            await store.close()

    try:
        result = asyncio.run(go())
    except FatalError as exc:
        print(f"kimi-syncd: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        print(f"kimi-syncd: rebuild failed: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    print(f"rebuilt {result['sessions']} sessions from {result['events_replayed']} events")
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
