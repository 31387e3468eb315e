"""`python -m tests.chaos [--quick] [--seed N] [--only CAMPAIGN[,..]] [--report FILE]`.

Runs the fault campaigns against real daemon processes; each campaign ends with a summary
line `N passed, M failed` (a check is one audit: a crash round, a fault scenario's
assertion); a failure prints the seed and the command that reproduces it. Exit status 0
when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from . import CAMPAIGNS
from .common import Ctx, run_scenario


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts (as in make test)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated campaigns or campaign.scenario names "
        f"(campaigns: {', '.join(CAMPAIGNS)})",
    )
    p.add_argument("--report", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="progress lines")
    return p


def _selected(only: str, campaign: str, scenario: str) -> bool:
    if not only:
        return True
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    return campaign in wanted or f"{campaign}.{scenario}" in wanted


def _short(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    mode = "quick" if args.quick else "full"
    print(f"kimi-syncd chaos campaigns ({mode}), seed {seed}", flush=True)
    report: dict[str, Any] = {"seed": seed, "mode": mode, "campaigns": {}}
    any_failed = False
    started = time.monotonic()
    for campaign, scenarios in CAMPAIGNS.items():
        chosen = [s for s in scenarios if _selected(args.only, campaign, s.name)]
        if not chosen:
            continue
        print(f"\n== {campaign} ==", flush=True)
        passed = failed = skipped = 0
        results: dict[str, Any] = {}
        for scenario in chosen:
            ctx: Ctx = run_scenario(campaign, scenario, seed, args.quick, args.verbose)
            results[scenario.name] = {
                "figures": ctx.figures,
                "skipped": ctx.skipped,
                "checks": [
                    {"name": c.name, "ok": c.ok, "detail": c.detail, "known": c.known}
                    for c in ctx.checks
                ],
            }
            if ctx.skipped is not None:
                skipped += 1
                print(f"  SKIP {scenario.name}: {ctx.skipped}", flush=True)
                continue
            ok = sum(1 for c in ctx.checks if c.ok)
            bad = ctx.failed
            passed += ok
            failed += len(bad)
            mark = "ok  " if not bad else "FAIL"
            print(f"  {mark} {scenario.name}: {ok} passed, {len(bad)} failed", flush=True)
            print(f"       figures: {_short(ctx.figures)}", flush=True)
            for check in bad:
                print(f"       FAILED {check.name}: {check.detail}", flush=True)
                if check.known:
                    print(f"         (known daemon issue: {check.known})", flush=True)
            if bad:
                any_failed = True
                quick = " --quick" if args.quick else ""
                print(
                    f"       reproduce: python -m tests.chaos{quick} --seed {seed} "
                    f"--only {campaign}.{scenario.name}   (logs kept in {ctx.dir})",
                    flush=True,
                )
        report["campaigns"][campaign] = results
        tail = f", {skipped} skipped" if skipped else ""
        print(f"{campaign}: {passed} passed, {failed} failed{tail}", flush=True)
    elapsed = time.monotonic() - started
    report["seconds"] = round(elapsed, 1)
    print(f"\nseed {seed}, {elapsed:.0f} s", flush=True)
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
