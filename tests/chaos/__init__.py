"""Fault campaigns against a real kimi-syncd process and the simulated backend.

`python -m tests.chaos` (or `make chaos`) runs every campaign with full counts;
`tests/test_chaos.py` runs the same scenarios with small counts inside `make test`.
See docs/reliability.md for the method and the figures of the last full run.

Campaigns (one module each): `crash`, `upstream`, `local`, `abuse`.
"""

from __future__ import annotations

from . import abuse, crash, local, upstream
from .common import Scenario

CAMPAIGNS: dict[str, list[Scenario]] = {
    "crash": crash.SCENARIOS,
    "upstream": upstream.SCENARIOS,
    "local": local.SCENARIOS,
    "abuse": abuse.SCENARIOS,
}
