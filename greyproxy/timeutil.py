"""Timestamps: stored as epoch seconds, shown as RFC 3339 UTC with a Z."""

from __future__ import annotations

import time
from datetime import datetime, timezone


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    """RFC 3339 with any offset, or 'YYYY-MM-DDTHH:MM' / 'YYYY-MM-DD' taken as UTC. ValueError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an RFC 3339 timestamp")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def now() -> float:
    return time.time()
