"""Shared pieces: result rows with spread and goals, statistics, machine facts, the run context."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # gitignored scratch: logs, profiles, database templates


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an unsorted sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratios(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    """Per-repetition ratios: run i of one side divided by run i of the other (same moment)."""
    return [a / b for a, b in zip(top, bottom, strict=False) if b]


# -- results -------------------------------------------------------------------------------


@dataclasses.dataclass
class Goal:
    """A target on the median of a row's values or of its ratios."""

    text: str  # e.g. "≥ 0.6× bare client"
    on: str  # "value" or "ratio"
    op: str  # ">=" or "<="
    threshold: float

    def check(self, row: Row) -> bool | None:
        samples = row.ratio_samples if self.on == "ratio" else row.samples
        if not samples:
            return None
        m = median(samples)
        return m >= self.threshold if self.op == ">=" else m <= self.threshold


@dataclasses.dataclass
class Row:
    """One measured figure: its repetitions, optionally a ratio to a reference and a goal."""

    label: str
    unit: str
    samples: list[float]
    ratio_to: str | None = None  # label of the reference (the limit or the peer)
    ratio_samples: list[float] = dataclasses.field(default_factory=list)
    goal: Goal | None = None
    note: str = ""

    @property
    def ok(self) -> bool | None:
        return self.goal.check(self) if self.goal is not None else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        goal = d.get("goal")
        return cls(
            d["label"],
            d["unit"],
            list(d["samples"]),
            d.get("ratio_to"),
            list(d.get("ratio_samples", [])),
            Goal(**goal) if goal else None,
            d.get("note", ""),
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "unit": self.unit,
            "samples": [round(v, 6) for v in self.samples],
            "median": _r(median(self.samples)),
            "min": _r(min(self.samples)) if self.samples else None,
            "max": _r(max(self.samples)) if self.samples else None,
        }
        if self.ratio_to is not None:
            out["ratio_to"] = self.ratio_to
            out["ratio_samples"] = [round(v, 4) for v in self.ratio_samples]
            out["ratio_median"] = _r(median(self.ratio_samples))
        if self.goal is not None:
            out["goal"] = dataclasses.asdict(self.goal)
            out["ok"] = self.ok
        if self.note:
            out["note"] = self.note
        return out


def _r(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


@dataclasses.dataclass
class Section:
    """One benchmark's results."""

    key: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # conditions, caveats
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # raw details for the JSON
    seconds: float = 0.0
    error: str | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @classmethod
    def from_dict(cls, key: str, d: dict[str, Any]) -> Section:
        return cls(
            key,
            d["title"],
            [Row.from_dict(r) for r in d["rows"]],
            list(d["notes"]),
            dict(d["extra"]),
            float(d["seconds"]),
            d.get("error"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes,
            "extra": self.extra,
            "seconds": round(self.seconds, 1),
            "error": self.error,
        }


# -- the run context -----------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    quick: bool
    reps: int
    workdir: Path  # short path under /tmp: AF_UNIX paths must stay under 108 bytes
    python: str = sys.executable
    log: Callable[[str], None] = print
    profile: bool = True
    template_db: Path | None = None  # 1M-event database, built once per run (bench.dbgen)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A fresh short directory, removed afterwards."""
        path = Path(tempfile.mkdtemp(prefix=f"kb-{name}-", dir=self.workdir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "condition"
) -> float:
    """Poll until true; returns the time.time() at which it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- machine facts -------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in (
        "kimi-syncd",
        "websockets",
        "aiohttp",
        "aiosqlite",
        "pydantic",
        "tenacity",
        "persist-queue",
        "psutil",
        "py-spy",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    import sqlite3

    curl = "not installed"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False)
        curl = out.stdout.split("\n", 1)[0].split(" (", 1)[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "curl": curl,
        "libraries": versions,
        "filesystem": _fs_type(tempfile.gettempdir()),
    }


def _fs_type(path: str) -> str:
    best, kind = "", "unknown"
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], f"{parts[2]} on {parts[0]}"
    return kind
