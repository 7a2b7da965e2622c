"""What a credential may be (SPEC §12.1, §12.3): its value, label and destination hosts, and the
preview of a value shown in listings. Errors never contain the value."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from greyproxy.policy.patterns import validate_destination_pattern

from .placeholders import PREFIX

__all__ = [
    "LABEL_RE",
    "MAX_HOSTS",
    "MAX_VALUE_BYTES",
    "validate_hosts",
    "validate_label",
    "validate_value",
    "value_preview",
]

MAX_VALUE_BYTES = 8 * 1024
MAX_HOSTS = 50
LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed; CR/LF would inject headers


def validate_value(value: Any, field: str = "value") -> str:
    """`value` if it is a usable credential value, else ValueError naming `field` (never the value)."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        raise ValueError(f"{field} is longer than {MAX_VALUE_BYTES} bytes")
    if _CONTROL.search(value):
        raise ValueError(f"{field} contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode text") from None
    if PREFIX in value:
        raise ValueError(f"{field} must not contain a placeholder ({PREFIX})")
    return value


def validate_label(label: Any, field: str = "label") -> str:
    if not isinstance(label, str) or not label:
        raise ValueError(f"{field} is required")
    if not LABEL_RE.fullmatch(label):
        raise ValueError(f"{field} must be 1-128 of A-Z a-z 0-9 . _ -")
    return label


def validate_hosts(hosts: Any, field: str = "hosts") -> list[str]:
    """Destination patterns in the §2.2 dialect (at most 50), whitespace trimmed, duplicates dropped."""
    if hosts is None:
        return []
    if not isinstance(hosts, Sequence) or isinstance(hosts, (str, bytes)):
        raise ValueError(f"{field} must be an array of destination patterns")
    if len(hosts) > MAX_HOSTS:
        raise ValueError(f"{field} has more than {MAX_HOSTS} patterns")
    out: list[str] = []
    for i, h in enumerate(hosts):
        if not isinstance(h, str):
            raise ValueError(f"{field}[{i}] must be a string")
        try:
            p = validate_destination_pattern(h)
        except ValueError as exc:
            raise ValueError(f"{field}[{i}]: {str(exc).replace('destination_pattern', 'pattern')}") from None
        if p not in out:
            out.append(p)
    return out


def value_preview(value: str) -> str:
    """Never more than a quarter of the value: 36+ chars → first 6 + *** + last 3; 12-35 → first 3
    + ***; shorter → ***."""
    n = len(value)
    if n >= 36:
        return f"{value[:6]}***{value[-3:]}"
    if n >= 12:
        return f"{value[:3]}***"
    return "***"
