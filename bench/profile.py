"""Sampling profiles of the daemon with py-spy (attached by pid, non-blocking)."""

from __future__ import annotations

import collections
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Where time is spent, by the file a sampled frame belongs to (first match wins).
BUCKETS: tuple[tuple[str, str], ...] = (
    ("kimi_syncd/protocol", "kimi_syncd.protocol (decode)"),
    ("kimi_syncd/state", "kimi_syncd.state (reducer)"),
    ("kimi_syncd/store/writer", "kimi_syncd.store.writer"),
    ("kimi_syncd/store", "kimi_syncd.store (other)"),
    ("kimi_syncd/link", "kimi_syncd.link"),
    ("kimi_syncd/api", "kimi_syncd.api"),
    ("kimi_syncd/", "kimi_syncd (other)"),
    ("pydantic", "pydantic"),
    ("aiosqlite", "aiosqlite (incl. sqlite3 calls)"),
    ("websockets", "websockets"),
    ("aiohttp", "aiohttp"),
    ("json/", "json"),
    ("asyncio", "asyncio"),
    ("threading", "threading"),
)


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Record `pid` for `seconds` into a raw (collapsed stacks) file; None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _short(frame: str) -> tuple[str, str]:
    """('func (path:line)') → (function label without the line, file)."""
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})", path


def _is_idle(frame: str) -> bool:
    """A thread waiting, not working: the event loop in select(), an aiosqlite worker thread
    blocked on its queue (py-spy does not always see those as idle)."""
    m = FRAME.match(frame)
    if not m:
        return False
    func, path, line = m.group("func"), m.group("file"), m.group("line")
    if path.endswith("selectors.py") and "select" in func:
        return True
    if func == "_connection_worker_thread" and line and line.isdigit():
        return int(line) in _queue_wait_lines()
    return False


@functools.cache
def _queue_wait_lines() -> frozenset[int]:
    """Lines of aiosqlite's worker loop where the thread blocks on its request queue."""
    import aiosqlite.core

    lines = Path(aiosqlite.core.__file__).read_text().splitlines()
    return frozenset(i for i, text in enumerate(lines, 1) if ".get()" in text)


def bucket_of(path: str) -> str:
    for needle, name in BUCKETS:
        if needle in path:
            return name
    return "other"


def summarize(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive time per function, and self time per bucket, as % of busy samples
    (samples of threads that were waiting are counted apart, as `idle_samples`)."""
    self_t: collections.Counter[str] = collections.Counter()
    incl_t: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    idle = 0
    if not raw.exists():
        return {"samples": 0}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = [f for f in stack.split(";") if f]
        if not raw_frames:
            continue
        if _is_idle(raw_frames[-1]):
            idle += count
            continue
        frames = [_short(f) for f in raw_frames]
        total += count
        label, path = frames[-1]
        self_t[label] += count
        buckets[bucket_of(path)] += count
        for name in {f[0] for f in frames}:
            incl_t[name] += count

    def pct(counter: collections.Counter[str], n: int) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "idle_samples": idle,
        "self": pct(self_t, top),
        "inclusive": pct(
            collections.Counter(
                {
                    k: v
                    for k, v in incl_t.items()
                    if "kimi_syncd" in k or "aiosqlite" in k or "websockets" in k
                }
            ),
            top,
        ),
        "buckets": pct(buckets, len(buckets)),
    }
