"""The benchmark runner: `python -m bench [--quick] [--only ingest,enqueue,...]`.

Runs each benchmark in turn (each bounded in time), then writes BENCHMARKS.json and
BENCHMARKS.md at the top of the repository. A partial run (`--only`) writes to
bench/results/ instead, so the committed files always come from a complete run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, ROOT, Context, Section, machine_info

BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("ingest", "bench.ingest"),
    ("enqueue", "bench.enqueue"),
    ("drain", "bench.drain"),
    ("queries", "bench.queries"),
    ("memory", "bench.memory"),
    ("startup", "bench.startup"),
    ("reconnect", "bench.reconnect"),
)
NEEDS_TEMPLATE = {"queries", "memory", "startup"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    p.add_argument(
        "--only", help=f"comma-separated subset of: {', '.join(k for k, _ in BENCHMARKS)}"
    )
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3 full, 1 quick)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument("--out", type=Path, help="directory for BENCHMARKS.{json,md}")
    p.add_argument(
        "--render",
        action="store_true",
        help="only rewrite BENCHMARKS.md from BENCHMARKS.json (after editing bench/FINDINGS.md)",
    )
    args = p.parse_args(argv)
    if args.render:
        return render(args.out or ROOT)

    selected = [k for k, _ in BENCHMARKS]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = set(wanted) - set(selected)
        if unknown:
            p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        selected = [k for k in selected if k in wanted]
    partial = bool(args.only) or (args.reps is not None and args.reps < 3)
    out_dir = args.out or (RESULTS if partial or args.quick else ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    started = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {text}", flush=True)

    ctx = Context(
        quick=args.quick,
        reps=args.reps or (1 if args.quick else 3),
        workdir=workdir,
        log=log,
        profile=not args.no_profile,
    )
    sections: list[Section] = []
    try:
        if NEEDS_TEMPLATE & set(selected):
            from bench import dbgen

            log("building the 1,000,000-event database")
            ctx.template_db = dbgen.build(ctx)
        for key, module_name in BENCHMARKS:
            if key not in selected:
                continue
            log(f"{key} …")
            t0 = time.time()
            module = importlib.import_module(module_name)
            try:
                section: Section = module.run(ctx)
            except Exception as exc:
                traceback.print_exc()
                section = Section(key, key, error=f"{type(exc).__name__}: {exc}")
            section.seconds = time.time() - t0
            sections.append(section)
            log(f"{key} done in {section.seconds:.0f} s")
    finally:
        for name in ("profile-ingest.txt", "profile-enqueue.txt"):
            if (workdir / name).exists():
                shutil.copy(workdir / name, RESULTS / name)
        shutil.rmtree(workdir, ignore_errors=True)

    from bench import report

    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "reps": ctx.reps,
        "total_seconds": round(time.time() - started, 1),
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
    }
    doc = {"meta": meta, "benchmarks": {s.key: s.as_dict() for s in sections}}
    (out_dir / "BENCHMARKS.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "BENCHMARKS.md").write_text(report.markdown(meta, sections))
    log(f"wrote {out_dir / 'BENCHMARKS.md'} and {out_dir / 'BENCHMARKS.json'}")
    print(report.summary(sections))
    return 1 if any(s.error for s in sections) else 0


def render(directory: Path) -> int:
    from bench import report

    doc = json.loads((directory / "BENCHMARKS.json").read_text())
    sections = [Section.from_dict(k, v) for k, v in doc["benchmarks"].items()]
    (directory / "BENCHMARKS.md").write_text(report.markdown(doc["meta"], sections))
    print(f"rewrote {directory / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
