"""The systemd units: verified and scored offline by systemd-analyze, plus the decisions
that a later edit must not undo silently. Behaviour under a real systemd: tests/system/run.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ROOT / "systemd"
USER = SYSTEM / "user"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
MAX_EXPOSURE = 1.5


def parse(path: Path) -> dict[str, list[str]]:
    """``Section.Key -> values`` (keys may repeat in a unit file)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def runnable_copy(src: Path, dest: Path) -> None:
    """Copy the unit pair, with ExecStart='s program (not installed here) an existing one.

    `systemd-analyze verify` fails when ExecStart='s program is missing; nothing else is
    changed, and the .socket goes alongside so Requires=/Service= resolve to these files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    service = (src / "kimi-syncd.service").read_text()
    rewritten, count = re.subn(
        r"^ExecStart=\S+", "ExecStart=/bin/true", service, count=1, flags=re.MULTILINE
    )
    assert count == 1
    assert len(rewritten.splitlines()) == len(service.splitlines())
    (dest / "kimi-syncd.service").write_text(rewritten)
    shutil.copy(src / "kimi-syncd.socket", dest / "kimi-syncd.socket")


def analyze(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def user_runtime_dir(tmp_path: Path) -> dict[str, str]:
    """`--user` wants $XDG_RUNTIME_DIR to be an existing 0700 directory, even offline."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime)}


@needs_analyze
def test_system_units_verify_without_a_word(tmp_path: Path) -> None:
    runnable_copy(SYSTEM, tmp_path)
    result = analyze("verify", "./kimi-syncd.service", "./kimi-syncd.socket", cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_analyze
def test_user_units_verify_without_a_word(tmp_path: Path, user_runtime_dir: dict[str, str]) -> None:
    runnable_copy(USER, tmp_path / "units")
    result = analyze(
        "--user",
        "verify",
        "./kimi-syncd.service",
        "./kimi-syncd.socket",
        cwd=tmp_path / "units",
        env=user_runtime_dir,
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_analyze
def test_verify_does_complain_about_a_misspelt_key(tmp_path: Path) -> None:
    """The check above is only worth something if verify speaks up (it exits 0 here)."""
    runnable_copy(SYSTEM, tmp_path)
    service = tmp_path / "kimi-syncd.service"
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = analyze("verify", "./kimi-syncd.service", "./kimi-syncd.socket", cwd=tmp_path)
    assert "NoNewPrivilege" in result.stderr


@needs_analyze
def test_system_service_exposure(tmp_path: Path) -> None:
    result = analyze(
        "security",
        "--offline=true",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        str(SYSTEM / "kimi-syncd.service"),
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security: kimi-syncd.service exposure {match.group(1)}")
    assert result.returncode == 0, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("units", [SYSTEM, USER], ids=["system", "user"])
def test_shared_decisions(units: Path) -> None:
    service = parse(units / "kimi-syncd.service")
    socket = parse(units / "kimi-syncd.socket")
    assert service["Service.Type"] == ["notify"]
    assert service["Service.NotifyAccess"] == ["main"]
    assert service["Service.WatchdogSec"] == ["30s"]
    assert service["Service.Restart"] == ["on-failure"]
    assert service["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # A config error (78, EX_CONFIG) or a corrupt database (65, EX_DATAERR) never crash-loops.
    assert set(service["Service.RestartPreventExitStatus"][0].split()) == {"65", "78"}
    assert "--config ${KIMI_SYNCD_CONFIG}" in service["Service.ExecStart"][0]
    # The socket is outside any RuntimeDirectory=, which is deleted when the service stops.
    assert socket["Socket.ListenStream"] == ["%t/kimi-syncd.sock"]
    assert socket["Socket.FileDescriptorName"] == ["api"]
    assert socket["Socket.Service"] == ["kimi-syncd.service"]
    assert "kimi-syncd.socket" in service["Unit.Requires"]
    for key in service:
        assert not key.startswith("Service.LoadCredential") or ":" not in service[key][0], (
            "LoadCredential=NAME:PATH fails the start when PATH is missing"
        )


def test_system_unit_decisions() -> None:
    service = parse(SYSTEM / "kimi-syncd.service")
    socket = parse(SYSTEM / "kimi-syncd.socket")
    assert service["Service.ExecStart"][0].startswith("/opt/kimi-syncd/bin/kimi-syncd ")
    assert service["Service.DynamicUser"] == ["yes"]
    assert service["Service.StateDirectory"] == ["kimi-syncd"]
    assert service["Service.LoadCredential"] == ["upstream-token"]
    assert service["Service.IPAddressDeny"] == ["any"]
    assert service["Service.IPAddressAllow"] == ["localhost"]
    # A private user namespace turns every API peer into nobody: write_group could not work.
    assert service.get("Service.PrivateUsers", ["no"]) == ["no"]
    assert socket["Socket.SocketMode"] == ["0660"]
    assert socket["Socket.SocketGroup"] == ["kimi-syncd-api"]


def test_user_unit_uses_only_what_a_user_manager_applies() -> None:
    service = parse(USER / "kimi-syncd.service")
    for ignored in ("IPAddressDeny", "IPAddressAllow", "ProtectProc", "ProcSubset", "DynamicUser"):
        assert f"Service.{ignored}" not in service
    assert service["Service.ProtectHome"] == ["read-only"]  # yes/tmpfs hide the notify socket
    assert service["Service.PrivateUsers"] == ["yes"]  # namespace settings need it
    assert service["Service.ExecStart"][0].startswith(
        "%h/.local/share/kimi-syncd/venv/bin/kimi-syncd "
    )
    assert parse(USER / "kimi-syncd.socket")["Socket.SocketMode"] == ["0600"]


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_install_script_dry_run(tmp_path: Path, user: bool) -> None:
    prefix = tmp_path / "root"
    args = [
        "bash",
        str(ROOT / "scripts" / "install-service.sh"),
        "--dry-run",
        "--prefix",
        str(prefix),
    ]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("XDG_CONFIG_HOME", None)
    result = subprocess.run(
        [*args, "--user"] if user else args, env=env, capture_output=True, text=True, check=True
    )
    assert not prefix.exists()  # a dry run changes nothing
    out = result.stdout
    units = "/.config/systemd/user/" if user else "/etc/systemd/system/"
    for unit in ("kimi-syncd.service", "kimi-syncd.socket"):
        assert f"{prefix}{tmp_path / 'home' if user else ''}{units}{unit}" in out
    assert "-m compileall" in out
    assert "enable --now kimi-syncd.socket" in out
    removal = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "uninstall-service.sh"),
            "--dry-run",
            "--prefix",
            str(prefix),
        ]
        + (["--user"] if user else []),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rm -f" in removal.stdout
