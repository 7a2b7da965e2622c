"""Timestamps: stored as epoch seconds, shown as RFC 3339 UTC with a Z."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone


_last: tuple[int, str] = (-1, "")  # the last second formatted: records come in runs of the same second


def rfc3339(epoch: float | None) -> str | None:
    global _last
    if epoch is None:
        return None
    sec = math.floor(epoch)
    if round((epoch - sec) * 1e6) >= 1_000_000:
        sec += 1  # datetime rounds to the microsecond, which can carry into the next second
    last = _last
    if last[0] == sec:
        return last[1]
    d = datetime.fromtimestamp(sec, timezone.utc)
    # Not strftime("%Y"): glibc does not pad years below 1000 to four digits.
    text = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}Z"
    _last = (sec, text)
    return text


class TimestampOutOfRange(ValueError):
    """A well-formed timestamp whose instant UTC cannot hold (0001-01-01T00:00:00+01:00)."""


def parse_time(value: str) -> float:
    """RFC 3339 with any offset, or 'YYYY-MM-DDTHH:MM' / 'YYYY-MM-DD' taken as UTC. ValueError
    otherwise (TimestampOutOfRange for a valid one before year 1 or after 9999 in UTC)."""
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
    try:
        ts = dt.timestamp()
    except OverflowError:  # (below year 1 in UTC: datetime cannot even compute it)
        raise TimestampOutOfRange(f"timestamp out of range (years 1 to 9999 UTC): {value!r}") from None
    # An offset can push year 1 or 9999 out of range in UTC, where rfc3339() could not show it back.
    if not _MIN_TS <= ts <= _MAX_TS:
        raise TimestampOutOfRange(f"timestamp out of range (years 1 to 9999 UTC): {value!r}")
    return ts


_MIN_TS = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
_MAX_TS = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def now() -> float:
    return time.time()
