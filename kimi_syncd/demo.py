"""`make demo`: the simulated backend + the daemon on temporary paths, live session state.

Everything it starts lives in one temporary directory and stops on Ctrl-C (or after
--seconds). Nothing touches the user's real state or socket.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kimi_syncd import ctl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kimi-syncd exited with status {proc.returncode}")
        if path.exists():
            with contextlib.suppress(ctl.CtlError):
                if ctl.Client(path, timeout=1).request("GET", "/v1/health")[0] == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"kimi-syncd did not open {path} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-syncd-demo", description=__doc__)
    parser.add_argument("--rate", type=float, default=4.0, help="simulated events per second")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: ^C)")
    parser.add_argument("--refresh", type=float, default=1.0)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="kimi-syncd-demo-"))
    sock = workdir / "api.sock"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIMI_SYNCD_")}
    env["KIMI_SYNCD_CONFIG"] = str(workdir / "none.toml")
    Path(env["KIMI_SYNCD_CONFIG"]).write_text("")
    procs: list[subprocess.Popen[bytes]] = []
    log = (workdir / "daemon.log").open("wb")
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kimi_syncd.sim",
                    "--port",
                    str(port),
                    "--rate",
                    str(args.rate),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kimi_syncd",
                "--upstream",
                f"ws://127.0.0.1:{port}/ws",
                "--state-dir",
                str(workdir / "state"),
                "--socket",
                str(sock),
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
        procs.append(daemon)
        _wait_for_socket(sock, daemon)
        print(f"simulated backend on ws://127.0.0.1:{port}/ws, daemon socket {sock}")
        print(f"try, in another terminal:  kimi-syncctl --socket {sock} events --follow")
        time.sleep(1.5)
        started = time.monotonic()
        while args.seconds <= 0 or time.monotonic() - started < args.seconds:
            if daemon.poll() is not None:
                print(f"kimi-syncd exited ({daemon.returncode}); log: {workdir}/daemon.log")
                return 1
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(f"kimi-syncd demo — {time.strftime('%H:%M:%S')}  (Ctrl-C to stop)\n")
            ctl.main(["--socket", str(sock), "status"])
            print()
            ctl.main(["--socket", str(sock), "sessions", "--all"])
            print("\nactive session gauge: ", end="", flush=True)
            ctl.main(
                ["--socket", str(sock), "gauge", "--format", "{name}: {pct:.1f}% ({tokens} tokens)"]
            )
            sys.stdout.flush()
            time.sleep(args.refresh)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
