"""The JSON shapes of SPEC §2–§5, built from stored rows (dicts or peewee models)."""

from __future__ import annotations

import time
from typing import Any

from .timeutil import rfc3339


def _get(row: Any, key: str, default: Any = None) -> Any:
    if isinstance(row, dict):
        return row.get(key, default)
    return getattr(row, key, default)


def rule_summary_text(container: str, destination: str, port: str) -> str:
    return f"{container} → {destination}:{port or '*'}"


def rule_json(row: Any, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    expires = _get(row, "expires_at")
    return {
        "id": _get(row, "id"),
        "container_pattern": _get(row, "container_pattern"),
        "destination_pattern": _get(row, "destination_pattern"),
        "port_pattern": _get(row, "port_pattern"),
        "rule_type": _get(row, "rule_type", "glob"),
        "action": _get(row, "action"),
        "created_at": rfc3339(_get(row, "created_at")),
        "expires_at": rfc3339(expires),
        "last_used_at": rfc3339(_get(row, "last_used_at")),
        "created_by": _get(row, "created_by"),
        "notes": _get(row, "notes"),
        "is_active": expires is None or expires > now,
        "source": _get(row, "source", "global"),
        "session_id": _get(row, "session_id"),
        "hit_count": _get(row, "hit_count", 0),
    }


def pending_json(row: Any, waiting: int = 0) -> dict[str, Any]:
    return {
        "id": _get(row, "id"),
        "container_name": _get(row, "container_name"),
        "container_id": _get(row, "container_id", "") or "",
        "destination_host": _get(row, "destination_host"),
        "destination_port": _get(row, "destination_port"),
        "resolved_hostname": _get(row, "resolved_hostname"),
        "first_seen": rfc3339(_get(row, "first_seen")),
        "last_seen": rfc3339(_get(row, "last_seen")),
        "attempt_count": _get(row, "attempt_count", 1),
        "waiting": waiting,
    }


def whole_ms(ms: Any) -> int | None:
    """Milliseconds as a whole number (SPEC: an integer, as the reference sends; typed clients decode int64)."""
    return None if ms is None else int(round(float(ms)))


def micros(ms: Any) -> int | None:
    """The same duration in whole microseconds, for whoever wants the precision."""
    return None if ms is None else int(round(float(ms) * 1000))


def log_json(row: Any, rule_summary: str | None = None) -> dict[str, Any]:
    rt = _get(row, "response_time_ms")
    return {
        "id": _get(row, "id"),
        "timestamp": rfc3339(_get(row, "timestamp")),
        "container_name": _get(row, "container_name"),
        "container_id": _get(row, "container_id", "") or "",
        "destination_host": _get(row, "destination_host"),
        "destination_port": _get(row, "destination_port"),
        "resolved_hostname": _get(row, "resolved_hostname"),
        "method": _get(row, "method"),
        "result": _get(row, "result"),
        "rule_id": _get(row, "rule_id"),
        "rule_summary": rule_summary,
        "response_time_ms": whole_ms(rt),
        "response_time_us": micros(rt),
        "reason": _get(row, "reason"),
        "mitm_skip_reason": _get(row, "mitm_skip_reason"),
    }
