"""Configuration: precedence, defaults, every class of mistake, check-config's output."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kimi_syncd import config, paths
from kimi_syncd.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("KIMI_SYNCD_") or name in (
            "STATE_DIRECTORY",
            "RUNTIME_DIRECTORY",
            "CREDENTIALS_DIRECTORY",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults_without_any_file() -> None:
    loaded = config.load()
    s = loaded.settings
    assert s.upstream.url == "ws://127.0.0.1:8000/ws"
    assert s.store.db_path.name == "kimi-syncd.db"
    assert s.api.mode == 0o660
    assert not loaded.config_file_found


def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path, '[upstream]\nurl = "ws://file:1/ws"\nping_interval = 7\n[log]\nlevel = "ERROR"\n'
    )
    monkeypatch.setenv("KIMI_SYNCD_UPSTREAM__URL", "ws://env:2/ws")
    monkeypatch.setenv("KIMI_SYNCD_LOG__LEVEL", "warning")
    loaded = config.load(cfg, flags={"upstream.url": "ws://flag:3/ws"})
    s = loaded.settings
    assert s.upstream.url == "ws://flag:3/ws"
    assert s.log.level == "WARNING"  # env beats file
    assert s.upstream.ping_interval == 7  # file beats default
    assert s.upstream.ping_timeout == 20  # default
    assert loaded.source_of("upstream.url") == "flag --upstream"
    assert loaded.source_of("log.level") == "env KIMI_SYNCD_LOG__LEVEL"
    assert loaded.source_of("upstream.ping_interval") == f"file {cfg}"
    assert loaded.source_of("upstream.ping_timeout") == "default"


def test_config_file_from_env_and_explicit_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, '[log]\nlevel = "DEBUG"\n')
    monkeypatch.setenv("KIMI_SYNCD_CONFIG", str(cfg))
    assert config.load().settings.log.level == "DEBUG"
    monkeypatch.setenv("KIMI_SYNCD_CONFIG", str(tmp_path / "nope.toml"))
    assert problems() == [f"config file {tmp_path / 'nope.toml'}: not found"]
    assert problems(config_file=tmp_path / "gone.toml")[0].endswith("not found")


def test_default_file_in_xdg_config_home(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        assert Path(paths.default_config_file()) == Path("/etc/kimi-syncd/config.toml")
        return
    target = tmp_path / "xdg-config" / "kimi-syncd" / "config.toml"
    target.parent.mkdir(parents=True)
    target.write_text('[log]\nformat = "json"\n')
    assert config.load().settings.log.format == "json"


def test_unknown_keys_suggest_the_right_one(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[upstream]\nping_intervl = 3\n[stroe]\nx = 1\n")
    found = problems(config_file=cfg)
    assert any(
        "upstream.ping_intervl" in p
        and "did you mean 'upstream.ping_interval'" in p
        and f"file {cfg}" in p
        for p in found
    )
    assert any(p.startswith("stroe ") and "did you mean 'store'" in p for p in found)


def test_unknown_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMI_SYNCD_UPSTREAM__URLL", "ws://x/ws")
    found = problems()
    assert found == [
        "upstream.urll (from env KIMI_SYNCD_UPSTREAM__URLL): unknown setting; "
        "did you mean 'upstream.url'?"
    ]


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ('[upstream]\nurl = "http://x/ws"\n', "upstream.url", "scheme must be ws or wss"),
        ('[upstream]\nurl = "ws://:99999/ws"\n', "upstream.url", "URL"),
        ("[upstream]\nping_interval = -1\n", "upstream.ping_interval", "greater than 0"),
        ('[store]\nbatch_max = "many"\n', "store.batch_max", "valid integer"),
        ('[api]\nsocket_mode = "rw"\n', "api.socket_mode", "octal"),
        ('[log]\nlevel = "LOUD"\n', "log.level", "Input should be"),
        ('[upstream]\ntoken_file = "/nonexistent/token"\n', "upstream.token_file", "cannot read"),
        ('[upstream]\nca_file = "/nonexistent/ca.pem"\n', "upstream.ca_file", "cannot read"),
        ('[api]\nsocket = "/tmp/' + "x" * 120 + '.sock"\n', "api.socket", "AF_UNIX"),
        ('[upstream]\nheaders = {Authorization = "x"}\n', "upstream.headers", "token"),
    ],
)
def test_each_class_of_mistake_names_key_and_source(
    tmp_path: Path, toml: str, key: str, fragment: str
) -> None:
    cfg = write(tmp_path, toml)
    found = problems(config_file=cfg)
    assert len(found) == 1, found
    assert found[0].startswith(f"{key} (from file {cfg}): ")
    assert fragment in found[0]


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[upstream\nurl=")
    (line,) = problems(config_file=cfg)
    assert "invalid TOML" in line and str(cfg) in line


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[upstream]\nurl = "http://x"\n[store]\nbatch_max = 0\n')
    assert len(problems(config_file=cfg)) == 2


def test_token_sources_and_redaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = write(tmp_path, "s3cret-file\n", "token")
    cfg = write(tmp_path, f'[upstream]\ntoken_file = "{token_file}"\n')
    loaded = config.load(cfg)
    assert loaded.settings.upstream_token() == "s3cret-file"
    rows = {k: v for k, v, _ in config.effective(loaded)}
    assert "s3cret" not in repr(rows)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "upstream-token").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert config.load().settings.upstream_token() == "from-systemd"
    monkeypatch.setenv("KIMI_SYNCD_UPSTREAM__TOKEN", "inline-secret")
    loaded = config.load()
    assert loaded.settings.upstream_token() == "inline-secret"
    assert "inline-secret" not in repr(loaded.settings)
    assert {k: v for k, v, _ in config.effective(loaded)}["upstream.token"] == "***"


def test_systemd_directories_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    s = config.load().settings
    assert s.store.state_dir == tmp_path / "state"
    assert s.api.socket == tmp_path / "run" / "kimi-syncd.sock"


def test_user_defaults_follow_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "_is_root", lambda: False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    assert Path(paths.default_state_dir()) == tmp_path / "st" / "kimi-syncd"
    assert Path(paths.default_socket()) == tmp_path / "rt" / "kimi-syncd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(paths.default_state_dir()) == tmp_path / "home/.local/state/kimi-syncd"
    assert Path(paths.default_socket()) == Path(f"/tmp/kimi-syncd-{os.geteuid()}/kimi-syncd.sock")


def test_root_defaults_follow_fhs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "_is_root", lambda: True)
    assert Path(paths.default_state_dir()) == Path("/var/lib/kimi-syncd")
    assert Path(paths.default_socket()) == Path("/run/kimi-syncd.sock")
    assert Path(paths.default_config_file()) == Path("/etc/kimi-syncd/config.toml")


def test_example_config_documents_exactly_the_model() -> None:
    text = (ROOT / "config.example.toml").read_text()
    data = tomllib.loads(text)
    # Keys commented out in the example (no safe literal default) still count as documented.
    documented: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        candidate = line.lstrip("# ").split("=", 1)[0].strip()
        if "=" in line and candidate.isidentifier() and section:
            documented.add(f"{section}.{candidate}")
    model = {
        f"{name}.{key}"
        for name, field in Settings.model_fields.items()
        for key in field.annotation.model_fields
    }  # type: ignore[union-attr]
    assert documented == model
    loaded = {f"{s}.{k}" for s, values in data.items() for k in values}
    assert loaded <= model
    settings = Settings.model_validate(data)  # the example loads as is
    defaults = Settings()
    for dotted in loaded:
        section, key = dotted.split(".")
        assert getattr(getattr(settings, section), key) == getattr(
            getattr(defaults, section), key
        ), f"{dotted}: example differs from the default"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_SYNCD_")}
    return subprocess.run(
        [sys.executable, "-m", "kimi_syncd", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_config_cli_ok_shows_sources_and_hides_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[upstream]\ntoken = "hunter2"\n')
    result = run_cli(
        "check-config",
        "--config",
        str(cfg),
        "--log-level",
        "debug",
        env={"KIMI_SYNCD_UPSTREAM__PING_TIMEOUT": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "upstream.token" in result.stdout and "***" in result.stdout
    assert "[flag --log-level]" in result.stdout
    assert "[env KIMI_SYNCD_UPSTREAM__PING_TIMEOUT]" in result.stdout
    assert f"[file {cfg}]" in result.stdout


def test_check_config_cli_mistakes_exit_78_one_line_each_no_traceback(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[upstream]\nurl = "http://x"\nping_intervl = 1\n')
    result = run_cli("check-config", "--config", str(cfg))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("kimi-syncd: config: upstream.") for line in lines)
    assert "Traceback" not in result.stderr


def test_daemon_start_with_bad_config_exits_78_without_traceback(tmp_path: Path) -> None:
    result = run_cli("--upstream", "ftp://nope", "--state-dir", str(tmp_path))
    assert result.returncode == 78
    assert "upstream.url (from flag --upstream)" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help() -> None:
    from kimi_syncd import __version__

    assert run_cli("--version").stdout.strip() == f"kimi-syncd {__version__}"
    assert "check-config" in run_cli("--help").stdout
