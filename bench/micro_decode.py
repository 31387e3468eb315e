"""Micro-benchmark of the per-frame CPU path: `protocol.decode` and `state.apply`.

    .venv/bin/python -m bench.micro_decode                  # this tree vs git HEAD
    .venv/bin/python -m bench.micro_decode --baseline none  # this tree only
    .venv/bin/python -m bench.micro_decode --baseline DIR   # vs DIR/protocol.py, DIR/state.py
    .venv/bin/python -m bench.micro_decode --profile metric_updated   # cProfile, 50k frames

The machine is a shared 2-core VM whose speed swings ~2x on a ~200 ms cycle, so variants
are never timed in separate runs: every round times a small chunk (~1-5 ms) of each variant
back to back, in alternating order, and the table shows medians over the rounds plus the
median of the per-round ratios (this tree / baseline), which is what to trust. Times are
this thread's CPU time (``time.thread_time``), so that being descheduled by the other
processes on the machine does not count; ``--clock wall`` uses ``perf_counter``.

The baseline is `kimi_syncd/protocol.py` and `kimi_syncd/state.py` as of a git revision,
loaded from `git show` under private module names, so both run in this process on the same
frames. Frames come from the simulator: ``/_sim/blast`` frames (the ingest benchmark's
~300-byte metric_updated, ~360-byte log_metric), the `Scenario` mix, and the protocol's
example lines (`tests/data/examples.jsonl`).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kimi_syncd import protocol, state
from kimi_syncd.sim import Scenario, SimBackend, dumps

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "data" / "examples.jsonl"
MAX_BYTES = 16 * 1024 * 1024


# -- the two implementations -----------------------------------------------------------


@dataclass
class Impl:
    name: str
    protocol: Any
    state: Any


def load_baseline(ref: str) -> Impl:
    """protocol.py and state.py at git ``ref`` (or from a directory holding copies of both),
    as modules independent of the live ones."""

    def source(rel: str) -> str:
        if Path(ref).is_dir():
            return (Path(ref) / Path(rel).name).read_text("utf-8")
        return subprocess.run(
            ["git", "show", f"{ref}:{rel}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    def load(name: str, text: str) -> ModuleType:
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pydantic resolve annotations through it
        exec(compile(text, f"<{ref}:{name}>", "exec"), module.__dict__)
        return module

    base_p = load("_micro_base_protocol", source("kimi_syncd/protocol.py"))
    state_src = source("kimi_syncd/state.py")
    for old, new in (
        ("from kimi_syncd import protocol as p\n", "import _micro_base_protocol as p\n"),
        ("from kimi_syncd.protocol import Event\n", "from _micro_base_protocol import Event\n"),
    ):
        if old not in state_src:
            raise SystemExit(f"baseline state.py at {ref} has no line {old.strip()!r}")
        state_src = state_src.replace(old, new)
    base_s = load("_micro_base_state", state_src)
    return Impl(f"baseline ({ref})", base_p, base_s)


# -- the frames ------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    frames: list[str]  # distinct frames, consumed chunk by chunk (round r: chunk r)
    prime: list[str] = field(default_factory=list)  # applied first (untimed)


def workloads(n: int, only: set[str] | None) -> list[Workload]:
    scenario = Scenario(7)
    mix = [dumps(scenario.next_frame()) for _ in range(n)]
    prime = [dumps(scenario.init_frame())]
    sim = SimBackend(seed=7, scenario=scenario)  # blast frames target the active session
    blast_mu = sim._blast_factory(n, 300)
    blast_lm = sim._blast_factory(n, 400)
    examples = EXAMPLES.read_text("utf-8").splitlines()
    out = [
        Workload("metric_updated", [blast_mu(i).decode() for i in range(n)], prime),
        Workload("log_metric", [blast_lm(i).decode() for i in range(n)], prime),
        Workload("scenario_mix", mix),
        Workload("examples", [examples[i % len(examples)] for i in range(n)]),
    ]
    return [w for w in out if only is None or w.name in only]


# -- timing ----------------------------------------------------------------------------


def run(
    impls: list[Impl], wl: Workload, rounds: int, chunk: int, clock: Callable[[], float]
) -> dict[str, dict[str, list[float]]]:
    """µs per frame for each measure and implementation, one sample per round."""
    measures = ("decode", "apply", "decode+apply", "to_dict", "to_dict+dumps")
    samples: dict[str, dict[str, list[float]]] = {m: {i.name: [] for i in impls} for m in measures}
    states = {}
    seqs = {}
    for impl in impls:
        st = impl.state.State()
        seq = 0
        for text in wl.prime:
            seq += 1
            impl.state.apply(st, impl.protocol.decode(text, max_bytes=MAX_BYTES), seq, 1.0)
        states[impl.name] = st
        seqs[impl.name] = seq
    for r in range(rounds):
        lo = (r * chunk) % max(1, len(wl.frames) - chunk)
        frames = wl.frames[lo : lo + chunk]
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            decode = impl.protocol.decode
            apply = impl.state.apply
            st = states[impl.name]
            seq = seqs[impl.name]
            t0 = clock()
            events = [decode(f, max_bytes=MAX_BYTES) for f in frames]
            t1 = clock()
            for e in events:
                seq += 1
                apply(st, e, seq, 1.0)
            t2 = clock()
            seqs[impl.name] = seq
            samples["decode"][impl.name].append((t1 - t0) / len(frames) * 1e6)
            samples["apply"][impl.name].append((t2 - t1) / len(frames) * 1e6)
            samples["decode+apply"][impl.name].append((t2 - t0) / len(frames) * 1e6)
        # The writer calls to_dict() per touched session once per committed batch.
        for impl in order:
            st = states[impl.name]
            sessions = [s for s in st.sessions.values() if s.last_seq is not None]
            busiest = max(sessions, key=lambda s: sum(s.counters.values()), default=None)
            if busiest is None:
                continue
            k = 20
            t0 = clock()
            for _ in range(k):
                busiest.to_dict()
            t1 = clock()
            for _ in range(k):
                json.dumps(busiest.to_dict(), ensure_ascii=False, separators=(",", ":"))
            t2 = clock()
            samples["to_dict"][impl.name].append((t1 - t0) / k * 1e6)
            samples["to_dict+dumps"][impl.name].append((t2 - t1) / k * 1e6)
    return samples


def report(impls: list[Impl], wl: Workload, samples: dict[str, dict[str, list[float]]]) -> None:
    names = [i.name for i in impls]
    print(f"\n## {wl.name} ({len(wl.frames[0])} chars, e.g. {wl.frames[0][:60]}…)")
    head = "| measure (µs) | " + " | ".join(names)
    if len(names) == 2:
        head += " | ratio this/base (median, p10-p90)"
    print(head + " |")
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    for measure, by_impl in samples.items():
        if not all(by_impl.values()):
            continue
        unit = " (per call)" if measure.startswith("to_dict") else " (per frame)"
        cells = [f"{statistics.median(by_impl[n]):.2f}" for n in names]
        if len(names) == 2:
            rs = sorted(a / b for a, b in zip(by_impl[names[1]], by_impl[names[0]], strict=True))
            p10, p90 = rs[len(rs) // 10], rs[(len(rs) * 9) // 10]
            cells.append(f"{statistics.median(rs):.2f}× ({p10:.2f}-{p90:.2f})")
        print(f"| {measure}{unit} | " + " | ".join(cells) + " |")


def profile(impl: Impl, wl: Workload, n: int) -> None:
    st = impl.state.State()
    for i, text in enumerate(wl.prime):
        impl.state.apply(st, impl.protocol.decode(text, max_bytes=MAX_BYTES), i + 1, 1.0)
    frames = (wl.frames * (n // len(wl.frames) + 1))[:n]
    decode, apply = impl.protocol.decode, impl.state.apply

    def loop() -> None:
        for seq, text in enumerate(frames, 1000):
            apply(st, decode(text, max_bytes=MAX_BYTES), seq, 1.0)

    prof = cProfile.Profile()
    prof.runcall(loop)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--baseline",
        default="HEAD",
        help="git revision to compare with, a directory with a protocol.py and state.py, or 'none'",
    )
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=200, help="frames per variant per round")
    ap.add_argument(
        "--only",
        help="comma-separated workloads: " + "metric_updated,log_metric,scenario_mix,examples",
    )
    ap.add_argument("--profile", metavar="WORKLOAD", help="cProfile decode+apply instead")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args(argv)

    only = set(args.only.split(",")) if args.only else None
    if args.profile:
        only = {args.profile}
    n = args.rounds * args.chunk if not args.profile else 50_000
    wls = workloads(min(n, 60_000), only)
    current = Impl("this tree", protocol, state)
    if args.profile:
        profile(current, wls[0], 50_000)
        return 0
    impls = [current] if args.baseline == "none" else [load_baseline(args.baseline), current]
    print(f"# decode/apply micro-benchmark: {args.rounds} rounds × {args.chunk} frames")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"python {sys.version.split()[0]}, {args.clock} time, medians over rounds;")
    print("ratios are per round (this tree / baseline, same frames, back to back)")
    for wl in wls:
        report(impls, wl, run(impls, wl, args.rounds, args.chunk, clock))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
