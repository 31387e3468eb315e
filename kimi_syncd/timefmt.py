"""Time formatting shared by the API and the CLI (stdlib only)."""

from __future__ import annotations

import datetime as dt


def iso(ts: float | None) -> str | None:
    """Unix seconds → RFC 3339 UTC with milliseconds, e.g. 2026-12-01T21:55:30.123Z."""
    if ts is None:
        return None
    moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
