"""Token usage (SPEC §13.3): each provider's usage object → one shape, and totals."""

from __future__ import annotations

from typing import Any

FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _int(obj: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return None
    return int(obj)


def _sum(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def empty() -> dict[str, Any]:
    return {f: None for f in FIELDS} | {"raw": None}


def anthropic(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return empty()
    base = _int(raw, "input_tokens")
    read = _int(raw, "cache_read_input_tokens")
    write = _int(raw, "cache_creation_input_tokens")
    return {
        "input_tokens": _sum(base, read, write),
        "output_tokens": _int(raw, "output_tokens"),
        "cache_read_tokens": read,
        "cache_write_tokens": write,
        "reasoning_tokens": None,
        "raw": raw,
    }


def openai_responses(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return empty()
    return {
        "input_tokens": _int(raw, "input_tokens"),
        "output_tokens": _int(raw, "output_tokens"),
        "cache_read_tokens": _int(raw, "input_tokens_details", "cached_tokens"),
        "cache_write_tokens": None,
        "reasoning_tokens": _int(raw, "output_tokens_details", "reasoning_tokens"),
        "raw": raw,
    }


def openai_chat(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return empty()
    return {
        "input_tokens": _int(raw, "prompt_tokens"),
        "output_tokens": _int(raw, "completion_tokens"),
        "cache_read_tokens": _int(raw, "prompt_tokens_details", "cached_tokens"),
        "cache_write_tokens": None,
        "reasoning_tokens": _int(raw, "completion_tokens_details", "reasoning_tokens"),
        "raw": raw,
    }


def google(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return empty()
    thoughts = _int(raw, "thoughtsTokenCount")
    return {
        "input_tokens": _int(raw, "promptTokenCount"),
        "output_tokens": _sum(_int(raw, "candidatesTokenCount"), thoughts),
        "cache_read_tokens": _int(raw, "cachedContentTokenCount"),
        "cache_write_tokens": None,
        "reasoning_tokens": thoughts,
        "raw": raw,
    }


def reported(usage: dict[str, Any] | None) -> bool:
    return usage is not None and bool(usage) and any(usage.get(f) is not None for f in FIELDS)


def total(usages: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Sum of each field (null counts 0), plus `requests` and `requests_with_usage`; no `raw`."""
    out: dict[str, Any] = {f: None for f in FIELDS}  # null until some request reports the field
    out["requests"] = len(usages)
    out["requests_with_usage"] = 0
    for u in usages:
        if not u:
            continue
        if reported(u):
            out["requests_with_usage"] += 1
        for f in FIELDS:
            v = u.get(f)
            if isinstance(v, int) and not isinstance(v, bool):
                out[f] = (out[f] or 0) + v
    return out


def add_totals(*totals: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {f: None for f in FIELDS} | {"requests": 0, "requests_with_usage": 0}
    for t in totals:
        for f in out:
            v = t.get(f)
            if v is not None:
                out[f] = (out[f] or 0) + int(v)
    return out
