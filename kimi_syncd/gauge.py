"""The context gauge — "kimi 42%" coloured like the dashboard's — as a pure function.

Shared by `kimi-syncctl gauge` and `GET /v1/gauge`; stdlib only, imported on every prompt.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs ~3 ms per prompt
if TYPE_CHECKING:
    from typing import Any

GREEN, YELLOW, RED, DIM, RESET = "\033[32m", "\033[33m", "\033[31m", "\033[2m", "\033[0m"
DEFAULT_FORMAT = "kimi {pct:.0f}%"
DEFAULT_WARN = 80.0  # the dashboard's "caution" level
DEFAULT_CRIT = 90.0  # its "warning" level; it turns red here
_PCT_FIELD = re.compile(r"\{pct(?:[:!][^{}]*)?\}")


class GaugeFormatError(ValueError):
    """The format string cannot be applied to a session."""


def context_of(session: dict[str, Any]) -> dict[str, Any]:
    ctx = session.get("context")
    return ctx if isinstance(ctx, dict) else {}


def render(
    session: dict[str, Any] | None,
    fmt: str,
    warn: float,
    crit: float,
    color: bool,
    marker: str,
) -> str:
    """One line: `marker` when there is no session; fields {name} {id} {model} {pct}
    {tokens} {max}; green below `warn` %, yellow below `crit` %, red from there on."""
    if session is None:
        return marker
    ctx = context_of(session)
    pct = ctx.get("percentage")
    known = isinstance(pct, (int, float)) and not isinstance(pct, bool)
    values = {
        "id": session.get("id"),
        "name": session.get("name") or f"#{session.get('id')}",
        "model": session.get("model") or "",
        "pct": pct if known else 0.0,
        "tokens": ctx.get("tokens") or 0,
        "max": ctx.get("max_context") or 0,
    }
    if not known:
        fmt = _PCT_FIELD.sub("?", fmt)  # no figure yet: "kimi ?%"
    try:
        text = fmt.format(**values)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise GaugeFormatError(f"bad format {fmt!r}: {exc}") from None
    if not color:
        return text
    return f"{_shade(pct if known else None, warn, crit)}{text}{RESET}"


def _shade(pct: float | None, warn: float, crit: float) -> str:
    if pct is None:
        return DIM  # no figure yet: neither good nor bad
    return GREEN if pct < warn else (YELLOW if pct < crit else RED)
