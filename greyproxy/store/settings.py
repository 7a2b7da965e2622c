"""The `settings` table (migration 1): flat keys, each a JSON value; a trigger bumps meta.settings_version."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import orjson

COLUMNS = ("key", "value", "updated_at")


def read_all() -> dict[str, Any]:
    """Every stored setting, JSON-decoded; a value that does not decode is skipped."""
    from .models import Setting

    rows = cast(Iterable[tuple[str, str]], Setting.select(Setting.key, Setting.value).tuples())
    out: dict[str, Any] = {}
    for key, raw in rows:
        try:
            out[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
    return out


def read_with_version() -> tuple[int, dict[str, Any]]:
    """(settings_version, read_all()) in one read transaction, so they match."""
    from .db import database
    from .models import meta_value

    with database.atomic():
        return meta_value("settings_version"), read_all()


def write(changes: dict[str, Any], now: float | None = None) -> None:
    """Upsert each key as a JSON value (in the caller's transaction)."""
    from .models import Setting

    now = time.time() if now is None else now
    for key, value in changes.items():
        (
            Setting.insert(key=key, value=orjson.dumps(value).decode(), updated_at=now)
            .on_conflict(
                conflict_target=[Setting.key],
                update={Setting.value: orjson.dumps(value).decode(), Setting.updated_at: now},
            )
            .execute()
        )


GET_RAW = "SELECT value FROM settings WHERE key = ?"  # one stored JSON value (maintenance's raw connection)
